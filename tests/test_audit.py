"""The audit log (DESIGN §10): chain, signatures, tamper detection, locking, CLI."""

import base64
import hashlib
import json
import multiprocessing
import stat
import subprocess
import sys
from pathlib import Path

import patience
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tappass_host import signing, strictjson
from tappass_host.audit import AuditError, AuditLog, VerifyReport
from tappass_host.paths import HostPaths


@pytest.fixture
def paths(tmp_path) -> HostPaths:
    return HostPaths.resolve(tmp_path / "state")


@pytest.fixture
def log(paths) -> AuditLog:
    return AuditLog.for_host(paths)


def fill(log: AuditLog, count: int) -> None:
    for i in range(count):
        log.append("keyring.applied", "web", {"version": i + 1})


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def rehash(event: dict) -> dict:
    """Recompute `hash` exactly as the contract defines it, independently of the module."""
    unsigned = {k: v for k, v in event.items() if k not in ("hash", "sig")}
    event["hash"] = "sha256:" + hashlib.sha256(strictjson.canonical(unsigned)).hexdigest()
    return event


def sign_with(event: dict, key: Ed25519PrivateKey) -> dict:
    event["sig"] = "ed25519:" + base64.b64encode(key.sign(event["hash"].encode())).decode()
    return event


def encode(event: dict) -> bytes:
    return strictjson.canonical(event) + b"\n"


def assert_broken_at(log: AuditLog, line: int, words: str) -> None:
    report = log.verify()
    assert not report.ok
    assert report.broken_line == line, report
    assert report.events == line - 1
    assert words in report.problem, report.problem


# --- the format --------------------------------------------------------------


def test_events_follow_the_contract(log, paths):
    first = log.append("enroll.ok", "web", {"sandbox_id": "sb-1"})
    second = log.append("trust.tofu")

    lines = read_lines(paths.audit_log)
    assert lines == [encode(first), encode(second)]  # canonical JSON, one per line
    assert set(first) == {"seq", "ts", "event", "sandbox", "details", "prev_hash", "hash", "sig"}
    assert (first["seq"], first["prev_hash"]) == (1, None)
    assert (second["seq"], second["prev_hash"]) == (2, first["hash"])
    assert second["sandbox"] is None and second["details"] == {}
    assert first["ts"].endswith("Z") and first["ts"][10] == "T"

    public = signing.load_or_create_private_key(paths.audit_key).public_key()
    for event in (first, second):
        assert rehash(dict(event))["hash"] == event["hash"]
        assert event["sig"].startswith("ed25519:")
        public.verify(base64.b64decode(event["sig"][len("ed25519:"):]), event["hash"].encode())


def test_key_is_created_on_first_append_with_mode_0600(log, paths):
    assert not paths.audit_key.exists()
    log.append("trust.tofu")
    assert stat.S_IMODE(paths.audit_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.audit_log.stat().st_mode) == 0o600


def test_the_audit_signer_signs_through_libcrypto_exactly_as_cryptography(log, paths):
    """A key that exists signs through OpenSSL's libcrypto by ctypes, without
    importing cryptography (issue 13); Ed25519 is deterministic, so its
    signatures are byte for byte cryptography's with the same key."""
    log.append("trust.tofu")  # makes the key (cryptography)
    signer = signing.load_signer(paths.audit_key)
    key = signing.load_or_create_private_key(paths.audit_key)
    assert type(signer).__module__ == "tappass_host.libcrypto"
    assert signer.public_bytes_raw() == key.public_key().public_bytes_raw()
    for message in (b"", b"a", b"\x00" * 3, bytes(range(256)) * 40):
        assert signer.sign(message) == key.sign(message)
        key.public_key().verify(signer.sign(message), message)
    later = AuditLog.for_host(paths)
    fill(later, 3)
    assert later.verify() == VerifyReport(ok=True, events=4)


