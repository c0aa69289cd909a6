"""HTTP answers from a control plane, read within a size and a time budget.

httpx's `.content` reads a whole body and inflates whatever Content-Encoding
the server chose (httpx asks for gzip and deflate by default): a 510 KiB
gzip answer is 512 MiB in memory before any size check can run. `fetch`
asks for `identity` and reads the body raw as it streams, stopping one byte
past `limit`. A server that encodes all the same has gzip or deflate
inflated under zlib's own output cap; any other encoding is refused. The
whole body must arrive within `deadline_s`: httpx's read timeout is per
read, so a server trickling bytes could otherwise hold the caller forever.

Every caller (keyring pulls and acks, enrollment, certificate renewal) goes
through `fetch`; its failures are `TooLarge` or httpx's own errors, which
the callers already translate.
"""

import itertools
import time
import zlib
from dataclasses import dataclass

from tappass_host.errors import TappassError

LIMIT = 1024 * 1024
DEADLINE_S = 30.0
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class TooLarge(TappassError):
    reason = "too_large"

    def __init__(self, url: str, limit: int):
        super().__init__(f"{url}: the answer is over the {limit}-byte limit; not read further")
        self.limit = limit


@dataclass(frozen=True)
class Answer:
    status_code: int
    headers: object  # httpx.Headers
    content: bytes


def fetch(client, method: str, url: str, *, limit: int = LIMIT, deadline_s: float = DEADLINE_S,
          cut: bool = False, headers: dict | None = None, **kwargs) -> Answer:
    """`client.request(...)`, but its body bounded; see the module doc.

    A body over `limit` raises TooLarge, or with `cut` comes back cut one
    byte past the limit (for a caller whose own checks reject it as such).
    """
    import httpx

    deadline = time.monotonic() + deadline_s
    headers = {**(headers or {}), "Accept-Encoding": "identity"}
    with client.stream(method, url, headers=headers, **kwargs) as response:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit and not cut:
            raise TooLarge(url, limit)
        inflate = _inflater(response.headers.get("content-encoding", "identity"), url)
        body = bytearray()
        for chunk in itertools.chain(response.iter_raw(), [b""]):  # b"": what a decoder holds
            body += inflate(chunk, limit + 1 - len(body))
            if len(body) > limit:
                if cut:
                    break
                raise TooLarge(url, limit)
            if time.monotonic() > deadline:
                raise httpx.ReadTimeout(f"{url}: the answer took over {deadline_s:g} s")
        return Answer(response.status_code, response.headers, bytes(body))


def _inflater(encoding: str, url: str):
    import httpx

    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return lambda chunk, room: chunk[:room]
    if encoding not in _WBITS:
        raise httpx.DecodingError(f"{url}: the answer is {encoding!r}-encoded, "
                                  "which was not asked for")
    decoder = zlib.decompressobj(_WBITS[encoding])

    def inflate(chunk: bytes, room: int) -> bytes:
        try:
            # at most `room` bytes out, so a bomb never inflates past the limit
            return decoder.decompress(chunk, max(room, 1))
        except zlib.error:
            raise httpx.DecodingError(f"{url}: the answer is not valid {encoding}") from None

    return inflate
