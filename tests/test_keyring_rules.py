"""One test per acceptance rule, each from a real signed envelope with one
thing wrong, through the same path the daemon uses (`apply_update`)."""

import base64
import json
import os
from datetime import datetime, timedelta, timezone

import pytest

from keyrings import SANDBOX_ID, policy, sign
from tappass_host import signing
from tappass_host.audit import AuditLog
from tappass_host.keyring.store import KeyringStore
from tappass_host.sync.apply import apply_update
from tappass_host.keyring.verify import (
    KeyringRejected,
    KeyringVersion,
    Limits,
    Trust,
    parse_timestamp,
    verify,
)

SECRET = "sk-test-SECRET-must-never-leak-4242"


@pytest.fixture
def applied_v5(paths, sandbox, signer):
    """Sandbox 'demo' with version 5 applied; returns its keyring.json bytes."""
    apply_update(paths, "demo", sign(policy(5), signer))
    return (paths.sandbox("demo").keyring / "keyring.json").read_bytes()


def rejected(paths, data, reason):
    with pytest.raises(KeyringRejected) as info:
        apply_update(paths, "demo", data)
    assert info.value.reason == reason, info.value
    assert SECRET not in str(info.value)
    return info.value


def assert_untouched(paths, before: bytes, reason: str):
    keyring_dir = paths.sandbox("demo").keyring
    doc = json.loads(before)
    current = KeyringVersion(doc["policy_version"], parse_timestamp(doc["issued_at"])).dirname
    assert (keyring_dir / "keyring.json").read_bytes() == before
    assert os.readlink(keyring_dir / "..data") == current
    assert [p.name for p in keyring_dir.iterdir() if p.name.startswith("..v")] == [current]
    last = AuditLog.for_host(paths).tail(1)[0]
    assert last["event"] == "keyring.rejected"
    assert last["sandbox"] == "demo"
    assert last["details"]["reason"] == reason
    assert last["details"]["sha256"].startswith("sha256:")
    assert SECRET not in paths.audit_log.read_text()


def envelope_doc(data: bytes) -> dict:
    return json.loads(data)


CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


@case
def too_large(signer):
    doc = policy(6, tools={"blob": "x" * (1024 * 1024)})
    return sign(doc, signer), "too_large"


@case
def duplicate_keys(signer):
    text = sign(policy(6), signer).decode()
    return ('{"payloadType":"x",' + text[1:]).encode(), "malformed"


@case
def duplicate_keys_in_signed_payload(signer):
    payload = json.dumps(policy(6))[:-1] + ',"policy_version":7}'
    return sign(payload.encode(), signer), "malformed"


@case
def bad_base64(signer):
    doc = envelope_doc(sign(policy(6), signer))
    doc["payload"] = doc["payload"][:-3] + "!!!"
    return json.dumps(doc).encode(), "malformed"


@case
def nan_in_envelope(signer):
    return b'{"payloadType":"x","payload":"","signatures":[],"n":NaN}', "malformed"


@case
def bad_utf8(signer):
    return b'{"payloadType":"\xff\xfe","payload":"","signatures":[]}', "malformed"


@case
def wrong_payload_type(signer):
    return sign(policy(6), signer, payload_type="application/json"), "wrong_type"


@case
def unpinned_key(signer):
    return sign(policy(6), signing.generate()), "bad_signature"


@case
def modified_payload(signer):
    doc = envelope_doc(sign(policy(6), signer))
    other = policy(6, process={"memory_mb": 16000})
    doc["payload"] = base64.b64encode(json.dumps(other).encode()).decode()
    return json.dumps(doc).encode(), "bad_signature"


@case
def no_signatures(signer):
    doc = envelope_doc(sign(policy(6), signer))
    doc["signatures"] = []
    return json.dumps(doc).encode(), "bad_signature"


@case
def schema_violation(signer):
    return sign(policy(6, process={"memory_mb": "lots"}), signer), "schema"