def test_without_libcrypto_the_audit_log_signs_through_cryptography(log, paths, monkeypatch):
    from tappass_host import libcrypto

    log.append("trust.tofu")
    monkeypatch.setattr(libcrypto, "_library", lambda: None)  # a Python with OpenSSL linked in
    signer = signing.load_signer(paths.audit_key)
    assert isinstance(signer, Ed25519PrivateKey)
    fill(AuditLog.for_host(paths), 2)
    assert AuditLog.for_host(paths).verify() == VerifyReport(ok=True, events=3)


def test_a_seed_of_the_wrong_length_is_refused():
    from tappass_host import libcrypto

    with pytest.raises(ValueError, match="32 bytes"):
        libcrypto.signer(b"\x01" * 31)


def test_details_must_be_json_serializable(log, paths):
    with pytest.raises(AuditError, match="not JSON-serializable"):
        log.append("keyring.rejected", "web", {"when": object()})
    with pytest.raises(AuditError, match="not JSON-serializable"):
        log.append("keyring.rejected", "web", {"ratio": float("nan")})
    with pytest.raises(AuditError, match="must be a dict"):
        log.append("keyring.rejected", "web", ["reason"])
    assert not paths.audit_log.exists()


def test_returned_event_is_what_was_written(log, paths):
    details = {"reason": "bad_signature", "versions": (1, 2)}
    event = log.append("keyring.rejected", "web", details)
    details["reason"] = "changed afterwards"
    assert event["details"] == {"reason": "bad_signature", "versions": [1, 2]}
    assert strictjson.loads(read_lines(paths.audit_log)[0]) == event


def test_bad_event_name_or_sandbox_is_rejected(log, paths):
    with pytest.raises(AuditError):
        log.append("Keyring Applied")
    with pytest.raises(Exception, match="invalid sandbox name"):
        log.append("sandbox.started", "../etc")
    assert not paths.audit_log.exists()


def test_events_appended_together_are_chained_lines_of_one_write_and_one_fsync(
        log, paths, monkeypatch):
    import os

    log.append("sandbox.started", "web")
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or fsync(fd))  # counts, then syncs
    exited, stopped = log.append_all([("sandbox.exited", {"code": 0}),
                                      ("sandbox.stopped", {"code": 0, "by": "operator"})], "web")
    assert len(synced) == 1
    assert read_lines(paths.audit_log)[1:] == [encode(exited), encode(stopped)]
    assert (exited["seq"], stopped["seq"], stopped["prev_hash"]) == (2, 3, exited["hash"])
    assert log.verify() == (True, 3, None, None)
    with pytest.raises(AuditError):  # one bad name: nothing of the batch is written
        log.append_all([("sandbox.exited", {}), ("Bad Name", {})], "web")
    assert len(read_lines(paths.audit_log)) == 3


def test_events_after_a_mark_are_those_appended_since(log, paths):
    assert log.end() == 0 and log.events_after(0) == []
    fill(log, 2)
    mark = log.end()
    assert mark == paths.audit_log.stat().st_size and log.events_after(mark) == []
    third = log.append("sandbox.stopped", "web", {"by": "operator"})
    with open(paths.audit_log, "ab") as f:
        f.write(b"not json\n")  # a damaged line is left out, not an error
    assert log.events_after(mark) == [third]
    assert [e["seq"] for e in log.events_after(0)] == [1, 2, 3]


# --- verify ------------------------------------------------------------------


def test_missing_or_empty_log_verifies_with_zero_events(log, paths):
    assert log.verify() == log.verify().__class__(ok=True, events=0)
    assert not paths.audit_key.exists()  # verify never creates the key
    paths.audit_log.parent.mkdir(parents=True)
    paths.audit_log.touch()
    report = log.verify()
    assert (report.ok, report.events, report.broken_line) == (True, 0, None)


def test_long_log_verifies(log):
    fill(log, 2000)
    report = log.verify()
    assert (report.ok, report.events, report.broken_line, report.problem) == (True, 2000, None, None)


