"""Property tests: the verifier never crashes, and the current version is
always the highest accepted one."""

import json
from datetime import datetime, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyrings import SANDBOX_ID, policy, sign
from tappass_host import signing, strictjson
from tappass_host.keyring.store import KeyringStore
from tappass_host.sync.apply import apply_update
from tappass_host.keyring.verify import KeyringRejected, Limits, Trust, verify

KEY = signing.generate()
TRUST = Trust(SANDBOX_ID, {signing.key_id(KEY.public_key()): KEY.public_key()}, 1)
NOW = datetime.now(timezone.utc)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def verdict(data: bytes) -> str:
    try:
        verify(data, TRUST, None, NOW, Limits())
    except KeyringRejected as rejection:
        return rejection.reason
    return "accepted"


@given(st.binary(max_size=2048))
@settings(max_examples=400)
def test_random_bytes_only_ever_get_typed_rejections(data):
    assert verdict(data) != "accepted"


@given(json_values)
@settings(max_examples=400)
def test_random_json_envelopes_only_ever_get_typed_rejections(value):
    assert verdict(json.dumps(value).encode()) != "accepted"


@given(json_values)
@settings(max_examples=300)
def test_random_json_payloads_signed_by_the_pinned_key_never_crash(value):
    assert verdict(sign(json.dumps(value).encode(), KEY)) in {"malformed", "schema"}


@given(st.dictionaries(
    st.sampled_from(["identity", "process", "filesystem", "network", "gateway", "mcp",
                     "harness", "secrets", "tools", "budget", "compliance_tags"]),
    json_values, max_size=4))
@settings(max_examples=300)
def test_random_aspects_on_a_valid_skeleton_never_crash(aspects):
    reason = verdict(sign(policy(1, now=NOW, **aspects), KEY))
    assert reason in {"accepted", "schema", "invalid"}


update = st.tuples(
    st.integers(min_value=0, max_value=8),          # policy_version
    st.integers(min_value=-3, max_value=3),         # issued_at offset, seconds
    st.sampled_from(["good", "bad_signature", "expired", "invalid"]),
)


@given(st.lists(update, min_size=1, max_size=12))
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_current_is_always_the_highest_accepted(tmp_path_factory, updates):
    import keyrings
    from tappass_host.paths import HostPaths

    paths = HostPaths.resolve(tmp_path_factory.mktemp("state"))
    keyrings.enroll(paths, "demo", [KEY])
    highest = None
    for version, offset, flaw in updates:
        now = NOW.replace(microsecond=0)
        doc = policy(version, now=now, issued_offset=offset)
        key = KEY
        if flaw == "bad_signature":
            key = signing.generate()
        elif flaw == "expired":
            doc = policy(version, now=now, issued_offset=-900, ttl=60)
        elif flaw == "invalid":
            doc["filesystem"] = {"read_only": ["relative/path"]}
        try:
            applied = apply_update(paths, "demo", sign(doc, key), now=now)
        except KeyringRejected:
            continue
        assert flaw == "good"
        highest = max(highest, applied.keyring.version) if highest else applied.keyring.version
    store = KeyringStore(paths.sandbox("demo").keyring, paths.sandbox("demo").keyring_lock)
    with store.transaction():
        assert store.current_version() == highest


# --- edge values in signed fields (issue 10, item 6) ----------------------------------

edge_numbers = (st.integers(min_value=-(2**70), max_value=2**70) | st.booleans()
                | st.floats(allow_nan=False, allow_infinity=False)
                | st.sampled_from([99.0, 1.0, -0.0, 1e308, 9999999999, 10**10, 0]))
offsets = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1)
edge_times = st.builds(
    lambda year, offset: "%04d-12-31T23:59:59%s%02d:%02d" % (
        year, "-" if offset < 0 else "+", abs(offset) // 60, abs(offset) % 60),
    st.sampled_from([1, 2, 2026, 9998, 9999]), offsets) | st.sampled_from(
    ["0001-01-01T00:00:00Z", "0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59Z",
     "9999-12-31T23:59:59.999999-00:01", "2026-02-30T00:00:00Z", "2026-11-29T24:00:00Z"])
edge_fields = st.sampled_from(["policy_version", "process.memory_mb", "process.pids_max",
                               "process.cpu_millis", "issued_at", "expires_at"])


def _with(doc: dict, field: str, value) -> dict:
    aspect, _, key = field.rpartition(".")
    (doc[aspect] if aspect else doc)[key] = value
    return doc


@given(st.lists(st.tuples(edge_fields, edge_numbers | edge_times), min_size=1, max_size=3))
@settings(max_examples=300)
def test_edge_values_in_signed_fields_are_typed_rejections_or_usable(edits):
    doc = policy(1, now=NOW)
    for field, value in edits:
        _with(doc, field, value)
    try:
        keyring = verify(sign(doc, KEY), TRUST, None, NOW, Limits())
    except KeyringRejected as rejection:
        assert rejection.reason in {"schema", "invalid", "future", "expired"}
        assert rejection.policy_version is None or type(rejection.policy_version) is int
        return
    # what the flip and the audit do with an accepted keyring must not fail
    assert type(keyring.version.policy_version) is int
    assert keyring.version.dirname.startswith("..v")
    assert len(keyring.version.dirname) == len("..v0000000001-20261129T120000Z")
    keyring.expires_at.timestamp()
    strictjson.canonical(keyring.payload)
    assert all(type(v) is int for v in keyring.payload.get("process", {}).values())


@given(st.tuples(edge_fields, edge_numbers | edge_times))
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_edge_values_through_the_apply_path_never_crash(tmp_path_factory, edit):
    import keyrings
    from tappass_host.paths import HostPaths

    paths = HostPaths.resolve(tmp_path_factory.mktemp("state"))
    keyrings.enroll(paths, "demo", [KEY])
    now = datetime.now(timezone.utc)
    try:
        apply_update(paths, "demo", sign(_with(policy(1, now=now), *edit), KEY), now=now)
    except KeyringRejected:
        pass
