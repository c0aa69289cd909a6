"""HTTP/1.1 message heads as the egress proxy reads them (RFC 9112).

Requests are read strictly: a line ends with CRLF and nowhere else, and no
control character but a field value's HTAB passes, because the head is
forwarded to a server that may read it differently — a bare LF, a bare CR
or a folded line (obs-fold) can hide a second header or a second request
from this parser and show it to the upstream (request smuggling). Such a
head is refused (400), as RFC 9112 §2.2 and §5.2 allow. Framing the proxy
does not read — both Content-Length and Transfer-Encoding, or several
Content-Lengths — is refused too (§6.3).

The proxy does not keep connections alive: it asks the upstream to close
after one exchange and says so to the agent on the response (§9.6,
`ResponseHeads`), so a client that would reuse its connection opens a new
one instead of writing into a closed one.
"""

import re
import urllib.parse
from dataclasses import dataclass

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HOST = re.compile(r"[A-Za-z0-9._~%!$&'()*+,;=:\[\]-]{1,255}|[^\x00-\x20/?#@]{1,255}")
# Anything in a line but SP, HTAB and printable characters (obs-text included).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_STATUS = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: .*)?")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization",
              "proxy-authenticate", "te", "trailer", "upgrade"}
RESPONSE_HEAD_LIMIT = 64 * 1024


class BadRequest(Exception):
    pass


class BadResponse(Exception):
    pass


@dataclass(frozen=True)
class Request:
    method: str
    host: str
    port: int
    path: str = ""                  # plain HTTP: origin-form target
    headers: tuple[bytes, ...] = ()  # plain HTTP: end-to-end header lines

    @property
    def tunnel(self) -> bool:
        return self.method == "CONNECT"


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise BadRequest(f"bad port {text[:16]!r}")
    return int(text)


def _split_authority(authority: str) -> tuple[str, int]:
    if authority.startswith("["):
        host, sep, rest = authority[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise BadRequest("bad authority")
        return host, _port(rest[1:])
    host, sep, port = authority.rpartition(":")
    if not sep or not host:
        raise BadRequest("CONNECT needs host:port")
    return host, _port(port)


def _fields(lines: list[str]) -> list[tuple[str, str]]:
    fields = []
    for line in lines:
        if line[:1] in (" ", "\t"):
            raise BadRequest("folded header line (obs-fold)")
        if _CONTROL.search(line):
            raise BadRequest("control character, bare CR or bare LF in a header line")
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise BadRequest("bad header line")
        fields.append((name.lower(), value.strip(" \t")))
    return fields


def _check_framing(fields: list[tuple[str, str]]) -> None:
    lengths = [value for name, value in fields if name == "content-length"]
    if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
        raise BadRequest("bad or repeated Content-Length")
    if lengths and any(name == "transfer-encoding" for name, _ in fields):
        raise BadRequest("both Content-Length and Transfer-Encoding")


def _connection_options(fields: list[tuple[str, str]]) -> set[str]:
    """Field names the Connection header makes hop-by-hop (RFC 9110 §7.6.1)."""
    return {option.strip(" \t").lower() for name, value in fields if name == "connection"
            for option in value.split(",")}


def parse_head(head: bytes) -> Request:
    """The request in a head ending with CRLF CRLF; BadRequest if malformed."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("not UTF-8") from None
    lines = text[:-4].split("\r\n")
    if not lines[0].isascii() or _CONTROL.search(lines[0]) or "\t" in lines[0]:
        raise BadRequest("bad request line")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or \
            parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest("bad request line")
    method, target, _ = parts
    fields = _fields(lines[1:])
    _check_framing(fields)
    dropped = HOP_BY_HOP | _connection_options(fields)
    headers = tuple(line.encode("utf-8") for line, (name, _) in zip(lines[1:], fields)
                    if name not in dropped)
    if method == "CONNECT":
        host, port = _split_authority(target)
        path = ""
    else:
        url = urllib.parse.urlsplit(target)
        if url.scheme.lower() != "http" or not url.netloc or "@" in url.netloc:
            raise BadRequest("plain requests need an absolute http:// URI")
        try:
            host, port = url.hostname or "", url.port or 80
        except ValueError:
            raise BadRequest("bad port") from None
        path = urllib.parse.urlunsplit(("", "", url.path or "/", url.query, ""))
    if not host or not _HOST.fullmatch(host):
        raise BadRequest("bad host")
    return Request(method, host, port, path, headers)


class ResponseHeads:
    """The upstream's answer to a forwarded request, passed on with the
    final response head saying `Connection: close` (the upstream's own
    hop-by-hop fields dropped); interim 1xx heads pass as they are. `feed`
    returns what may go to the agent so far; BadResponse when the upstream's
    head is not HTTP/1.x, is folded or exceeds RESPONSE_HEAD_LIMIT."""

    def __init__(self):
        self._pending = bytearray()
        self.forwarded = False  # some of the answer has gone to the agent
        self.done = False       # the final head has gone: the rest is the body

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return data
        self._pending += data
        out = bytearray()
        while not self.done:
            end, width = _head_end(self._pending)
            if end < 0:
                if len(self._pending) > RESPONSE_HEAD_LIMIT:
                    raise BadResponse(f"response head over {RESPONSE_HEAD_LIMIT} bytes")
                self.forwarded = self.forwarded or bool(out)
                return bytes(out)
            lines = [line.rstrip(b"\r") for line in bytes(self._pending[:end]).split(b"\n")]
            del self._pending[:end + width]
            status = _status(lines[0])
            if 100 <= status < 200 and status != 101:
                out += b"\r\n".join(lines) + b"\r\n\r\n"
                continue
            out += _closing(lines)
            self.done = True
        out += self._pending
        self._pending.clear()
        self.forwarded = True
        return bytes(out)


def _head_end(data: bytearray) -> tuple[int, int]:
    """Where the head ends and how long its blank line is; (-1, 0) if not yet.
    A server's bare LF ends lines too (RFC 9112 §2.2 lets a recipient read it so)."""
    blank = _BLANK_LINE.search(data)
    return (blank.start(), blank.end() - blank.start()) if blank else (-1, 0)


def _status(line: bytes) -> int:
    match = _STATUS.fullmatch(line)
    if match is None:
        raise BadResponse("the upstream's answer is not an HTTP/1.x response")
    return int(match.group(1))


def _closing(lines: list[bytes]) -> bytes:
    """The final head: the status line, the end-to-end fields, `Connection: close`."""
    fields = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise BadResponse("the upstream's response head is folded (obs-fold)")
        name, sep, value = line.partition(b":")
        if sep:
            fields.append((line, name.strip().lower().decode("latin-1"),
                           value.decode("latin-1")))
    dropped = HOP_BY_HOP | _connection_options([(name, value) for _, name, value in fields])
    kept = [line for line, name, _ in fields if name not in dropped]
    return b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n"