def test_edited_details_are_detected(log, paths):
    fill(log, 10)
    lines = read_lines(paths.audit_log)
    lines[6] = lines[6].replace(b'"version":7', b'"version":8')
    write_lines(paths.audit_log, lines)
    assert_broken_at(log, 7, "hash does not match")


def test_edited_and_rehashed_event_fails_its_signature(log, paths):
    fill(log, 10)
    lines = read_lines(paths.audit_log)
    event = strictjson.loads(lines[3])
    event["details"]["version"] = 99
    lines[3] = encode(rehash(event))
    write_lines(paths.audit_log, lines)
    assert_broken_at(log, 4, "signature does not verify")


def test_event_resigned_with_another_key_is_detected(log, paths):
    fill(log, 10)
    lines = read_lines(paths.audit_log)
    event = strictjson.loads(lines[4])
    event["details"]["version"] = 99
    lines[4] = encode(sign_with(rehash(event), Ed25519PrivateKey.generate()))
    write_lines(paths.audit_log, lines)
    assert_broken_at(log, 5, "signature does not verify")


def test_whole_log_rewritten_with_another_key_fails_at_line_1(log, paths):
    fill(log, 5)
    forger = Ed25519PrivateKey.generate()
    prev_hash, lines = None, []
    for line in read_lines(paths.audit_log):
        event = strictjson.loads(line)
        event["prev_hash"] = prev_hash
        lines.append(encode(sign_with(rehash(event), forger)))
        prev_hash = event["hash"]
    write_lines(paths.audit_log, lines)
    assert_broken_at(log, 1, "signature does not verify")


def test_deleted_event_is_detected(log, paths):
    fill(log, 10)
    lines = read_lines(paths.audit_log)
    del lines[5]
    write_lines(paths.audit_log, lines)
    assert_broken_at(log, 6, "seq is 7, expected 6")


def test_deleted_first_event_is_detected(log, paths):
    fill(log, 3)
    write_lines(paths.audit_log, read_lines(paths.audit_log)[1:])
    assert_broken_at(log, 1, "seq is 2, expected 1")


def test_swapped_events_are_detected(log, paths):
    fill(log, 10)
    lines = read_lines(paths.audit_log)
    lines[2], lines[3] = lines[3], lines[2]
    write_lines(paths.audit_log, lines)
    assert_broken_at(log, 3, "expected 3")


def test_deletion_hidden_by_renumbering_is_detected(log, paths):
    """Without the key, fixing up seq after a deletion breaks the signature."""
    fill(log, 6)
    lines = read_lines(paths.audit_log)
    del lines[2]
    event = strictjson.loads(lines[2])
    event["seq"] = 3
    lines[2] = encode(rehash(event))
    write_lines(paths.audit_log, lines)
    assert_broken_at(log, 3, "signature does not verify")


def test_deletion_renumbered_with_the_key_still_breaks_the_chain(log, paths):
    """Even a validly signed line is caught if it does not link to the line before."""
    fill(log, 6)
    lines = read_lines(paths.audit_log)
    del lines[2]
    event = strictjson.loads(lines[2])
    event["seq"] = 3
    key = signing.load_or_create_private_key(paths.audit_key)
    lines[2] = encode(sign_with(rehash(event), key))
    write_lines(paths.audit_log, lines)
    assert_broken_at(log, 3, "prev_hash does not match")


