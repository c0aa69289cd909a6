"""`tappass-host sync apply` through the real CLI, in a subprocess."""

import json
import subprocess

import patience
from conftest import PYTHON
from keyrings import policy, sign
from tappass_host import signing

SECRET = "sk-test-SECRET-must-never-leak-4242"


def host(paths, *args, stdin=None):
    return subprocess.run(
        [PYTHON, "-m", "tappass_host", "--state-dir", str(paths.state), *args],
        capture_output=True, text=True, input=stdin, timeout=patience.seconds(60),
    )


def test_apply_prints_the_version_and_audits(paths, sandbox, signer, tmp_path):
    envelope = tmp_path / "v7.dsse.json"
    envelope.write_bytes(sign(policy(7), signer))
    result = host(paths, "sync", "apply", "demo", str(envelope))
    assert result.returncode == 0, result.stderr
    assert "policy_version 7" in result.stdout
    assert json.loads((paths.sandbox("demo").keyring / "keyring.json").read_text())[
        "policy_version"] == 7
    audit = host(paths, "--json", "audit", "tail", "-n", "1")
    assert json.loads(audit.stdout)[0]["event"] == "keyring.applied"


def test_apply_from_stdin_with_json_output(paths, sandbox, signer):
    result = host(paths, "--json", "sync", "apply", "demo", "-",
                  stdin=sign(policy(3), signer).decode())
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "applied", "policy_version": 3,
                                         "previous": None}


def test_rejection_is_one_line_with_the_reason_and_no_secret(paths, sandbox, tmp_path):
    envelope = tmp_path / "forged.dsse.json"
    envelope.write_bytes(sign(policy(8), signing.generate()))
    result = host(paths, "sync", "apply", "demo", str(envelope))
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1
    assert "bad_signature" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (paths.sandbox("demo").keyring / "keyring.json").exists()
    log = paths.audit_log.read_text()
    assert '"reason":"bad_signature"' in log
    for text in (result.stdout, result.stderr, log):
        assert SECRET not in text


def test_secret_never_appears_in_output_errors_or_audit(paths, sandbox, signer, tmp_path):
    """Every outcome of an update that carries a secret, checked for the secret."""
    outputs = []
    for doc, key in [
        (policy(1), signer),                                        # applied
        (policy(1), signer),                                        # replay
        (policy(0), signer),                                        # rollback
        (policy(2, secrets={"K": 5}), signer),                      # schema, value in error?
        (policy(2, process={"memory_mb": SECRET}), signer),         # schema on the secret itself
        (policy(2, filesystem={"workspace": SECRET}), signer),      # invalid path
        (policy(2, network={"mode": "proxy", "allow_domains": [SECRET]}), signer),
        (policy(2, sandbox_id=SECRET), signer),                     # wrong sandbox
    ]:
        envelope = tmp_path / "e.json"
        envelope.write_bytes(sign(doc, key))
        for flags in ([], ["--json"], ["-v"]):
            result = host(paths, *flags, "sync", "apply", "demo", str(envelope))
            if "-v" not in flags:
                outputs += [result.stdout, result.stderr]
    outputs.append(paths.audit_log.read_text())
    outputs.append(host(paths, "audit", "tail", "-n", "100").stdout)
    for text in outputs:
        assert SECRET not in text
        assert "sk-test" not in text


def test_bad_name_and_missing_file_are_clear_errors(paths, sandbox, tmp_path):
    bad = host(paths, "sync", "apply", "../etc", str(tmp_path / "x"))
    assert bad.returncode != 0 and "invalid sandbox name" in bad.stderr
    missing = host(paths, "sync", "apply", "demo", str(tmp_path / "nope.json"))
    assert missing.returncode != 0 and "no such file" in missing.stderr
    not_enrolled = host(paths, "sync", "apply", "ghost", str(tmp_path / "nope.json"))
    assert not_enrolled.returncode != 0
    for result in (bad, missing, not_enrolled):
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_unknown_config_key_is_named(paths, sandbox, signer, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('runtime = "crun"\nruntmie_path = "/x"\n')
    envelope = tmp_path / "e.json"
    envelope.write_bytes(sign(policy(1), signer))
    result = host(paths, "--config", str(config), "sync", "apply", "demo", str(envelope))
    assert result.returncode != 0
    assert "runtmie_path" in result.stderr
    assert not (paths.sandbox("demo").keyring / "keyring.json").exists()


def test_edge_values_are_typed_rejections_audited_and_the_last_good_stays(paths, sandbox,
                                                                          signer, tmp_path):
    """Issue 10 item 6: these once passed the schema and ended in 'internal error'."""
    good = tmp_path / "v5.json"
    good.write_bytes(sign(policy(5), signer))
    assert host(paths, "sync", "apply", "demo", str(good)).returncode == 0
    before = (paths.sandbox("demo").keyring / "keyring.json").read_bytes()
    for doc in (policy(99.0), policy(6, expires_at="9999-12-31T23:59:59-01:00"),
                policy(6, process={"memory_mb": 256.0}), policy(True)):
        envelope = tmp_path / "edge.json"
        envelope.write_bytes(sign(doc, signer))
        result = host(paths, "sync", "apply", "demo", str(envelope))
        assert result.returncode != 0
        assert result.stderr.count("\n") == 1 and "keyring rejected (schema)" in result.stderr
        assert "internal error" not in result.stderr and "Traceback" not in result.stderr
        last = json.loads(host(paths, "--json", "audit", "tail", "-n", "1").stdout)[0]
        assert last["event"] == "keyring.rejected" and last["details"]["reason"] == "schema"
    assert (paths.sandbox("demo").keyring / "keyring.json").read_bytes() == before
    assert host(paths, "audit", "verify").returncode == 0
