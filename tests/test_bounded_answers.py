"""Answers from a hostile control plane are read within a size and a time
budget (issue 10, item 7): keyring pulls (`start`, the daemon), enrollment
(`init`) and certificate renewal.

The hostile server holds a TLS certificate issued under the pinned CA (the
real devplane's), so every check of the TLS identity passes; it answers with
a gzip bomb (about 510 KiB inflating to 512 MiB, sent even though
`identity` is asked for), an oversize identity body without a length, or a
body trickled a byte at a time. Each client runs in its own process, whose
peak RSS (wait4's ru_maxrss) must stay far below what the bomb inflates to:
before the fix, a pull peaked above 1 GiB.
"""

import json
import socket
import ssl
import subprocess
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import patience
from audit_records import read_audit
from daemon_fixture import *  # noqa: F403
from daemon_fixture import AGENT, enroll
from devplane_fixture import ENV, PYTHON, wait_for
from tappass_host import sandbox_record
from tappass_host.devplane import ca as devplane_ca

INFLATED = 512 * 1024 * 1024
# far below the inflated size, well above an interpreter with httpx and cryptography
RSS_CEILING_KIB = 160 * 1024


def _gzip_bomb() -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1024 * 1024)
    return b"".join([*(packer.compress(block) for _ in range(INFLATED // len(block))),
                     packer.flush()])


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = _gzip_bomb()
    assert 400 * 1024 < len(data) < 600 * 1024
    return data


class HostileControlPlane:
    """HTTPS under the devplane's CA; `answers` maps a path suffix to a mode."""

    def __init__(self, devplane, tmp_path: Path, bomb: bytes):
        key, cert = devplane.state.ca.issue_server(["127.0.0.1"])
        (tmp_path / "hostile.key").write_bytes(devplane_ca.key_pem(key))
        (tmp_path / "hostile.crt").write_bytes(devplane_ca.cert_pem(cert))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tmp_path / "hostile.crt", tmp_path / "hostile.key")
        self.ca_pem = devplane.ca_pem
        self.bomb = bomb
        self.answers: dict[str, str] = {}
        self.accept_encodings: list[str | None] = []
        self.paths: list[str] = []
        self.trickled = threading.Event()
        self.released = threading.Event()  # ends the stalled answers
        plane = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                plane.answer(self)

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                plane.answer(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, handler) -> None:
        self.accept_encodings.append(handler.headers.get("accept-encoding"))
        self.paths.append(handler.path)
        mode = next((m for suffix, m in self.answers.items() if handler.path.endswith(suffix)),
                    "missing")
        try:
            getattr(self, f"_{mode}")(handler)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            pass  # the client hung up: what a bounded reader does

    def _send(self, handler, status: int, body: bytes, **headers) -> None:
        handler.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            handler.send_header(name.replace("_", "-"), value)
        handler.end_headers()
        handler.wfile.write(body)

    def _missing(self, handler):
        self._send(handler, 404, b"")

    def _unavailable(self, handler):
        self._send(handler, 503, b"")

    def _closed(self, handler):
        """The connection closed without an answer."""
        handler.close_connection = True

    def _stalled(self, handler):
        """Headers (an event stream's, for the events call), then nothing."""
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Content-Length", "10")
        handler.end_headers()
        handler.wfile.flush()
        self.released.wait(patience.seconds(60))

    def _accepted(self, handler):
        self._send(handler, 204, b"")

    def _ca(self, handler):
        self._send(handler, 200, self.ca_pem, Content_Type="application/x-pem-file")

    def _bomb(self, handler):
        self._send(handler, 200, self.bomb, Content_Encoding="gzip",
                   Content_Type="application/json")

    def _oversize(self, handler):
        """2 MiB of identity body, chunked: no length to refuse it by up front."""
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        piece = b'{"payload":"' + b"A" * (64 * 1024)
        for _ in range(32):
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        handler.wfile.write(b"0\r\n\r\n")

    def _trickle(self, handler):
        """A byte at a time, each well within the client's read timeout, forever."""
        handler.send_response(200)
        handler.send_header("Content-Length", str(1024 * 1024))
        handler.end_headers()
        while True:
            handler.wfile.write(b" ")
            handler.wfile.flush()
            self.trickled.set()
            time.sleep(0.05)

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hostile(devplane, tmp_path, bomb):
    plane = HostileControlPlane(devplane, tmp_path, bomb)
    yield plane
    plane.close()


# A process's ru_maxrss starts from the memory of the process it was forked from
# (exec keeps the high-water mark of the image it replaced), and pytest grows with
# the tests it has run: the client is forked by this small process instead, which
# prints the client's exit status and its own peak RSS from wait4.
MEASURER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.dup2(2, 1)  # the client's stdout joins its stderr; ours carries the figures
    os.execve(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def measured(args: list[str], tmp_path: Path) -> tuple[int, str, int]:
    """Run `args`; its exit code, stderr and peak RSS in KiB (its own, by wait4)."""
    err_path = tmp_path / f"err-{time.monotonic_ns()}"
    with open(err_path, "wb") as err:
        proc = subprocess.run([PYTHON, "-I", "-S", "-c", MEASURER, *args], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=err, env=ENV, check=True)
    code, rss_kib = map(int, proc.stdout.split())
    return code, err_path.read_text(), rss_kib


def _point_at(host, name: str, url: str) -> None:
    record = sandbox_record.load(host.paths, name)
    record = record._replace(sync_url=url)
    sandbox_record.save(host.paths.sandbox(name), record)


PULL = """
import json, sys
from tappass_host.paths import HostPaths
from tappass_host.sync.receive import receive
from tappass_host.controlplane.client import ControlPlaneClient
from tappass_host.controlplane.errors import ControlPlaneError
paths = HostPaths.resolve(sys.argv[1])
client = ControlPlaneClient(paths, **({"answer_deadline": float(sys.argv[3])} if sys.argv[3:] else {}))
try:
    data = client.pull_latest(sys.argv[2])
except ControlPlaneError as exc:
    print(json.dumps({"error": type(exc).__name__, "reason": exc.reason, "message": str(exc)}),
          file=sys.stderr)
    sys.exit(3)
outcome = receive(paths, sys.argv[2], data)  # what the daemon and `start` do with it
print(json.dumps({"bytes": len(data), "status": outcome.status, "reason": outcome.reason}),
      file=sys.stderr)
"""


@pytest.mark.parametrize("mode", ["bomb", "oversize"])
def test_a_pull_stops_past_the_limit_in_bounded_memory(devplane, hostile, host, tmp_path, name,
                                                       mode):
    enroll(devplane, host, name)
    _point_at(host, name, hostile.url)
    hostile.answers["/keyring"] = mode

    code, err, rss_kib = measured([PYTHON, "-c", PULL, str(host.root), name], tmp_path)

    assert code == 0, err
    # read one byte past the limit and no further; rejected by the first rule
    assert json.loads(err.strip().splitlines()[-1]) == {
        "bytes": 1024 * 1024 + 1, "status": "rejected", "reason": "too_large"}
    assert rss_kib < RSS_CEILING_KIB, f"peak RSS {rss_kib} KiB"
    assert hostile.accept_encodings == ["identity"]
    rejected = [e for e in read_audit(host.paths.audit_log) if e["event"] == "keyring.rejected"]
    assert [e["details"]["reason"] for e in rejected] == ["too_large"]


def test_a_trickled_pull_ends_at_its_deadline(devplane, hostile, host, tmp_path, name):
    enroll(devplane, host, name)
    _point_at(host, name, hostile.url)
    hostile.answers["/keyring"] = "trickle"

    code, err, _ = measured([PYTHON, "-c", PULL, str(host.root), name, "1"], tmp_path)

    assert hostile.trickled.is_set()
    assert code == 3, err
    failure = json.loads(err.strip().splitlines()[-1])
    assert failure["reason"] == "unreachable" and "took over 1 s" in failure["message"]


def _start_with_a_bomb(devplane, hostile, host, tmp_path, name, acks: str) -> int:
    """`start` NAME, whose latest keyring is a gzip bomb; its peak RSS in KiB."""
    enroll(devplane, host, name)
    _point_at(host, name, hostile.url)
    hostile.answers.update({"/keyring": "bomb", "/acks": acks})

    code, err, rss_kib = measured(
        [PYTHON, "-m", "tappass_host", "--state-dir", str(host.root), "--config",
         str(host.config), "start", name, "--agent", str(AGENT)], tmp_path)

    assert code != 0
    assert err.count("\n") == 1 and "rejected (too_large)" in err, err
    return rss_kib


def test_start_rejects_an_oversize_latest_keyring_audited_and_acked(devplane, hostile, host,
                                                                    tmp_path, name):
    rss_kib = _start_with_a_bomb(devplane, hostile, host, tmp_path, name, "accepted")
    assert rss_kib < RSS_CEILING_KIB, f"peak RSS {rss_kib} KiB"
    rejected = [e for e in read_audit(host.paths.audit_log) if e["event"] == "keyring.rejected"]
    assert [e["details"]["reason"] for e in rejected] == ["too_large"]
    assert [p.rsplit("/", 1)[1] for p in hostile.paths] == ["keyring", "acks"]
    assert set(hostile.accept_encodings) == {"identity"}


def test_the_daemon_keeps_running_in_bounded_memory(devplane, hostile, host, tmp_path, daemons,
                                                    name):
    enroll(devplane, host, name)
    _point_at(host, name, hostile.url)
    hostile.answers["/keyring"] = "bomb"
    hostile.answers["/acks"] = "accepted"
    daemon = daemons(host)
    daemon.wait_line(f"{name}: rejected policy_version None: too_large")
    rejected = [e for e in read_audit(host.paths.audit_log) if e["event"] == "keyring.rejected"]
    assert [e["details"]["reason"] for e in rejected] == ["too_large"]
    wait_for(lambda: any(p.endswith("/acks") for p in hostile.paths))
    # then on to the event stream (404 here): retried with backoff, the daemon stays up
    wait_for(lambda: sum(p.endswith("/events") for p in hostile.paths) >= 2)
    assert daemon.proc.poll() is None
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
    peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    assert peak < RSS_CEILING_KIB, f"the daemon peaked at {peak} KiB"
    assert set(hostile.accept_encodings) == {"identity"}


@pytest.mark.parametrize("where", ["/v1/enroll/ca", "/v1/enroll/challenge"])
def test_enrollment_answers_are_bounded(devplane, hostile, host, tmp_path, name, where):
    """The CA is fetched before TLS is pinned; the challenge after, from a server
    whose certificate the pinned CA issued: both are read within the limit."""
    hostile.answers.update({"/v1/enroll/ca": "ca", where: "bomb"})
    url = devplane.state.issue_bootstrap(name, 900, hostile.url)

    code, err, rss_kib = measured(
        [PYTHON, "-m", "tappass_host", "--state-dir", str(host.root), "--config",
         str(host.config), "init", name, "--enroll-url", url, "--trust-key",
         devplane.trust_key], tmp_path)

    assert code != 0 and err.count("\n") == 1 and "1048576-byte limit" in err, err
    assert rss_kib < RSS_CEILING_KIB, f"peak RSS {rss_kib} KiB"
    failed = [e for e in read_audit(host.paths.audit_log) if e["event"] == "enroll.failed"]
    assert [e["details"]["reason"] for e in failed] == ["too_large"]
    assert not host.paths.sandbox(name).root.exists()
    assert set(hostile.accept_encodings) == {"identity"}


RENEW = """
import sys
from tappass_host.paths import HostPaths
from tappass_host.identity.certs import renew_certificate
from tappass_host.identity.errors import RenewalError
try:
    renew_certificate(HostPaths.resolve(sys.argv[1]), sys.argv[2])
except RenewalError as exc:
    print(exc.reason, exc, file=sys.stderr)
    sys.exit(3)
"""


def test_a_renewal_answer_is_bounded_and_the_certificate_kept(devplane, hostile, host, tmp_path,
                                                              name):
    enroll(devplane, host, name)
    _point_at(host, name, hostile.url)
    hostile.answers["/certificate"] = "bomb"
    before = host.paths.sandbox(name).cert.read_bytes()

    code, err, rss_kib = measured([PYTHON, "-c", RENEW, str(host.root), name], tmp_path)

    assert code == 3 and err.startswith("too_large "), err
    assert rss_kib < RSS_CEILING_KIB, f"peak RSS {rss_kib} KiB"
    assert host.paths.sandbox(name).cert.read_bytes() == before
    failed = [e for e in read_audit(host.paths.audit_log) if e["event"] == "cert.renewal_failed"]
    assert [e["details"]["reason"] for e in failed] == ["too_large"]
    assert hostile.accept_encodings == ["identity"]


def _closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"https://127.0.0.1:{probe.getsockname()[1]}"


def _calls(paths, name: str, ca_pem: bytes, origin: str) -> dict:
    """Every call of the control-plane client; the sandbox's record points at `origin`."""
    from tappass_host.controlplane.client import ControlPlaneClient, Enrollment, fetch_ca

    sandbox = ControlPlaneClient(paths, timeout=1, keepalive_timeout=1)
    return {
        "/v1/enroll/ca": lambda: fetch_ca(origin, timeout=1),
        "/v1/enroll/challenge": lambda: Enrollment(origin, ca_pem, timeout=1).challenge("t"),
        "/v1/enroll/complete": lambda: Enrollment(origin, ca_pem, timeout=1).complete(
            "t", "n", b"csr", "pop"),
        "/keyring": lambda: sandbox.pull_latest(name),
        "/events": lambda: next(iter(sandbox.events(name, None))),
        "/acks": lambda: sandbox.ack(name, 1, "applied", None),
        "/certificate": lambda: sandbox.renew_certificate(name, b"csr"),
    }


def test_every_call_fails_the_same_way_for_the_same_fault(devplane, hostile, host, name):
    """One translation for every endpoint (issue 11 item 4): a server that
    refuses the connection, closes it unanswered, stalls after its headers,
    answers 503, or answers too much gives each call the same error of the
    ControlPlaneError family, with the same reason."""
    from tappass_host.controlplane import errors

    enroll(devplane, host, name)
    expected = {"refused": errors.Unreachable, "closed": errors.Unreachable,
                "stalled": errors.Unreachable, "unavailable": errors.Refused,
                "oversize": errors.AnswerTooLarge}
    seen = {}
    for fault, error in expected.items():
        origin = _closed_port() if fault == "refused" else hostile.url
        _point_at(host, name, origin)
        for path, call in _calls(host.paths, name, devplane.ca_pem, origin).items():
            hostile.answers = {path: fault}
            if fault == "oversize" and path in ("/keyring", "/events"):
                continue  # cut and rejected as a keyring: the tests above
            # the stream's own timeout: no byte, not even a keepalive
            want = errors.Stalled if (fault, path) == ("stalled", "/events") else error
            with pytest.raises(errors.ControlPlaneError) as raised:
                call()
            seen[fault, path] = raised.value.reason
            assert type(raised.value) is want, (fault, path, raised.value)
            assert "\n" not in str(raised.value)
    assert {reason for (fault, _), reason in seen.items() if fault == "unavailable"} == {"refused"}
    assert {reason for (fault, _), reason in seen.items() if fault == "oversize"} == {"too_large"}
    assert len(seen) == 5 * 7 - 2


def test_a_pull_at_start_keeps_an_ack_it_could_not_send_for_the_daemon(devplane, hostile, host,
                                                                       tmp_path, daemons, name):
    """`start`'s pull delivers like the daemon (issue 11 item 4): an ack the
    control plane does not take is kept in unacked.json, and the daemon sends
    it on its first pull."""
    _start_with_a_bomb(devplane, hostile, host, tmp_path, name, "unavailable")
    unacked = json.loads(host.paths.sandbox(name).unacked.read_bytes())
    assert {k: unacked[k] for k in ("policy_version", "status", "reason")} == {
        "policy_version": 0, "status": "rejected", "reason": "too_large"}
    hostile.answers["/acks"] = "accepted"
    daemon = daemons(host)
    daemon.wait_line(f"{name}: ack of policy_version 0 sent on retry")
    assert not host.paths.sandbox(name).unacked.exists()