@pytest.mark.parametrize("garble", [
    lambda line: line[: len(line) // 2] + b"\n",  # truncated
    lambda line: b"\x00\xff garbage\n",  # not UTF-8, not JSON
    lambda line: b"\n",  # blank
    lambda line: b"[1,2,3]\n",  # JSON but not an event
])
def test_garbled_line_is_detected(log, paths, garble):
    fill(log, 8)
    lines = read_lines(paths.audit_log)
    lines[4] = garble(lines[4])
    write_lines(paths.audit_log, lines)
    report = log.verify()
    assert (report.ok, report.broken_line) == (False, 5)


@pytest.mark.parametrize("missing", [30, 1])  # a torn line; only its newline missing
def test_a_torn_last_line_is_reported_then_cut_by_the_next_append(log, paths, missing):
    """What follows the last newline is what is left of an append that never
    completed (SIGKILL between two pages of its write): `verify` reports it,
    and the next append cuts it off, says so in the chain, and goes on."""
    fill(log, 4)
    data = paths.audit_log.read_bytes()
    paths.audit_log.write_bytes(data[:-missing])
    assert_broken_at(log, 4, "truncated or garbled" if missing > 1 else "does not end in a newline")
    event = AuditLog.for_host(paths).append("trust.tofu")
    assert event["event"] == "trust.tofu" and event["seq"] == 5
    lines, before = read_lines(paths.audit_log), data.splitlines(keepends=True)
    assert lines[:3] == before[:3]
    cut = json.loads(lines[3])
    torn = len(before[3]) - missing
    assert (cut["event"], cut["sandbox"], cut["details"], cut["seq"]) == (
        "audit.torn_tail_cut", None, {"bytes": torn}, 4)
    assert log.verify() == VerifyReport(ok=True, events=5)


def test_a_garbled_whole_last_line_still_blocks_appends(log, paths):
    """Not a crash's remains (it ends in a newline): tampering or a damaged disk."""
    fill(log, 3)
    data = paths.audit_log.read_bytes()
    paths.audit_log.write_bytes(data[:-20] + b"x" * 19 + b"\n")
    with pytest.raises(AuditError, match="damaged line"):
        log.append("trust.tofu")
    assert paths.audit_log.read_bytes() == data[:-20] + b"x" * 19 + b"\n"


def test_appends_killed_at_random_instants_leave_a_log_that_verifies(paths):
    """SIGKILL at random instants of appends (between two pages of a write,
    now and then, as a keyring test's kill once landed): whatever a killed
    append leaves, the next one goes on and the whole log verifies."""
    import os
    import random
    import signal
    import time

    rng = random.Random(7)
    big = {"blob": "x" * 20000}  # each line spans several pages
    AuditLog.for_host(paths).append("trust.tofu")
    for _ in range(30):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            try:
                child = AuditLog.for_host(paths)
                while True:
                    os.write(write_fd, b".")
                    child.append("keyring.applied", "web", big)
            finally:
                os._exit(1)
        os.close(write_fd)
        os.read(read_fd, 1)
        time.sleep(rng.uniform(0, 0.004))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_fd)
        AuditLog.for_host(paths).append("trust.tofu")
        report = AuditLog.for_host(paths).verify()
        assert report.ok, report


def test_non_canonical_line_is_detected(log, paths):
    fill(log, 3)
    lines = read_lines(paths.audit_log)
    lines[1] = json.dumps(strictjson.loads(lines[1]), indent=1).replace("\n", "").encode() + b"\n"
    write_lines(paths.audit_log, lines)
    assert_broken_at(log, 2, "canonical")


def test_verify_without_the_key_is_an_error(log, paths):
    fill(log, 2)
    paths.audit_key.unlink()
    with pytest.raises(AuditError, match="audit key .* is missing"):
        log.verify()


def test_append_refuses_to_start_a_new_key_for_an_existing_log(log, paths):
    fill(log, 2)
    paths.audit_key.unlink()
    with pytest.raises(AuditError, match="missing but the audit log has events"):
        AuditLog.for_host(paths).append("trust.tofu")
    assert not paths.audit_key.exists()


# --- append reads only the tail ----------------------------------------------


def test_append_reads_only_the_last_line(log, paths):
    fill(log, 5)
    lines = read_lines(paths.audit_log)
    lines[1] = b"not json at all\n"  # damage an early line only
    write_lines(paths.audit_log, lines)
    event = log.append("trust.tofu")
    assert (event["seq"], event["prev_hash"]) == (6, strictjson.loads(lines[4])["hash"])
    assert_broken_at(log, 2, "truncated or garbled")


