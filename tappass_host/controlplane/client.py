"""The host's one client of a control plane: every endpoint of DESIGN §5
(enrollment) and §7 (sync, acks, certificate renewal).

- `fetch_ca`: the control plane's CA, the one request made without verifying
  TLS; enrollment checks it against the bootstrap's signed pin.
- `Enrollment`: challenge and complete, TLS pinned to that CA.
- `ControlPlaneClient`: a sandbox's calls over mTLS, against its `sync_url`:
  the latest keyring, the event stream, acks, a new certificate. It is the
  `SyncTransport` the daemon's workers and `start`'s one-time pull use.

Connections and the translation of failures into the ControlPlaneError
family live in connection.py. Checking what the answers mean (the pin, the
certificate, the keyring) is for the callers: tappass_host.identity and
tappass_host.sync.
"""

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from tappass_host import clock, responses, sandbox_record
from tappass_host.controlplane.connection import Connection, host_of
from tappass_host.controlplane.errors import ControlPlaneError, NoIdentity, Refused, Unreachable
from tappass_host.controlplane.sse import EventReader, Heartbeat, Oversized
from tappass_host.identity.tls import mtls_context, pinned_context
from tappass_host.keyring import MAX_ENVELOPE_BYTES
from tappass_host.paths import HostPaths

CA_PATH = "/v1/enroll/ca"
CHALLENGE_PATH = "/v1/enroll/challenge"
COMPLETE_PATH = "/v1/enroll/complete"
REQUEST_TIMEOUT_S = 10.0
# An envelope travels as one `data:` line; the slack covers the other
# fields (`event:`, `id:`) and line ends. Anything bigger is dropped unread.
MAX_EVENT_BYTES = MAX_ENVELOPE_BYTES + 4096
MAX_ACK_ANSWER_BYTES = 64 * 1024  # an ack's answer is 204, empty


def fetch_ca(origin: str, *, timeout: float = REQUEST_TIMEOUT_S) -> bytes:
    """`GET /v1/enroll/ca` without verifying TLS: the caller checks the
    answer against the bootstrap's signed pin before anything is sent."""
    with Connection(False, timeout=timeout) as connection:
        return connection.request("GET", origin + CA_PATH).content


class Enrollment:
    """The enrollment endpoints at a bootstrap's origin, TLS pinned to `ca_pem`."""

    def __init__(self, origin: str, ca_pem: bytes, *, timeout: float = REQUEST_TIMEOUT_S):
        self.origin = origin
        self._connection = Connection(pinned_context(ca_pem), timeout=timeout)

    def __enter__(self) -> "Enrollment":
        return self

    def __exit__(self, *exc) -> None:
        self._connection.close()

    def challenge(self, token: str) -> dict:
        return self._connection.request_json("POST", self.origin + CHALLENGE_PATH,
                                             json={"token": token})

    def complete(self, token: str, nonce: str, csr_pem: bytes, pop: str) -> dict:
        return self._connection.request_json("POST", self.origin + COMPLETE_PATH, json={
            "token": token, "nonce": nonce, "csr_pem": csr_pem.decode("ascii"), "pop": pop})


@dataclass(frozen=True)
class Event:
    """One `keyring` event: the SSE id (the claimed policy_version) and the envelope."""

    id: int | None
    data: bytes


@dataclass(frozen=True)
class Keepalive:
    """The control plane's keepalive: the stream is alive, nothing to apply."""


@dataclass(frozen=True)
class TooLarge:
    """A `keyring` event over MAX_EVENT_BYTES, skipped unread: `size` bytes so far."""

    id: int | None
    size: int


KEEPALIVE = Keepalive()


class SyncTransport(Protocol):
    """What the daemon's worker and `start`'s pull need; tests give their own."""

    def pull_latest(self, sandbox: str) -> bytes | None: ...

    def events(self, sandbox: str, last_event_id: int | None,
               on_open: Callable[[], None] | None = None) -> Iterator[Event | TooLarge | Keepalive]: ...

    def ack(self, sandbox: str, policy_version: int, status: str, reason: str | None,
            applied_at: str | None = None) -> None: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


def _event_id(text: str) -> int | None:
    """An SSE id as the policy_version it claims: up to ten ASCII digits, as
    the keyring schema allows, else unknown (int() would take '+7', ' 7',
    '1_0', non-ASCII digits and a number of any size)."""
    if isinstance(text, str) and text.isascii() and text.isdigit() and len(text) <= 10:
        return int(text)
    return None


