"""The wire to a control plane: the one place that builds an HTTP client, and
the one place that turns what httpx, ssl and the socket raise into the
ControlPlaneError family (errors.py).

A connection verifies TLS against an `ssl.SSLContext` from
tappass_host.identity.tls (the pinned CA; with the sandbox's certificate for
mTLS), or not at all for the one request that fetches the CA to pin.
Proxies and CA bundles named by the environment are ignored: the pinned CA
decides alone. Answers are read through tappass_host.responses, within a
size and a time budget; the event stream is handed over raw, for the
bounded SSE reader (sse.py).
"""

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from tappass_host import responses, strictjson
from tappass_host.controlplane.errors import (
    AnswerTooLarge,
    BadAnswer,
    ControlPlaneError,
    Refused,
    Stalled,
    Unreachable,
    Untrusted,
)


class Connection:
    """An HTTP client with keep-alive for one TLS policy; close it after use."""

    def __init__(self, verify: ssl.SSLContext | bool, *, timeout: float,
                 read_timeout: float | None = None):
        import httpx

        read = timeout if read_timeout is None else read_timeout
        self._client = httpx.Client(verify=verify, trust_env=False,
                                    timeout=httpx.Timeout(timeout, read=read))

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def request(self, method: str, url: str, *, accept: tuple[int, ...] = (200,),
                limit: int = responses.LIMIT, deadline_s: float = responses.DEADLINE_S,
                cut: bool = False, json: dict | None = None) -> responses.Answer:
        """The answer, bounded (see tappass_host.responses), if its status is one
        of `accept`; else Refused."""
        body = {} if json is None else {"json": json}
        with translated(url):
            answer = responses.fetch(self._client, method, url, limit=limit,
                                     deadline_s=deadline_s, cut=cut, **body)
        if answer.status_code not in accept:
            raise refused(method, url, answer.status_code)
        return answer

    def request_json(self, method: str, url: str, *, json: dict) -> dict:
        """A 200 answer holding one JSON object, as a dict; else BadAnswer or Refused."""
        answer = self.request(method, url, json=json)
        try:
            document = strictjson.loads(answer.content)
        except strictjson.StrictJSONError:
            document = None
        if not isinstance(document, dict):
            raise BadAnswer(f"the control plane at {host_of(url)} sent a bad answer: its "
                            "answer is not a JSON object")
        return document

    @contextmanager
    def stream(self, url: str, headers: dict, *, stalled_after: float) -> Iterator[object]:
        """A 200 GET whose body the caller reads raw (`iter_raw`); a read that
        waits over `stalled_after` seconds is Stalled."""
        with translated(url, stalled_after), \
                self._client.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                raise refused("GET", url, response.status_code)
            yield response


def host_of(url: str) -> str:
    """`host:port` of a URL, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{f'[{host}]' if ':' in host else host}:{parts.port or 443}"


def refused(method: str, url: str, status: int) -> Refused:
    return Refused(f"the control plane at {host_of(url)} answered {status} to {method} "
                   f"{urlsplit(url).path}", status)


@contextmanager
def translated(url: str, stalled_after: float | None = None) -> Iterator[None]:
    """Any failure of a call to `url`, as a ControlPlaneError."""
    import httpx

    try:
        yield
    except ControlPlaneError:
        raise
    except responses.TooLarge as exc:
        raise AnswerTooLarge(str(exc)) from None
    except (httpx.HTTPError, OSError) as exc:
        host = host_of(url)
        detail = str(exc) or type(exc).__name__
        rejected = _certificate_rejection(exc)
        if rejected is not None:
            raise Untrusted(f"the TLS certificate of {host} is not issued by the pinned CA "
                            f"({rejected.verify_message}): possible man-in-the-middle") from None
        if isinstance(exc, httpx.ReadTimeout) and stalled_after is not None:
            raise Stalled(f"{host}: nothing received for {stalled_after:g} s on the event "
                          "stream") from None
        if isinstance(exc, httpx.TimeoutException):
            raise Unreachable(f"the control plane at {host} did not answer in time "
                              f"({detail})") from None
        raise Unreachable(f"cannot reach the control plane at {host}: {detail}") from None


def _certificate_rejection(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate check that failed behind `exc`, if one did."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