def test_append_after_a_line_longer_than_a_read_block(log):
    log.append("keyring.applied", "web", {"blob": "x" * 50_000})
    event = log.append("keyring.applied", "web")
    assert event["seq"] == 2
    assert log.verify().ok


# --- tail --------------------------------------------------------------------


def test_tail_returns_the_latest_events_oldest_first(log):
    assert log.tail() == []
    fill(log, 30)
    assert [e["seq"] for e in log.tail()] == list(range(11, 31))
    assert [e["seq"] for e in log.tail(3)] == [28, 29, 30]
    assert [e["seq"] for e in log.tail(100)] == list(range(1, 31))
    assert log.tail(0) == []


def test_tail_across_read_blocks(log):
    for i in range(40):
        log.append("keyring.applied", "web", {"blob": "y" * (500 + 37 * i)})
    assert [e["seq"] for e in log.tail(25)] == list(range(16, 41))


# --- concurrency -------------------------------------------------------------


def _append_many(log_path: str, key_path: str, worker: int, count: int) -> None:
    log = AuditLog(Path(log_path), Path(key_path))
    for i in range(count):
        log.append("sandbox.started", None, {"worker": worker, "i": i})


def test_concurrent_appends_from_processes_keep_the_chain(paths):
    workers, per_worker = 4, 200
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_append_many,
                    args=(str(paths.audit_log), str(paths.audit_key), w, per_worker))
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=patience.seconds(120))
        assert p.exitcode == 0

    log = AuditLog.for_host(paths)
    report = log.verify()
    assert (report.ok, report.events) == (True, workers * per_worker), report
    events = [strictjson.loads(line) for line in read_lines(paths.audit_log)]
    assert [e["seq"] for e in events] == list(range(1, workers * per_worker + 1))
    for w in range(workers):
        mine = [e["details"]["i"] for e in events if e["details"]["worker"] == w]
        assert mine == list(range(per_worker))
    assert stat.S_IMODE(paths.audit_key.stat().st_mode) == 0o600


# --- CLI ---------------------------------------------------------------------


def run_cli(paths: HostPaths, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tappass_host", "--state-dir", str(paths.state), *args],
        capture_output=True, text=True, timeout=patience.seconds(60),
    )


def test_cli_verify_ok(log, paths):
    result = run_cli(paths, "audit", "verify")
    assert (result.returncode, result.stdout) == (0, "audit log OK: 0 events\n")
    fill(log, 12)
    result = run_cli(paths, "audit", "verify")
    assert (result.returncode, result.stdout, result.stderr) == (0, "audit log OK: 12 events\n", "")
    result = run_cli(paths, "--json", "audit", "verify")
    assert json.loads(result.stdout) == {"ok": True, "events": 12}


def test_cli_verify_broken_prints_one_line(log, paths):
    fill(log, 20)
    lines = read_lines(paths.audit_log)
    lines[16] = lines[16].replace(b'"version":17', b'"version":1')
    write_lines(paths.audit_log, lines)
    result = run_cli(paths, "audit", "verify")
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.startswith("tappass-host: error: audit log broken at line 17: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_cli_verify_missing_key_is_one_line_error(log, paths):
    fill(log, 1)
    paths.audit_key.unlink()
    result = run_cli(paths, "audit", "verify")
    assert result.returncode != 0
    assert result.stderr.startswith("tappass-host: error: cannot verify the audit log")
    assert result.stderr.count("\n") == 1


def test_cli_tail(log, paths):
    fill(log, 5)
    log.append("trust.tofu")
    result = run_cli(paths, "audit", "tail", "-n", "2")
    assert result.returncode == 0, result.stderr
    shown = result.stdout.splitlines()
    assert len(shown) == 2
    assert "#5" in shown[0] and "keyring.applied" in shown[0] and "web" in shown[0]
    assert '{"version":5}' in shown[0]
    assert "#6" in shown[1] and "trust.tofu" in shown[1]

    for args in (("audit", "tail", "--json"), ("--json", "audit", "tail")):
        result = run_cli(paths, *args)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == log.tail(20)
