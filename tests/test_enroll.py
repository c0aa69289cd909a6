"""`tappass-host init` against a real devplane over HTTPS on loopback (DESIGN §5).

Every `init` here is the real CLI in a subprocess; the devplane is the real
`tappass-devplane serve` in another.
"""

import base64
import hashlib
import json
import stat
import subprocess
import time

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import patience
from audit_records import read_audit
from devplane_fixture import *  # noqa: F403
from devplane_fixture import ENV, PYTHON, claims_of, new_host_state, run_host
from tappass_host import signing
from tappass_host import sandbox_record as sandboxes
from tappass_host.identity import bootstrap as bootstraps
from tappass_host.identity import certs
from tappass_host.identity.tls import mtls_context, pinned_context


def init(host, url, *flags, name="demo", input=None):
    return run_host(host, "init", name, "--enroll-url", url, *flags, input=input)


def enroll(host, devplane, name="demo"):
    url = devplane.bootstrap(name)
    result = init(host, url, "--trust-key", devplane.trust_key, name=name)
    assert result.returncode == 0, result.stderr
    return url, result


def audit_events(host) -> list[dict]:
    return read_audit(host.paths.audit_log)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tappass-host: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def sandbox_entries(host) -> list[str]:
    try:
        return sorted(p.name for p in host.paths.sandboxes.iterdir() if p.name != ".enroll.lock")
    except FileNotFoundError:
        return []


# -- happy path ------------------------------------------------------------------------