class ControlPlaneClient:
    """A sandbox's calls over mTLS, for one thread (one stream at a time).

    Every connection is built with a fresh TLS context from the sandbox's
    identity files, so a renewed certificate is used from the next
    connection on. The event stream is read as raw bytes through
    `sse.EventReader`, which never buffers an event over MAX_EVENT_BYTES:
    such an event comes out as `TooLarge`.
    """

    def __init__(self, paths: HostPaths, *, timeout: float = REQUEST_TIMEOUT_S,
                 keepalive_timeout: float = 45.0,
                 answer_deadline: float = responses.DEADLINE_S):
        self.paths = paths
        self.timeout = timeout
        self.keepalive_timeout = keepalive_timeout
        self.answer_deadline = answer_deadline
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._aborted = False
        self._requests: tuple[tuple | None, Connection] | None = None  # (identity files, kept)

    def _connect(self, sandbox: str, read_timeout: float | None = None) -> Connection:
        try:
            context = mtls_context(self.paths, sandbox)
        except FileNotFoundError as exc:
            raise NoIdentity(f"cannot load {sandbox!r}'s TLS identity: {exc.filename} is "
                             "missing") from None
        except (OSError, ValueError) as exc:
            raise NoIdentity(f"cannot load {sandbox!r}'s TLS identity: {exc}") from None
        return Connection(context, timeout=self.timeout, read_timeout=read_timeout)

    def _kept(self, sandbox: str) -> Connection:
        """The connection for pulls and acks, kept (one TLS handshake, then
        HTTP keep-alive) until the sandbox's identity files change."""
        sandbox_paths = self.paths.sandbox(sandbox)
        try:
            key = tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in
                        (sandbox_paths.cert.stat(), sandbox_paths.ca.stat()))
        except OSError:
            key = None
        if self._requests is None or self._requests[0] != key or key is None:
            self.close()
            self._requests = (key, self._connect(sandbox))
        return self._requests[1]

    def _request(self, sandbox: str, method: str, endpoint: str, **kwargs):
        url = self._url(sandbox, endpoint)
        try:
            return self._kept(sandbox).request(method, url, deadline_s=self.answer_deadline,
                                               **kwargs)
        except ControlPlaneError:
            self.close()  # never reuse a connection that failed
            raise

    def _url(self, sandbox: str, endpoint: str) -> str:
        record = sandbox_record.load(self.paths, sandbox)
        return f"{record.sync_url}/v1/sandboxes/{record.sandbox_id}/{endpoint}"

    def pull_latest(self, sandbox: str) -> bytes | None:
        """The latest envelope the control plane holds, or None if it has none yet.

        An envelope over the size limit comes back cut one byte past it, never
        read further: the verifier's first rule rejects it as `too_large`,
        audited and acked like any rejection.
        """
        answer = self._request(sandbox, "GET", "keyring", accept=(200, 404),
                               limit=MAX_ENVELOPE_BYTES, cut=True)
        return None if answer.status_code == 404 else answer.content

    def events(self, sandbox: str, last_event_id: int | None,
               on_open: Callable[[], None] | None = None) -> Iterator[Event | TooLarge | Keepalive]:
        """`keyring` events, forever; raises ControlPlaneError when the stream
        breaks or ends. `on_open` is called once the control plane has
        accepted the stream."""
        url = self._url(sandbox, "events")
        # identity: a compressed stream would be inflated before any cap applies
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store",
                   "Accept-Encoding": "identity"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        with self._connect(sandbox, self.keepalive_timeout) as connection, \
                connection.stream(url, headers, stalled_after=self.keepalive_timeout) as response:
            kind = response.headers.get("content-type", "").partition(";")[0].strip()
            if kind != "text/event-stream":
                raise Refused(f"the control plane at {host_of(url)} answered {kind!r}, not an "
                              "event stream", response.status_code)
            self._hold(response)
            try:
                if on_open is not None:
                    on_open()
                for sse in EventReader(MAX_EVENT_BYTES).feed(response.iter_raw()):
                    if isinstance(sse, Oversized):
                        yield TooLarge(_event_id(sse.id), sse.size)
                    elif isinstance(sse, Heartbeat):
                        yield KEEPALIVE
                    elif sse.event == "keyring":
                        yield Event(_event_id(sse.id), sse.data)
            finally:
                self._release()
        raise Unreachable(f"the control plane at {host_of(url)} closed the event stream")

    def ack(self, sandbox: str, policy_version: int, status: str, reason: str | None,
            applied_at: str | None = None) -> None:
        body = {"policy_version": policy_version, "status": status, "reason": reason,
                "applied_at": applied_at or clock.now_text("microseconds")}
        self._request(sandbox, "POST", "acks", accept=(204,), limit=MAX_ACK_ANSWER_BYTES,
                      json=body)

    def renew_certificate(self, sandbox: str, csr_pem: bytes) -> dict:
        """`POST …/certificate`: the answer, a JSON object; its certificate is
        for the caller to check (tappass_host.identity.certs)."""
        url = self._url(sandbox, "certificate")
        with self._connect(sandbox) as connection:
            return connection.request_json("POST", url,
                                           json={"csr_pem": csr_pem.decode("ascii")})

    def close(self) -> None:
        """Release the kept connection (pulls and acks)."""
        if self._requests is not None:
            self._requests[1].close()
            self._requests = None

    def abort(self) -> None:
        """Break the open stream, from another thread: its reader wakes up at once."""
        with self._lock:
            self._aborted = True
            if self._socket is not None:
                try:
                    self._socket.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _hold(self, response) -> None:
        stream = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        with self._lock:
            self._socket = sock
            aborted = self._aborted
        if aborted:
            self.abort()

    def _release(self) -> None:
        with self._lock:
            self._socket = None
