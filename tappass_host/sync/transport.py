"""The control-plane side of sync (DESIGN §7), as the daemon sees it.

`SyncTransport` is what the daemon needs; `SyncClient` speaks it over HTTPS
with the sandbox's mTLS identity. Every call loads the sandbox record and
builds a fresh TLS context, so a renewed certificate is used from the next
connection on. Failures are typed: `Unreachable` (network, TLS, timeouts),
`Refused` (an HTTP status we did not expect), `Stalled` (no byte, not even a
keepalive, within the keepalive timeout), `AnswerTooLarge` (an ack's answer
over its limit). Answers are read within a size and a time budget, never
inflated past it (tappass_host.responses). The event stream is read as raw
bytes through `sse.EventReader`, which never buffers an event over the
keyring size limit: such an event comes out as `TooLarge`.
"""

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from tappass_host import clock, responses
from tappass_host import sandbox_record
from tappass_host.errors import TappassError
from tappass_host.keyring import MAX_ENVELOPE_BYTES
from tappass_host.paths import HostPaths

CONNECT_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 10.0
# An envelope travels as one `data:` line; the slack covers the other
# fields (`event:`, `id:`) and line ends. Anything bigger is dropped unread.
MAX_EVENT_BYTES = MAX_ENVELOPE_BYTES + 4096
MAX_ACK_ANSWER_BYTES = 64 * 1024  # an ack's answer is 204, empty


class SyncError(TappassError):
    """A sync call failed; `reason` is a short code for logs."""

    reason = "sync_failed"


class Unreachable(SyncError):
    reason = "unreachable"


class Refused(SyncError):
    reason = "refused"

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class Stalled(SyncError):
    reason = "stalled"


class AnswerTooLarge(SyncError):
    """An answer over its size limit, not read past it."""

    reason = "too_large"


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


class SyncTransport(Protocol):
    def pull_latest(self, sandbox: str) -> bytes | None: ...

    def events(self, sandbox: str, last_event_id: int | None,
               on_open: Callable[[], None] | None = None) -> Iterator[Event | TooLarge | Keepalive]: ...

    def ack(self, sandbox: str, policy_version: int, status: str, reason: str | None,
            applied_at: str | None = None) -> None: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


KEEPALIVE = Keepalive()


def _event_id(text: str) -> int | None:
    """An SSE id as the policy_version it claims: up to ten ASCII digits, as
    the keyring schema allows, else unknown (int() would take '+7', ' 7',
    '1_0', non-ASCII digits and a number of any size)."""
    if isinstance(text, str) and text.isascii() and text.isdigit() and len(text) <= 10:
        return int(text)
    return None


class SyncClient:
    """`SyncTransport` over HTTPS + SSE, for one daemon worker (one stream at a time)."""

    def __init__(self, paths: HostPaths, *, keepalive_timeout: float = 45.0,
                 answer_deadline: float = responses.DEADLINE_S):
        self.paths = paths
        self.keepalive_timeout = keepalive_timeout
        self.answer_deadline = answer_deadline
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._aborted = False
        self._requests: tuple[tuple, object] | None = None  # (identity files' stat, client)

    def _client(self, sandbox: str, read_timeout: float):
        import httpx

        from tappass_host.identity.tls import mtls_context

        try:
            context = mtls_context(self.paths, sandbox)
        except (OSError, ValueError) as exc:
            raise Unreachable(f"cannot load {sandbox!r}'s TLS identity: {exc}") from None
        timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S, read=read_timeout)
        return httpx.Client(verify=context, timeout=timeout, trust_env=False)

    def _request_client(self, sandbox: str):
        """A client for pulls and acks, kept (one TLS handshake, then HTTP
        keep-alive) until the sandbox's identity files change: a renewed
        certificate is used from the next request on."""
        sandbox_paths = self.paths.sandbox(sandbox)
        try:
            key = tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in
                        (sandbox_paths.cert.stat(), sandbox_paths.ca.stat()))
        except OSError:
            key = None
        if self._requests is None or self._requests[0] != key or key is None:
            self._drop_request_client()
            self._requests = (key, self._client(sandbox, REQUEST_TIMEOUT_S))
        return self._requests[1]

    def _drop_request_client(self) -> None:
        if self._requests is not None:
            self._requests[1].close()
            self._requests = None

    def _request(self, sandbox: str, method: str, url: str, **kwargs):
        try:
            with _translated(url):
                return responses.fetch(self._request_client(sandbox), method, url,
                                       deadline_s=self.answer_deadline, **kwargs)
        except SyncError:
            self._drop_request_client()  # never reuse a connection that failed
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
        url = self._url(sandbox, "keyring")
        response = self._request(sandbox, "GET", url, limit=MAX_ENVELOPE_BYTES, cut=True)
        if response.status_code == 404:
            return None
        _expect(response, 200, url)
        return response.content

    def events(self, sandbox: str, last_event_id: int | None,
               on_open: Callable[[], None] | None = None) -> Iterator[Event | TooLarge | Keepalive]:
        """`keyring` events, forever; raises SyncError when the stream breaks or ends.

        `on_open` is called once the control plane has accepted the stream.
        """
        from tappass_host.sync.sse import EventReader, Heartbeat, Oversized

        url = self._url(sandbox, "events")
        # identity: a compressed stream would be inflated before any cap applies
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store",
                   "Accept-Encoding": "identity"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        with _translated(url, self.keepalive_timeout), \
                self._client(sandbox, self.keepalive_timeout) as client, \
                client.stream("GET", url, headers=headers) as response:
            _expect(response, 200, url)
            kind = response.headers.get("content-type", "").partition(";")[0].strip()
            if kind != "text/event-stream":
                raise Refused(f"{url}: the control plane answered {kind!r}, not an event stream",
                              response.status_code)
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
        raise Unreachable(f"{url}: the control plane closed the stream")

    def ack(self, sandbox: str, policy_version: int, status: str, reason: str | None,
            applied_at: str | None = None) -> None:
        url = self._url(sandbox, "acks")
        body = {"policy_version": policy_version, "status": status, "reason": reason,
                "applied_at": applied_at
                or clock.now_text("microseconds")}
        response = self._request(sandbox, "POST", url, limit=MAX_ACK_ANSWER_BYTES, json=body)
        _expect(response, 204, url)

    def close(self) -> None:
        """Release the kept connection (pulls and acks)."""
        self._drop_request_client()

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


def _expect(response, status: int, url: str) -> None:
    if response.status_code != status:
        raise Refused(f"{url}: the control plane answered {response.status_code}",
                      response.status_code)


class _translated:
    """Turns httpx's and ssl's exceptions into SyncError."""

    def __init__(self, url: str, keepalive_timeout: float | None = None):
        self.url = url
        self.keepalive_timeout = keepalive_timeout

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        import httpx

        if exc is None or isinstance(exc, (SyncError, GeneratorExit)):
            return False
        if isinstance(exc, responses.TooLarge):
            raise AnswerTooLarge(str(exc)) from None
        if isinstance(exc, httpx.ReadTimeout) and self.keepalive_timeout is not None:
            raise Stalled(f"{self.url}: nothing received for {self.keepalive_timeout:g} s") \
                from None
        if isinstance(exc, (httpx.HTTPError, OSError)):
            raise Unreachable(f"{self.url}: {type(exc).__name__}: {exc}") from None
        return False