@case
def unknown_field_in_known_aspect(signer):
    return sign(policy(6, network={"mode": "none", "bypass": True}), signer), "schema"


@case
def wrong_sandbox(signer):
    return sign(policy(6, sandbox_id="sbx_other"), signer), "wrong_sandbox"


@case
def rollback(signer):
    return sign(policy(4), signer), "rollback"


@case
def future(signer):
    return sign(policy(6, issued_offset=120), signer), "future"


@case
def expired(signer):
    return sign(policy(6, issued_offset=-600, ttl=300), signer), "expired"


@case
def dotdot_path(signer):
    return sign(policy(6, filesystem={"read_only": ["/data/../etc"]}), signer), "invalid"


@case
def relative_path(signer):
    return sign(policy(6, filesystem={"workspace": "workspace"}), signer), "invalid"


@case
def bad_domain_pattern(signer):
    doc = policy(6, network={"mode": "proxy", "allow_domains": ["evil.*.com"]})
    return sign(doc, signer), "invalid"


@case
def limit_above_host_maximum(signer):
    return sign(policy(6, process={"pids_max": 10**6}), signer), "invalid"


# Edge values (issue 10, item 6): each once passed the schema and crashed
# the flip or the time checks with an untyped error.


@case
def float_policy_version(signer):
    return sign(policy(99.0), signer), "schema"


@case
def exponent_policy_version(signer):
    text = json.dumps(policy(6)).replace('"policy_version": 6', '"policy_version": 6e0')
    return sign(text.encode(), signer), "schema"


@case
def bool_policy_version(signer):
    return sign(policy(True), signer), "schema"


@case
def policy_version_past_ten_digits(signer):
    return sign(policy(10**10), signer), "schema"


@case
def huge_integer_policy_version(signer):
    text = json.dumps(policy(6)).replace('"policy_version": 6', '"policy_version": ' + "9" * 5000)
    return sign(text.encode(), signer), "malformed"


@case
def float_limit(signer):
    return sign(policy(6, process={"memory_mb": 256.0}), signer), "schema"


@case
def bool_limit(signer):
    return sign(policy(6, process={"pids_max": True}), signer), "schema"


@case
def huge_limit(signer):
    return sign(policy(6, process={"memory_mb": 10**300}), signer), "invalid"


@case
def expires_at_past_year_9999_in_utc(signer):
    return sign(policy(6, expires_at="9999-12-31T23:59:59-01:00"), signer), "schema"


@case
def issued_at_before_year_1_in_utc(signer):
    return sign(policy(6, issued_at="0001-01-01T00:00:00+01:00"), signer), "schema"


@case
def overflowing_float_anywhere(signer):
    text = json.dumps(policy(6, tools={"x": 1})).replace('"x": 1', '"x": 1e999')
    return sign(text.encode(), signer), "malformed"


@pytest.mark.parametrize("name", sorted(CASES))
def test_rejected_and_nothing_changes(name, paths, signer, applied_v5):
    data, reason = CASES[name](signer)
    rejection = rejected(paths, data, reason)
    assert rejection.sha256.startswith("sha256:")
    assert_untouched(paths, applied_v5, reason)


def test_replay_of_the_same_envelope(paths, sandbox, signer):
    data = sign(policy(5), signer)
    apply_update(paths, "demo", data)
    before = (paths.sandbox("demo").keyring / "keyring.json").read_bytes()
    rejected(paths, data, "replay")
    assert_untouched(paths, before, "replay")


def test_refresh_equal_version_later_issued_at_is_accepted(paths, sandbox, signer):
    apply_update(paths, "demo", sign(policy(5, issued_offset=-30), signer))
    applied = apply_update(paths, "demo", sign(policy(5), signer))
    assert applied.keyring.version.policy_version == 5
    assert applied.previous.issued_at < applied.keyring.version.issued_at
    on_disk = json.loads((paths.sandbox("demo").keyring / "keyring.json").read_bytes())
    assert on_disk["issued_at"] == applied.keyring.payload["issued_at"]


