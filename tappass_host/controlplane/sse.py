"""Server-sent events read from raw bytes, with a size cap per event.

httpx-sse (and httpx's own line iterator) buffer a line until its newline
and an event until its blank line, however long: a control plane, or
whatever sits in its place, could make the daemon hold gigabytes. Here an
event whose lines add up to more than `limit` bytes stops being buffered the
moment it crosses the limit; the rest of it is skipped as it streams past
and the event comes out as `Oversized` (with its id, if it had one), so the
caller can reject it like any too-large keyring.

Framing per the WHATWG spec: lines end in CRLF, LF or CR; `:` starts a
comment; a blank line dispatches; `id` persists across events.
"""

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

_NEWLINE = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class Message:
    event: str
    id: str
    data: bytes


@dataclass(frozen=True)
class Heartbeat:
    """An event of comments only (the control plane's `: keepalive`)."""


HEARTBEAT = Heartbeat()


@dataclass(frozen=True)
class Oversized:
    id: str
    size: int  # bytes seen before the event ended


class EventReader:
    def __init__(self, limit: int):
        self.limit = limit
        self._buffer = bytearray()
        self._scanned = 0  # the buffer's first bytes known to hold no line end
        self.bytes_scanned = 0  # all bytes searched for line ends: linear in the input
        self._last_id = ""
        self._reset()

    def _reset(self) -> None:
        self._event = ""
        self._data: list[bytes] = []
        self._size = 0
        self._over = False
        self._skipping = False  # inside a line being discarded
        self._comment = False

    def feed(self, chunks: Iterable[bytes]) -> Iterator[Message | Oversized | Heartbeat]:
        for chunk in chunks:
            self._buffer += chunk
            yield from self._lines()

    def _lines(self) -> Iterator[Message | Oversized | Heartbeat]:
        buffer = self._buffer
        while True:
            # a partial line is searched once: each chunk only for its own bytes
            match = _NEWLINE.search(buffer, self._scanned)
            self.bytes_scanned += (len(buffer) if match is None else match.end()) - self._scanned
            if match is None or (match.group() == b"\r" and match.end() == len(buffer)):
                # a trailing CR may be the first half of a CRLF: search it again
                self._scanned = len(buffer) - buffer.endswith(b"\r")
                self._hold_partial()
                return
            line = bytes(buffer[:match.start()])
            del buffer[:match.end()]
            self._scanned = 0
            if self._skipping:
                self._skipping = False
                self._size += len(line)
                continue
            if not line:
                out = self._dispatch()
                if out is not None:
                    yield out
                continue
            self._size += len(line) + 1
            if self._size > self.limit:
                self._over, self._data = True, []
            self._field(line)

    def _hold_partial(self) -> None:
        """An unfinished line: keep it unless it would take the event over the limit."""
        pending = len(self._buffer)
        if not self._skipping and self._size + pending <= self.limit:
            return
        keep_cr = self._buffer.endswith(b"\r")
        self._size += pending
        self._over = self._skipping = True
        self._data = []
        self._buffer.clear()
        self._scanned = 0
        if keep_cr:  # may be the first half of a CRLF
            self._buffer += b"\r"

    def _field(self, line: bytes) -> None:
        if line.startswith(b":"):
            self._comment = True
            return
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data" and not self._over:
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id" and b"\0" not in value:
            self._last_id = value.decode("utf-8", "replace")

    def _dispatch(self) -> Message | Oversized | Heartbeat | None:
        over, size, event, data = self._over, self._size, self._event, self._data
        comment = self._comment
        self._reset()
        if over:
            return Oversized(self._last_id, size)
        if not data:
            # the spec's rule: an event without data is not dispatched
            return HEARTBEAT if comment else None  # the spec's rule: an event without data is not dispatched
        return Message(event or "message", self._last_id, b"\n".join(data))
