"""The egress proxy's connection handling: HTTP CONNECT tunnels and
plain-HTTP forwarding (absolute-form URIs, one exchange per connection:
http1.py), for one sandbox per listening address. In a tunnel, a TLS
ClientHello must ask for a name the policy allows (client_hello.py: no
domain fronting by SNI), else it gets a TLS alert. Every connection asks
the sandbox's keyring store for its policy (KeyringStore.follow: derived
again only when `keyring.json` names another file), so a flipped keyring
decides the very next connection. Answers: 403 denied (name, port or
address), 502 upstream failure, 400 malformed, 408 a request head too slow,
431 a request head too big.
"""

import asyncio
import sys
from dataclasses import dataclass, field

from tappass_host.keyring.store import KeyringStore
from tappass_host.network import client_hello
from tappass_host.network import policy as egress
from tappass_host.network.http1 import BadRequest, BadResponse, Request, ResponseHeads, parse_head
from tappass_host.network.resolver import Resolver

HEAD_LIMIT = 16 * 1024
MAX_CONNECTIONS = 1024      # open at once per sandbox; more are closed at once
CONNECT_TIMEOUT_S = 10.0
FIRST_FLIGHT_TIMEOUT_S = 60.0  # a tunnel where neither side speaks is closed
_REASONS = {200: "Connection established", 400: "Bad Request", 403: "Forbidden",
            408: "Request Timeout", 431: "Request Header Fields Too Large", 502: "Bad Gateway"}
DENY_ALL = egress.Policy((), frozenset(), enabled=False)


@dataclass
class SandboxPolicy:
    """One sandbox's policy, derived again only when its keyring flips."""

    name: str
    keyring: KeyringStore
    connections: set = field(default_factory=set)

    def __post_init__(self):
        self._policy = self.keyring.follow(egress.from_keyring)

    def current(self) -> egress.Policy:
        policy = self._policy.current()
        return DENY_ALL if policy is None else policy


def _response(code: int, message: str = "") -> bytes:
    body = f"tappass-host egress proxy: {message}\n".encode() if message else b""
    head = f"HTTP/1.1 {code} {_REASONS[code]}\r\n"
    if code != 200:
        head += (f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                 "Connection: close\r\n")
    return head.encode() + b"\r\n" + body