def test_equal_version_earlier_issued_at_is_replay(paths, sandbox, signer):
    apply_update(paths, "demo", sign(policy(5), signer))
    rejected(paths, sign(policy(5, issued_offset=-30), signer), "replay")


def test_issued_at_within_skew_is_accepted(paths, sandbox, signer):
    applied = apply_update(paths, "demo", sign(policy(1, issued_offset=50), signer))
    assert applied.keyring.version.policy_version == 1


def test_threshold_counts_distinct_keys(paths, signer):
    import keyrings

    second = signing.generate()
    keyrings.enroll(paths, "demo", [signer, second], threshold=2)
    doubled = envelope_doc(sign(policy(1), signer, signer))
    assert len(doubled["signatures"]) == 2
    rejected(paths, json.dumps(doubled).encode(), "bad_signature")
    applied = apply_update(paths, "demo", sign(policy(1), signer, second))
    assert applied.keyring.version.policy_version == 1


def test_signature_without_keyid_is_matched_against_pinned_keys(paths, sandbox, signer):
    doc = envelope_doc(sign(policy(1), signer))
    doc["signatures"][0]["keyid"] = ""
    assert apply_update(paths, "demo", json.dumps(doc).encode()).keyring.version.policy_version == 1


def test_rules_apply_in_order(signer):
    """An update wrong in several ways is rejected for the first rule it fails."""
    trust = Trust(SANDBOX_ID, {signing.key_id(signer.public_key()): signer.public_key()}, 1)
    now = datetime.now(timezone.utc)
    both = sign(policy(1, sandbox_id="sbx_other", issued_offset=-900), signer)
    with pytest.raises(KeyringRejected) as info:
        verify(both, trust, None, now, Limits())
    assert info.value.reason == "wrong_sandbox"
    unsigned_and_wrong_type = sign(policy(1), signing.generate(), payload_type="text/plain")
    with pytest.raises(KeyringRejected) as info:
        verify(unsigned_and_wrong_type, trust, None, now, Limits())
    assert info.value.reason == "wrong_type"


def test_one_fixed_now_per_update(signer):
    """`now` is a parameter: the same bytes verify at one instant and not a second later."""
    trust = Trust(SANDBOX_ID, {signing.key_id(signer.public_key()): signer.public_key()}, 1)
    issued = datetime(2026, 11, 29, 12, 0, 0, tzinfo=timezone.utc)
    data = sign(policy(1, now=issued, ttl=300), signer)
    assert verify(data, trust, None, issued + timedelta(seconds=299)).version.policy_version == 1
    with pytest.raises(KeyringRejected) as info:
        verify(data, trust, None, issued + timedelta(seconds=300))
    assert info.value.reason == "expired"


def test_unknown_top_level_aspects_are_kept(paths, sandbox, signer):
    apply_update(paths, "demo", sign(policy(1, future_aspect={"x": 1}), signer))
    on_disk = json.loads((paths.sandbox("demo").keyring / "keyring.json").read_bytes())
    assert on_disk["future_aspect"] == {"x": 1}


def test_applied_is_audited_without_secrets(paths, sandbox, signer):
    apply_update(paths, "demo", sign(policy(1), signer))
    event = AuditLog.for_host(paths).tail(1)[0]
    assert event["event"] == "keyring.applied"
    assert event["details"]["policy_version"] == 1
    assert SECRET not in paths.audit_log.read_text()


def test_store_reports_current_version(paths, sandbox, signer):
    apply_update(paths, "demo", sign(policy(3), signer))
    store = KeyringStore(paths.sandbox("demo").keyring, paths.sandbox("demo").keyring_lock)
    assert store.current_version().policy_version == 3


# --- keyid is an unauthenticated hint (DSSE; issue 10, item 9) ----------------------------


def sslib_envelope(doc: dict, *signers) -> bytes:
    from securesystemslib.dsse import Envelope

    from tappass_host.keyring import PAYLOAD_TYPE

    env = Envelope(payload=json.dumps(doc).encode(), payload_type=PAYLOAD_TYPE, signatures={})
    for signer in signers:
        env.sign(signer)
    return json.dumps(env.to_dict()).encode()