def test_init_enrolls_with_files_modes_chain_and_spiffe_id(devplane, host_state):
    url, result = enroll(host_state, devplane)
    paths, sandbox = host_state.paths, host_state.paths.sandbox("demo")

    record = sandboxes.load(paths, "demo")
    assert record.name == "demo" and record.org_id == "org_dev" and record.threshold == 1
    assert record.sandbox_id.startswith("sbx_") and record.sandbox_id in result.stdout
    assert record.spiffe_id == (f"spiffe://devplane.tappass.test/org/org_dev/sandbox/"
                                f"{record.sandbox_id}")
    assert record.sync_url == devplane.url
    assert record.signing_keys == [devplane.trust_key]
    assert record.created_at.endswith("Z")

    assert mode(paths.machine_key) == 0o600 and mode(paths.machine_key.parent) == 0o700
    assert mode(sandbox.identity) == 0o700
    assert mode(sandbox.cert) == 0o644 and mode(sandbox.ca) == 0o644
    assert mode(sandbox.record) == 0o644
    assert mode(paths.consumed_bootstraps) == 0o600
    assert sandbox_entries(host_state) == ["demo"]

    cert = x509.load_pem_x509_certificate(sandbox.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(devplane.ca_pem)
    cert.verify_directly_issued_by(ca)
    assert sandbox.ca.read_bytes() == devplane.ca_pem
    assert certs.spiffe_ids(cert) == [record.spiffe_id]
    machine_key = certs.load_machine_key(paths.machine_key)
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert cert.public_key().public_bytes(*der) == machine_key.public_key().public_bytes(*der)

    jti = claims_of(url)["jti"]
    consumed = paths.consumed_bootstraps.read_text()
    assert consumed == hashlib.sha256(jti.encode()).hexdigest() + "\n"
    assert jti not in consumed

    ok = [e for e in audit_events(host_state) if e["event"] == "enroll.ok"]
    assert len(ok) == 1 and ok[0]["sandbox"] == "demo"
    assert ok[0]["details"]["sandbox_id"] == record.sandbox_id


def test_mtls_own_cert_accepted_none_401_other_sandbox_403(devplane, host_state, tmp_path):
    enroll(host_state, devplane, "demo")
    other = new_host_state(tmp_path, "other-host")
    enroll(other, devplane, "other")
    record = sandboxes.load(host_state.paths, "demo")
    acks = f"{record.sync_url}/v1/sandboxes/{record.sandbox_id}/acks"
    ack = {"policy_version": 1, "status": "applied", "reason": None,
           "applied_at": "2026-01-01T00:00:00Z"}

    with httpx.Client(verify=mtls_context(host_state.paths, "demo")) as client:
        assert client.post(acks, json=ack).status_code == 204
        assert client.get(acks).json()["acks"][0]["policy_version"] == 1
    with httpx.Client(verify=pinned_context(devplane.ca_pem)) as client:
        assert client.post(acks, json=ack).status_code == 401
    with httpx.Client(verify=mtls_context(other.paths, "other")) as client:
        assert client.post(acks, json=ack).status_code == 403
        assert client.get(acks).status_code == 403


def test_machine_key_is_created_once_and_shared(devplane, host_state):
    enroll(host_state, devplane, "one")
    key = host_state.paths.machine_key.read_bytes()
    enroll(host_state, devplane, "two")
    assert host_state.paths.machine_key.read_bytes() == key
    one, two = (x509.load_pem_x509_certificate(host_state.paths.sandbox(n).cert.read_bytes())
                for n in ("one", "two"))
    assert one.public_key() == two.public_key()


@pytest.mark.parametrize("source", ["stdin", "file"])
def test_enroll_url_from_stdin_or_file(devplane, host_state, tmp_path, source):
    url = devplane.bootstrap()
    if source == "stdin":
        result = init(host_state, "-", "--trust-key", devplane.trust_key, input=url + "\n")
    else:
        (tmp_path / "url.txt").write_text(url + "\n")
        result = init(host_state, f"@{tmp_path / 'url.txt'}", "--trust-key", devplane.trust_key)
    assert result.returncode == 0, result.stderr
    assert url.rsplit("/", 1)[1] not in result.stdout + result.stderr


def test_key_pinned_in_config(devplane, host_state):
    host_state.config.write_text(f'[trust]\nkeys = ["{devplane.trust_key}"]\n')
    result = init(host_state, devplane.bootstrap())
    assert result.returncode == 0, result.stderr


def test_trust_on_first_use_warns_pins_and_audits(devplane, host_state):
    result = init(host_state, devplane.bootstrap(), "--trust-on-first-use")
    assert result.returncode == 0, result.stderr
    assert "warning: trusting control-plane key" in result.stderr
    pinned = list(host_state.paths.trust.iterdir())
    assert len(pinned) == 1 and pinned[0].read_text().strip() == devplane.trust_key
    tofu = [e for e in audit_events(host_state) if e["event"] == "trust.tofu"]
    assert len(tofu) == 1 and tofu[0]["sandbox"] == "demo"

    # Pinned now: the next bootstrap needs no flag and gives no warning.
    result = init(host_state, devplane.bootstrap("second"), name="second")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr


def test_trust_key_and_tofu_together_is_a_usage_error(devplane, host_state):
    result = init(host_state, devplane.bootstrap(), "--trust-key", devplane.trust_key,
                  "--trust-on-first-use")
    assert result.returncode != 0 and "not both" in result.stderr
    assert not host_state.root.exists()


def test_invalid_name_touches_nothing(devplane, host_state):
    result = init(host_state, devplane.bootstrap(), "--trust-key", devplane.trust_key,
                  name="../evil")
    assert_one_line_error(result, "invalid sandbox name")
    assert not host_state.root.exists()


def test_already_enrolled_name_is_refused_before_the_network(devplane, host_state):
    enroll(host_state, devplane, "demo")
    url = devplane.bootstrap()
    result = init(host_state, url, "--trust-key", devplane.trust_key)
    assert_one_line_error(result, "already enrolled")
    # The bootstrap was not sent, so it is still good for another name.
    result = init(host_state, url, "--trust-key", devplane.trust_key, name="demo2")
    assert result.returncode == 0, result.stderr


# -- a bootstrap works once --------------------------------------------------------------


def test_second_use_on_same_host_is_refused_locally(devplane, host_state):
    url, _ = enroll(host_state, devplane, "demo")
    devplane.stop()  # no network: the refusal must be local
    result = init(host_state, url, "--trust-key", devplane.trust_key, name="again")
    assert_one_line_error(result, "already consumed")
    assert sandbox_entries(host_state) == ["demo"]
    failed = audit_events(host_state)[-1]
    assert failed["event"] == "enroll.failed" and failed["details"] == {"reason": "consumed"}


def test_second_use_from_another_host_gets_410(devplane, host_state, tmp_path):
    url, _ = enroll(host_state, devplane, "demo")
    second = new_host_state(tmp_path, "second-host")
    result = init(second, url, "--trust-key", devplane.trust_key)
    assert_one_line_error(result, "already consumed", "410")
    assert sandbox_entries(second) == []
    assert audit_events(second)[-1]["details"] == {"reason": "consumed"}


def test_ten_concurrent_inits_with_one_token_one_wins(devplane, host_state):
    url = devplane.bootstrap()
    host_state.root.mkdir(parents=True)
    procs = [subprocess.Popen(
        [PYTHON, "-m", "tappass_host", "--state-dir", str(host_state.root), "--config",
         str(host_state.config), "init", f"racer{i}", "--enroll-url", url, "--trust-key",
         devplane.trust_key], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for i in range(10)]
    results = [(p.wait(patience.seconds(60)), p.stdout.read(), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    winners = [r for r in results if r[0] == 0]
    assert len(winners) == 1, results
    for code, _, err in results:
        assert code == 0 or "already consumed" in err, err
    assert len(sandbox_entries(host_state)) == 1
    assert len(list((devplane.root / "consumed").iterdir())) == 1
    assert len(devplane.state.sandboxes()) == 1


# -- bad bootstraps ----------------------------------------------------------------------


def _resign(url: str, key, **changes) -> str:
    claims = {**claims_of(url), **changes}
    origin = url.split("/v1/enroll/")[0]
    return f"{origin}/v1/enroll/{bootstraps.encode(claims, key)}"


def tampered(devplane, tmp_path):
    url = devplane.bootstrap()
    claims_part, sig = url.rsplit("/", 1)[1].split(".")
    claims = {**claims_of(url), "org_id": "org_other"}
    forged = bootstraps.b64url_encode(json.dumps(claims).encode())
    return url.replace(claims_part, forged), ["--trust-key", devplane.trust_key]


def other_signer(devplane, tmp_path):
    other = signing.generate()
    url = _resign(devplane.bootstrap(), other,
                  sign_key=signing.public_key_to_text(other.public_key()))
    return url, ["--trust-key", devplane.trust_key]


def unpinned(devplane, tmp_path):
    return devplane.bootstrap(), []


def expired(devplane, tmp_path):
    now = int(time.time())
    return devplane.bootstrap(iat=now - 600, exp=now - 120), ["--trust-key", devplane.trust_key]


def not_yet_valid(devplane, tmp_path):
    now = int(time.time())
    return devplane.bootstrap(iat=now + 300, exp=now + 600), ["--trust-key", devplane.trust_key]


def too_long(devplane, tmp_path):
    now = int(time.time())
    return devplane.bootstrap(iat=now, exp=now + 901), ["--trust-key", devplane.trust_key]


def wrong_ca(devplane, tmp_path):
    """A man in the middle with its own CA answers at the bootstrap's address."""
    from devplane_fixture import Devplane

    plane = Devplane(tmp_path / "mitm").start()
    devplane.extra_planes = [plane]
    url = devplane.bootstrap().replace(devplane.url, plane.url)
    return url, ["--trust-key", devplane.trust_key]


def right_ca_wrong_tls(devplane, tmp_path):
    """The MITM serves the genuine CA certificate but cannot present TLS under it."""
    from devplane_fixture import Devplane

    plane = Devplane(tmp_path / "mitm2")
    (plane.root / "ca.pem").write_bytes(devplane.ca_pem)  # keeps its own CA key
    plane.start()
    devplane.extra_planes = [plane]
    url = devplane.bootstrap().replace(devplane.url, plane.url)
    return url, ["--trust-key", devplane.trust_key]


def truncated(devplane, tmp_path):
    return devplane.bootstrap()[:-10], ["--trust-key", devplane.trust_key]


def cut_in_half(devplane, tmp_path):
    url = devplane.bootstrap()
    return url[:len(url) // 2], ["--trust-key", devplane.trust_key]


def plain_http(devplane, tmp_path):
    return devplane.bootstrap().replace("https://", "http://"), ["--trust-key", devplane.trust_key]


def control_plane_down(devplane, tmp_path):
    url = devplane.bootstrap()
    devplane.stop()
    return url, ["--trust-key", devplane.trust_key]


BAD = {
    "tampered": (tampered, "bad_signature", ["signature does not verify"]),
    "other_signer": (other_signer, "untrusted_key", ["not pinned on this host"]),
    "unpinned": (unpinned, "untrusted_key", ["no control-plane key is pinned",
                                             "--trust-on-first-use"]),
    "expired": (expired, "expired", ["bootstrap expired", "s ago"]),
    "not_yet_valid": (not_yet_valid, "not_yet_valid", ["issued in the future"]),
    "too_long": (too_long, "lifetime_too_long", ["lifetime is 901 s"]),
    "wrong_ca": (wrong_ca, "ca_mismatch", ["tls_ca_sha256", "man-in-the-middle"]),
    "right_ca_wrong_tls": (right_ca_wrong_tls, "tls", ["not issued by the pinned CA",
                                                       "man-in-the-middle"]),
    "truncated": (truncated, "malformed", ["malformed", "truncated"]),
    "cut_in_half": (cut_in_half, "malformed", ["malformed"]),
    "plain_http": (plain_http, "bad_url", ["must use https"]),
    "control_plane_down": (control_plane_down, "unreachable", ["cannot reach the control plane "
                                                                "at 127.0.0.1:"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_bootstrap_fails_cleanly(case, devplane, host_state, tmp_path):
    make, reason, needles = BAD[case]
    paths = host_state.paths
    certs.load_or_create_machine_key(paths.machine_key)
    key_before = paths.machine_key.read_bytes()
    url, flags = make(devplane, tmp_path)
    try:
        result = init(host_state, url, *flags)
    finally:
        for plane in getattr(devplane, "extra_planes", []):
            plane.stop()
    assert_one_line_error(result, *needles)
    if case == "control_plane_down":
        assert f"127.0.0.1:{devplane.port}" in result.stderr
    assert sandbox_entries(host_state) == []
    assert paths.machine_key.read_bytes() == key_before
    assert not paths.consumed_bootstraps.exists()
    assert not paths.trust.exists()
    failed = audit_events(host_state)[-1]
    assert failed["event"] == "enroll.failed" and failed["sandbox"] == "demo"
    assert failed["details"] == {"reason": reason}
    token = url.rsplit("/", 1)[1]
    assert token[-20:] not in result.stdout + result.stderr


def test_failed_enrollment_creates_no_machine_key(devplane, host_state):
    url = devplane.bootstrap()
    devplane.stop()
    result = init(host_state, url, "--trust-key", devplane.trust_key)
    assert_one_line_error(result, "cannot reach")
    assert not host_state.paths.machine_key.exists()


def test_man_in_the_middle_receives_nothing_but_the_ca_request(devplane, host_state, tmp_path):
    url, flags = wrong_ca(devplane, tmp_path)
    mitm = devplane.extra_planes[0]
    try:
        init(host_state, url, *flags)
    finally:
        mitm.stop()
    log = (tmp_path / "mitm.log").read_text()
    assert "GET /v1/enroll/ca 200" in log
    assert "challenge" not in log and "complete" not in log


def test_bootstrap_within_clock_skew_is_accepted(devplane, host_state):
    now = int(time.time())
    url = devplane.bootstrap(iat=now - 600, exp=now - 30)
    result = init(host_state, url, "--trust-key", devplane.trust_key)
    assert result.returncode == 0, result.stderr


# -- secrets stay secret -----------------------------------------------------------------


def test_no_token_nonce_or_key_material_in_audit_or_output(devplane, host_state, capsys,
                                                           monkeypatch, tmp_path):
    from tappass_host.identity import enrollment

    seen = {}
    original = certs.proof_of_possession

    def spy(key, jti, nonce):
        seen["nonce"] = nonce
        seen["pop"] = original(key, jti, nonce)
        return seen["pop"]

    monkeypatch.setattr(certs, "proof_of_possession", spy)
    url = devplane.bootstrap()
    trust = enrollment.TrustPolicy(pinned=(devplane.trust_key,))
    enrollment.enroll(host_state.paths, "demo", url, trust)
    failures = [init(host_state, url, "--trust-key", devplane.trust_key, name="again"),
                init(new_host_state(tmp_path, "h2"), url, "--trust-key", devplane.trust_key)]

    token = url.rsplit("/", 1)[1]
    machine_key = host_state.paths.machine_key.read_bytes()
    der = certs.load_machine_key(host_state.paths.machine_key).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    secret_values = [token, *token.split("."), claims_of(url)["jti"], seen["nonce"], seen["pop"],
               machine_key.decode(), base64.b64encode(der).decode()[:40], "PRIVATE KEY"]
    captured = capsys.readouterr()
    outputs = [host_state.paths.audit_log.read_text(), captured.out, captured.err,
               (tmp_path / "h2" / "state" / "audit" / "audit.jsonl").read_text()]
    outputs += [r.stdout + r.stderr for r in failures]
    outputs += [p.read_text() for p in host_state.paths.state.rglob("*")
                if p.is_file() and p != host_state.paths.machine_key
                and p.name not in ("audit-key.pem",)]
    for secret in secret_values:
        for text in outputs:
            assert secret not in text
    assert (tmp_path / "devplane.log").exists()
    log = (tmp_path / "devplane.log").read_text()
    assert token not in log and seen["nonce"] not in log


# -- certificate renewal -----------------------------------------------------------------


def test_renewed_certificate_is_used_by_the_next_mtls_request(devplane, host_state):
    enroll(host_state, devplane)
    paths = host_state.paths
    record = sandboxes.load(paths, "demo")
    old = x509.load_pem_x509_certificate(paths.sandbox("demo").cert.read_bytes())

    new = certs.renew_certificate(paths, "demo")

    assert new.serial_number != old.serial_number
    on_disk = x509.load_pem_x509_certificate(paths.sandbox("demo").cert.read_bytes())
    assert on_disk.serial_number == new.serial_number
    assert mode(paths.sandbox("demo").cert) == 0o644
    assert certs.spiffe_ids(new) == [record.spiffe_id]
    acks = f"{record.sync_url}/v1/sandboxes/{record.sandbox_id}/acks"
    with httpx.Client(verify=mtls_context(paths, "demo")) as client:
        response = client.post(acks, json={"policy_version": 3, "status": "applied"})
        assert response.status_code == 204
    assert devplane.state.acks(record.sandbox_id)[-1]["cert_serial"] == \
        format(new.serial_number, "x")
    renewed = [e for e in audit_events(host_state) if e["event"] == "cert.renewed"]
    assert renewed and renewed[-1]["details"]["serial"] == format(new.serial_number, "x")


def _openssl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *args], capture_output=True, text=True)


def assert_x509_svid(cert_file, ca_file, key_file, spiffe_id: str) -> None:
    """SPIFFE X.509-SVID as openssl and py-spiffe read it: §4.4's EKU, a leaf, one SPIFFE id."""
    from spiffe import SpiffeId, X509Svid

    for purpose in ("sslclient", "sslserver"):
        verified = _openssl("verify", "-purpose", purpose, "-CAfile", str(ca_file), str(cert_file))
        assert verified.returncode == 0 and ": OK" in verified.stdout, (purpose, verified.stderr)
    text = _openssl("x509", "-in", str(cert_file), "-noout", "-text").stdout
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text, text
    svid = X509Svid.parse(cert_file.read_bytes(), key_file.read_bytes())
    assert str(svid.spiffe_id) == spiffe_id
    trust_domain = SpiffeId(spiffe_id).trust_domain
    ca_text = _openssl("x509", "-in", str(ca_file), "-noout", "-text").stdout
    assert f"URI:spiffe://{trust_domain}" in ca_text, ca_text
    ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
    ca_ids = certs.spiffe_ids(ca)
    assert ca_ids == [f"spiffe://{trust_domain}"] and SpiffeId(ca_ids[0]).path == ""


def test_issued_and_renewed_certificates_are_x509_svids(devplane, host_state):
    """The devplane's sandbox certificates and their renewals hold serverAuth and clientAuth
    (SPIFFE X.509-SVID §4.4), and the CA names its trust domain."""
    enroll(host_state, devplane)
    paths = host_state.paths
    sandbox = paths.sandbox("demo")
    record = sandboxes.load(paths, "demo")
    assert_x509_svid(sandbox.cert, sandbox.ca, paths.machine_key, record.spiffe_id)
    first = sandbox.cert.read_bytes()

    certs.renew_certificate(paths, "demo")

    assert sandbox.cert.read_bytes() != first
    assert_x509_svid(sandbox.cert, sandbox.ca, paths.machine_key, record.spiffe_id)
    acks = f"{record.sync_url}/v1/sandboxes/{record.sandbox_id}/acks"
    with httpx.Client(verify=mtls_context(paths, "demo")) as client:
        assert client.post(acks, json={"policy_version": 1, "status": "applied"}).status_code == 204


def test_failed_renewal_keeps_the_old_certificate(devplane, host_state):
    from tappass_host.identity.errors import RenewalError

    enroll(host_state, devplane)
    cert_file = host_state.paths.sandbox("demo").cert
    before = cert_file.read_bytes()
    devplane.stop()
    with pytest.raises(RenewalError) as raised:
        certs.renew_certificate(host_state.paths, "demo", timeout=3)
    assert raised.value.reason == "unreachable"
    assert cert_file.read_bytes() == before
    assert audit_events(host_state)[-1]["event"] == "cert.renewal_failed"


def test_renewal_rejects_a_certificate_for_another_key(devplane, host_state, monkeypatch):
    from tappass_host.identity.errors import RenewalError

    enroll(host_state, devplane)
    cert_file = host_state.paths.sandbox("demo").cert
    before = cert_file.read_bytes()
    stranger = certs.load_or_create_machine_key(host_state.paths.state / "stranger.pem")
    real_build = certs.build_csr
    monkeypatch.setattr(certs, "build_csr", lambda key, name: real_build(stranger, name))
    with pytest.raises(RenewalError, match="not for this host's machine key"):
        certs.renew_certificate(host_state.paths, "demo")
    assert cert_file.read_bytes() == before


def test_renewal_delay_is_half_the_lifetime_with_ten_percent_jitter(devplane, host_state):
    import random
    from datetime import timedelta

    enroll(host_state, devplane)
    cert = x509.load_pem_x509_certificate(host_state.paths.sandbox("demo").cert.read_bytes())
    lifetime = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()
    start = cert.not_valid_before_utc
    delays = [certs.renewal_delay(cert, now=start, rng=random.Random(seed)) for seed in range(200)]
    assert all(0.45 * lifetime <= d <= 0.55 * lifetime for d in delays)
    assert max(delays) - min(delays) > 0.05 * lifetime  # jitter is real
    late = start + timedelta(seconds=lifetime)
    assert certs.renewal_delay(cert, now=late) == 0.0


# -- crash during the commit -------------------------------------------------------------

_STALLED_COMMIT = """
import sys, time
from tappass_host import sandbox_record as sandboxes
from tappass_host.identity import enrollment
from tappass_host.paths import HostPaths


class Cert:
    def public_bytes(self, encoding):
        return b"cert"


def stall(directory, record):
    print("staged", flush=True)
    time.sleep(600)


sandboxes.save = stall  # the commit stops with its files staged, not yet published
record = sandboxes.SandboxRecord(
    name=sys.argv[2], sandbox_id="sbx_x", org_id="org", spiffe_id="spiffe://x/y",
    sync_url="https://127.0.0.1:1", signing_keys=[], threshold=1,
    created_at="2026-01-01T00:00:00Z")
enrollment._commit(HostPaths.resolve(sys.argv[1]), record, Cert(), b"ca")
"""


def _stalled_commit(host, name):
    proc = subprocess.Popen([PYTHON, "-c", _STALLED_COMMIT, str(host.root), name],
                            stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "staged"
    return proc


def test_staging_left_by_a_killed_enrollment_is_removed_by_the_next(devplane, host_state):
    host_state.root.mkdir(parents=True)
    killed = _stalled_commit(host_state, "killed")
    live = _stalled_commit(host_state, "live")
    try:
        killed.kill()
        killed.wait()
        staged = sorted(p.name for p in host_state.paths.sandboxes.glob(".enroll-*"))
        assert len(staged) == 2

        enroll(host_state, devplane, "demo")

        left = [p.name for p in host_state.paths.sandboxes.glob(".enroll-*")]
        assert len(left) == 1 and left[0].startswith(".enroll-live."), left
        assert sandbox_entries(host_state) == [*left, "demo"]
    finally:
        live.kill()
        live.wait()
        killed.stdout.close()
        live.stdout.close()


def test_a_renewal_that_fails_unexpectedly_is_logged_and_retried_on_schedule(devplane, host_state):
    # A machine key that cannot be read (here: a directory in its place) is an OSError,
    # not a RenewalError; the daemon's schedule must survive it and keep the old certificate.
    from tappass_host.daemon.renewal import RenewalSchedule

    enroll(host_state, devplane)
    paths = host_state.paths
    before = paths.sandbox("demo").cert.read_bytes()
    key = paths.machine_key.read_bytes()
    paths.machine_key.unlink()
    paths.machine_key.mkdir()
    lines: list[str] = []
    now = [0.0]
    schedule = RenewalSchedule(paths, lines.append, retry_s=60.0, clock=lambda: now[0])
    schedule._due["demo"] = 0.0
    schedule.tick(["demo"])
    assert len(lines) == 1 and "certificate renewal failed" in lines[0], lines
    assert "retrying in 60 s" in lines[0]
    assert schedule.next_due_in() == 60.0
    assert paths.sandbox("demo").cert.read_bytes() == before
    paths.machine_key.rmdir()
    paths.machine_key.write_bytes(key)
    now[0] = 61.0
    schedule.tick(["demo"])
    assert "certificate renewed" in lines[-1], lines
    assert paths.sandbox("demo").cert.read_bytes() != before
