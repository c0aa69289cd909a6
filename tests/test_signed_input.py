"""Signed input a control plane may send, end to end (issue 10, items 6 and 9):
a real devplane signs and serves, a real daemon receives, real sandboxes under
crun and runc read the keyring.

Edge values a signature does not make sane (`policy_version: 99.0`, a time
past year 9999 in UTC) are typed rejections, audited and acked, and the
worker goes on to apply the next good keyring. Envelopes made by
securesystemslib, whose keyids are TUF-style ids rather than DSSE §6's hex
SHA-256 of the raw key, are applied when signed by the pinned key.
"""

import os
from datetime import datetime, timedelta, timezone

import pytest
from securesystemslib.dsse import Envelope
from securesystemslib.signer import CryptoSigner, SSlibKey

from daemon_fixture import *  # noqa: F403
from daemon_fixture import (POLICY, acks, agent_log, audit_events, keyring_version, publish,
                            publish_raw, running_with_v1, wait_agent_sees)
from devplane_fixture import run_host, wait_for
from tappass_host import signing, strictjson
from tappass_host.devplane import keyrings as devplane_keyrings
from tappass_host.keyring import PAYLOAD_TYPE


def _payload(devplane, name: str, version, **fields) -> dict:
    (record,) = devplane.state.find_sandboxes(name)
    now = datetime.now(timezone.utc)
    payload = {**POLICY, "schema": "tappass.keyring/v1", "sandbox_id": record["sandbox_id"],
               "policy_version": version, "issued_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
               "expires_at": (now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")}
    payload.update(fields)
    return payload


@pytest.mark.parametrize("runtime", ["crun", "runc"])
def test_edge_values_are_rejected_audited_acked_and_the_worker_goes_on(
        devplane, host, tmp_path, sandboxes, daemons, name, runtime):
    _, daemon = running_with_v1(devplane, host, tmp_path, sandboxes, daemons, name, runtime)
    keyring_dir = host.paths.sandbox(name).keyring
    before = os.readlink(keyring_dir / "..data")

    edges = {2: _payload(devplane, name, 99.0),
             3: _payload(devplane, name, 3, expires_at="9999-12-31T23:59:59-01:00"),
             4: _payload(devplane, name, 4, process={"memory_mb": 256.0, "pids_max": 128})}
    for claimed, payload in edges.items():
        publish_raw(devplane, tmp_path, devplane_keyrings.sign(devplane.state, payload),
                    claimed, name)
        daemon.wait_line(f"{name}: rejected policy_version {claimed}: schema")

    assert os.readlink(keyring_dir / "..data") == before and keyring_version(host, name) == 1
    rejected = [e for e in audit_events(host) if e["event"] == "keyring.rejected"]
    assert [(e["sandbox"], e["details"]["reason"]) for e in rejected] == [(name, "schema")] * 3
    wait_for(lambda: sorted((a["policy_version"], a["status"], a["reason"])
                            for a in acks(devplane, name) if a["status"] == "rejected")
             == [(2, "rejected", "schema"), (3, "rejected", "schema"), (4, "rejected", "schema")])

    following = publish(devplane, tmp_path, POLICY, name)
    wait_agent_sees(host, name, following)
    daemon.wait_line(f"{name}: applied policy_version {following}")
    seen = agent_log(host, name)
    assert all(f"policy_version={v}" not in seen for v in (2, 3, 4, "99.0"))
    wait_for(lambda: any(a["policy_version"] == following and a["status"] == "applied"
                         for a in acks(devplane, name)))
    assert "internal error" not in daemon.text() and "Traceback" not in daemon.text()
    assert run_host(host, "audit", "verify").returncode == 0


def securesystemslib_envelope(payload: dict, *signers) -> bytes:
    envelope = Envelope(payload=strictjson.canonical(payload), payload_type=PAYLOAD_TYPE,
                        signatures={})
    for signer in signers:
        envelope.sign(signer)
    return strictjson.canonical(envelope.to_dict())


@pytest.mark.parametrize("runtime", ["crun", "runc"])
def test_an_envelope_made_by_securesystemslib_reaches_the_agent(
        devplane, host, tmp_path, sandboxes, daemons, name, runtime):
    _, daemon = running_with_v1(devplane, host, tmp_path, sandboxes, daemons, name, runtime)
    pinned = CryptoSigner(devplane.state.signing_key)  # keyid: securesystemslib's own
    assert pinned.public_key.keyid != signing.key_id(devplane.state.signing_key.public_key())
    other = signing.generate()
    impostor = CryptoSigner(other, SSlibKey.from_crypto(
        other.public_key(), keyid=signing.key_id(devplane.state.signing_key.public_key())))

    forged = securesystemslib_envelope(_payload(devplane, name, 2), impostor)
    publish_raw(devplane, tmp_path, forged, 2, name)
    daemon.wait_line(f"{name}: rejected policy_version 2: bad_signature")

    good = securesystemslib_envelope(_payload(devplane, name, 3), pinned)
    publish_raw(devplane, tmp_path, good, 3, name)
    wait_agent_sees(host, name, 3)
    assert keyring_version(host, name) == 3
    assert (host.paths.sandbox(name).keyring / "keyring.dsse.json").read_bytes() == good
    wait_for(lambda: any(a["policy_version"] == 3 and a["status"] == "applied"
                         for a in acks(devplane, name)))
    assert "policy_version=2" not in agent_log(host, name)


def test_bootstrap_times_out_of_range_are_malformed_not_a_crash(host_state):
    """A bootstrap is signed input too: with --trust-on-first-use its key is
    the token's own. An `exp` of -10**400 once crashed `init` (OverflowError)."""
    from tappass_host.identity import bootstrap

    key = signing.generate()
    for iat, exp in ((-10**400 - 100, -10**400), (2**64, 2**64 + 100)):
        claims = {"v": 1, "jti": f"j{exp}"[:20], "org_id": "org", "sandbox_spec_ref": "demo",
                  "iat": iat, "exp": exp, "sign_key": signing.public_key_to_text(key.public_key()),
                  "tls_ca_sha256": "0" * 64}
        url = "https://127.0.0.1:1" + bootstrap.ENROLL_PATH + bootstrap.encode(claims, key)
        result = run_host(host_state, "init", "demo", "--enroll-url", url,
                          "--trust-on-first-use")
        assert result.returncode != 0
        assert result.stderr.count("\n") == 1 and "is out of range" in result.stderr, \
            result.stderr