def sslib_signer(key, keyid: str | None = None):
    from securesystemslib.signer import CryptoSigner, SSlibKey

    return CryptoSigner(key, SSlibKey.from_crypto(key.public_key(), keyid=keyid))


def test_securesystemslib_envelope_by_the_pinned_key_is_accepted(paths, sandbox, signer):
    pinned = sslib_signer(signer)  # securesystemslib's default keyid, TUF-style
    assert pinned.public_key.keyid != signing.key_id(signer.public_key())
    applied = apply_update(paths, "demo", sslib_envelope(policy(1), pinned))
    assert applied.keyring.version.policy_version == 1


def test_upper_case_hex_keyid_is_accepted(paths, sandbox, signer):
    upper = sslib_signer(signer, signing.key_id(signer.public_key()).upper())
    assert apply_update(paths, "demo", sslib_envelope(policy(1), upper)).keyring.version \
        .policy_version == 1


def test_unpinned_key_carrying_the_pinned_keyid_is_bad_signature(paths, sandbox, signer):
    impostor = sslib_signer(signing.generate(), signing.key_id(signer.public_key()))
    rejected(paths, sslib_envelope(policy(1), impostor), "bad_signature")
    rejected(paths, sslib_envelope(policy(1), sslib_signer(signing.generate())), "bad_signature")


def test_threshold_with_foreign_keyids_counts_distinct_pinned_keys(paths, signer):
    import keyrings

    second = signing.generate()
    keyrings.enroll(paths, "demo", [signer, second], threshold=2)
    twice = sslib_envelope(policy(1), sslib_signer(signer), sslib_signer(signer, "ab" * 32))
    rejected(paths, twice, "bad_signature")
    both = sslib_envelope(policy(1), sslib_signer(second), sslib_signer(signer))
    assert apply_update(paths, "demo", both).keyring.version.policy_version == 1


class CountingKey:
    """A pinned public key that counts the signature checks made with it."""

    def __init__(self, key):
        self.key, self.checks = key, 0

    def verify(self, sig, message):
        self.checks += 1
        return self.key.verify(sig, message)


def test_signatures_stuffed_into_an_envelope_cost_a_bounded_number_of_checks(signer):
    second, third = signing.generate(), signing.generate()
    keys = {signing.key_id(k.public_key()): CountingKey(k.public_key())
            for k in (signer, second, third)}
    trust = Trust(SANDBOX_ID, keys, 2)
    pinned_id = signing.key_id(signer.public_key())
    doc = envelope_doc(sign(policy(1), *[signing.generate() for _ in range(3)]))
    junk = doc["signatures"]
    doc["signatures"] = ([{"keyid": pinned_id, "sig": junk[0]["sig"]}] * 500
                         + [{"keyid": "", "sig": s["sig"]} for s in junk] * 500)
    with pytest.raises(KeyringRejected) as info:
        verify(json.dumps(doc).encode(), trust, None, datetime.now(timezone.utc))
    assert info.value.reason == "bad_signature"
    # each pinned key once through its keyid, then `threshold` hintless signatures
    # against each pinned key: (1 + threshold) x keys at most
    assert sum(k.checks for k in keys.values()) <= (1 + 2) * 3


def test_an_issued_at_before_year_1000_keeps_rollback_protection(paths, sandbox, signer):
    """glibc's %Y does not pad years before 1000: the version directory of such a
    keyring was named so that the store could not read its version back, and
    any older version was then accepted over it."""
    ancient = policy(5, issued_at="0999-06-01T00:00:00Z")
    applied = apply_update(paths, "demo", sign(ancient, signer))
    assert applied.keyring.version.dirname == "..v0000000005-09990601T000000Z"
    before = (paths.sandbox("demo").keyring / "keyring.json").read_bytes()
    rejected(paths, sign(policy(3), signer), "rollback")
    assert_untouched(paths, before, "rollback")