class EgressProxy:
    def __init__(self, sandbox_at, resolver: Resolver, denials, header_timeout: float,
                 allow_ports: frozenset[int] = egress.DEFAULT_PORTS):
        self._sandbox_at = sandbox_at    # local address -> SandboxPolicy | None
        self._resolver = resolver
        self._denials = denials          # DenialLog
        self._header_timeout = header_timeout
        self._allow_ports = allow_ports  # config network.allow_ports

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sandbox = self._sandbox_at((writer.get_extra_info("sockname") or ("",))[0])
        if sandbox is not None and len(sandbox.connections) >= MAX_CONNECTIONS:
            sandbox = None
        if sandbox is not None:
            sandbox.connections.add(writer)
        try:
            if sandbox is not None:
                await self._serve(sandbox, reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except Exception as exc:  # noqa: BLE001 - one connection's bug must not spread
            print(f"egress: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            if sandbox is not None:
                sandbox.connections.discard(writer)
            writer.close()

    async def _serve(self, sandbox: SandboxPolicy, reader, writer) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._header_timeout)
        except asyncio.TimeoutError:
            writer.write(_response(408, "request head not received in time"))
            return
        except asyncio.LimitOverrunError:
            writer.write(_response(431, f"request head over {HEAD_LIMIT} bytes"))
            return
        try:
            request = parse_head(head)
        except BadRequest as exc:
            writer.write(_response(400, str(exc)))
            return
        policy = sandbox.current()  # one policy decides the whole connection
        done = asyncio.get_running_loop().create_future()
        upstream = await self._connect(sandbox, policy, request, writer, done)
        if upstream is None:
            return
        try:
            if request.tunnel:
                writer.write(_response(200))
                opening = await self._first_flight(sandbox, policy, request, reader, writer,
                                                   upstream)
                if opening is None:
                    return
                upstream.transport.write(opening)
            else:
                upstream.transport.write(self._forwarded_head(request))
            _splice(reader, writer, upstream, done)
            await done
        finally:
            upstream.transport.close()

    async def _first_flight(self, sandbox: SandboxPolicy, policy: egress.Policy,
                            request: Request, reader, writer,
                            upstream: "_Relay") -> bytes | None:
        """What the agent sends first through the tunnel, to pass on; None
        (close) when it is a TLS ClientHello for a name the policy does not
        allow, after a TLS alert saying so (access_denied; decode_error for
        a hello that cannot be read). A server that speaks first is not TLS:
        nothing to read then."""
        taken = bytearray()

        async def read_hello() -> None:
            taken.extend(await reader.readexactly(1))
            if client_hello.is_tls(taken[0]):
                while more := client_hello.needed(bytes(taken)):
                    taken.extend(await reader.readexactly(more))

        reading = asyncio.ensure_future(read_hello())
        finished, _ = await asyncio.wait({reading, upstream.spoke}, timeout=FIRST_FLIGHT_TIMEOUT_S,
                                         return_when=asyncio.FIRST_COMPLETED)
        if reading not in finished:
            reading.cancel()
            if not upstream.spoke.done():
                return None  # neither side spoke: a dead tunnel
            return None if taken else b""  # a TLS hello held back for a server-first reply
        try:
            reading.result()
        except client_hello.Malformed as exc:
            self._denials.denied(sandbox.name, request.host, egress.TLS_MALFORMED, request.port)
            print(f"egress: {sandbox.name}: {request.host}: {exc}", file=sys.stderr)
            writer.write(client_hello.alert(client_hello.DECODE_ERROR))
            return None
        if not client_hello.is_tls(taken[0]):
            return bytes(taken)
        try:
            name = client_hello.server_name(bytes(taken))
        except client_hello.Malformed:
            self._denials.denied(sandbox.name, request.host, egress.TLS_MALFORMED, request.port)
            writer.write(client_hello.alert(client_hello.DECODE_ERROR))
            return None
        reason = egress.check_server_name(policy, request.host, name)
        if reason is not None:
            self._denials.denied(sandbox.name, name or request.host, reason, request.port)
            writer.write(client_hello.alert(client_hello.ACCESS_DENIED))
            return None
        return bytes(taken)

    async def _connect(self, sandbox: SandboxPolicy, policy: egress.Policy, request: Request,
                       writer, done: asyncio.Future) -> "_Relay | None":
        reason = egress.check_name(policy, request.host) or \
            egress.check_port(self._allow_ports, request.port)
        if reason is None:
            addresses = await self._resolver.resolve(request.host, request.port)
            if not addresses:
                writer.write(_response(502, f"cannot resolve {request.host}"))
                return None
            destination = egress.pick_destination(policy, addresses)
            if isinstance(destination, str):
                reason = destination
        if reason is not None:
            self._denials.denied(sandbox.name, request.host, reason, request.port)
            writer.write(_response(403, f"{request.host} is not allowed ({reason})"))
            return None
        try:
            _, relay = await asyncio.wait_for(asyncio.get_running_loop().create_connection(
                lambda: _Relay(done, upstream=True,
                               answer=None if request.tunnel else ResponseHeads()),
                str(destination), request.port),
                CONNECT_TIMEOUT_S)
            return relay
        except (OSError, asyncio.TimeoutError) as exc:
            problem = "timed out" if isinstance(exc, asyncio.TimeoutError) else \
                (exc.strerror or "failed")
            writer.write(_response(502, f"connecting to {request.host}: {problem}"))
            return None

    @staticmethod
    def _forwarded_head(request: Request) -> bytes:
        """The request in origin form. Host is the URI's authority, whatever
        the agent's own Host said (RFC 9112 §3.2.2): the server allowed is
        the one asked."""
        host = f"[{request.host}]" if ":" in request.host else request.host
        authority = host if request.port == 80 else f"{host}:{request.port}"
        lines = [f"{request.method} {request.path} HTTP/1.1".encode(),
                 f"Host: {authority}".encode()]
        lines += [h for h in request.headers if not h.lower().startswith(b"host:")]
        lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n"


class _Relay(asyncio.Protocol):
    """One side of an established connection: what its transport receives is
    written to the other side's, with flow control both ways. Callbacks, not
    coroutines: the relay is the proxy's hot path."""

    def __init__(self, done: asyncio.Future, upstream: bool, answer: ResponseHeads | None = None):
        self.done = done
        self.upstream = upstream
        self.answer = answer            # plain HTTP: the upstream's response, head rewritten
        self.spoke = done.get_loop().create_future()  # data arrived before join()
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        self._early: list[bytes] = []   # upstream spoke before the agent's side was joined

    def join(self, peer: asyncio.Transport) -> None:
        self.peer = peer
        for data in self._early:
            peer.write(data)
        self._early.clear()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.answer is not None:
            try:
                data = self.answer.feed(data)
            except BadResponse as exc:
                self._bad_answer(str(exc))
                return
            if not data:
                return
        self._pass_on(data)

    def _pass_on(self, data: bytes) -> None:
        if self.peer is None:
            self._early.append(data)
            if not self.spoke.done():
                self.spoke.set_result(None)
        else:
            self.peer.write(data)

    def _bad_answer(self, problem: str) -> None:
        """The upstream's answer cannot be passed on: 502 if the agent has
        had none of it, then close."""
        if not self.answer.forwarded:
            self._pass_on(_response(502, problem))
        self.answer = None
        self.transport.close()

    def eof_received(self) -> bool:
        if self.answer is not None and not self.answer.done:
            self._bad_answer("the upstream closed before a complete response head")
            return True
        if self.upstream:
            return False  # the answer is complete: close, which closes the agent's side
        if self.peer.can_write_eof():
            self.peer.write_eof()  # the agent's half-close, passed on; the answer still comes
        return True

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()

    def connection_lost(self, exc) -> None:
        if self.peer is not None:
            self.peer.close()
        if not self.done.done():
            self.done.set_result(None)


def _splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: _Relay,
            done: asyncio.Future) -> None:
    """Hand the agent's connection from its stream reader (which read the
    request head) to a relay joined with `upstream`."""
    transport = writer.transport
    leftover = bytes(reader._buffer)  # sent after the head, before any answer
    relay = _Relay(done, upstream=False)
    relay.connection_made(transport)
    relay.peer = upstream.transport
    transport.set_protocol(relay)
    if leftover:
        upstream.transport.write(leftover)
    if reader._eof and upstream.transport.can_write_eof():
        upstream.transport.write_eof()  # the agent half-closed already
    upstream.join(transport)
    if transport.is_closing():
        relay.connection_lost(None)
    elif not transport.is_reading():
        transport.resume_reading()
