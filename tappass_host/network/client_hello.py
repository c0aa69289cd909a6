"""The server name a TLS client asks for (SNI), read from its ClientHello.

A CONNECT to an allowed name reaches that name's addresses, but the TLS
inside the tunnel may ask the server for another name: on a CDN's shared
addresses that is any other site the CDN serves (domain fronting by SNI).
The proxy reads the agent's first flight and refuses a ClientHello whose
server name the policy does not allow.

Wire format (RFC 8446 §4.1.2, RFC 6066 §3): records of
`type(1)=22 version(2) length(2)`, carrying a handshake message
`type(1)=1 length(3)`, then `legacy_version(2) random(32)
session_id<0..32> cipher_suites<2..2^16-2> compression<1..2^8-1>
extensions<8..2^16-1>`; extension 0 holds `server_name_list<1..2^16-1>` of
`name_type(1)=0 host_name<1..2^16-1>`. The message may span records.
"""

import struct

HANDSHAKE = 22
CLIENT_HELLO = 1
SERVER_NAME = 0
HOST_NAME = 0
RECORD_HEADER = 5
MAX_HELLO = 16 * 1024  # bytes of first flight the proxy will hold to read it
ALERT = 21
FATAL = 2
ACCESS_DENIED = 49     # alert descriptions, RFC 8446 §6.2
DECODE_ERROR = 50


class Malformed(ValueError):
    """It starts like a TLS handshake but is not a ClientHello we can read."""


def is_tls(first_byte: int) -> bool:
    return first_byte == HANDSHAKE


def alert(description: int) -> bytes:
    """A fatal TLS alert record, the proxy's answer to a ClientHello it
    refuses: the client reports it (e.g. OpenSSL's "tlsv1 alert access
    denied") instead of a connection closed without a word. Sent before
    any ServerHello, so in plaintext, with the record version TLS 1.2 and
    1.3 both use there (RFC 8446 §5.1)."""
    return struct.pack("!BHHBB", ALERT, 0x0303, 2, FATAL, description)


def needed(data: bytes) -> int:
    """How many more bytes of the first flight it takes to hold the whole
    ClientHello (0: complete). Malformed if it cannot be one."""
    payload, offset = bytearray(), 0
    while True:
        if len(data) - offset < RECORD_HEADER:
            return RECORD_HEADER - (len(data) - offset)
        kind, _, length = struct.unpack_from("!BHH", data, offset)
        if kind != HANDSHAKE or length == 0:
            raise Malformed("not a TLS handshake record")
        offset += RECORD_HEADER
        if offset + length > MAX_HELLO:
            raise Malformed(f"ClientHello over {MAX_HELLO} bytes")
        if len(data) - offset < length:
            return offset + length - len(data)
        payload += data[offset:offset + length]
        offset += length
        if len(payload) >= 4:
            if payload[0] != CLIENT_HELLO:
                raise Malformed("the first handshake message is not a ClientHello")
            if len(payload) >= 4 + int.from_bytes(payload[1:4], "big"):
                return 0


def server_name(data: bytes) -> str | None:
    """The host_name of a complete first flight (see `needed`); None when the
    client sends no SNI. Malformed if the message does not parse."""
    payload = bytearray()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack_from("!H", data, offset + 3)
        payload += data[offset + RECORD_HEADER:offset + RECORD_HEADER + length]
        offset += RECORD_HEADER + length
    try:
        return _server_name(bytes(payload))
    except (IndexError, struct.error, UnicodeDecodeError):
        raise Malformed("truncated ClientHello") from None


def _server_name(message: bytes) -> str | None:
    end = 4 + int.from_bytes(message[1:4], "big")
    body = _Reader(message[4:end])
    body.skip(2 + 32)                  # legacy_version, random
    body.skip(body.int(1))             # legacy_session_id
    body.skip(body.int(2))             # cipher_suites
    body.skip(body.int(1))             # legacy_compression_methods
    if body.done():
        return None                    # no extensions at all
    extensions = _Reader(body.take(body.int(2)))
    names = []
    while not extensions.done():
        kind, data = extensions.int(2), extensions.take(extensions.int(2))
        if kind == SERVER_NAME:
            names.append(_host_name(_Reader(data)))
    if len(names) > 1:
        raise Malformed("more than one server_name extension")
    return names[0] if names else None


def _host_name(extension: "_Reader") -> str:
    entries = _Reader(extension.take(extension.int(2)))
    hosts = []
    while not entries.done():
        kind, value = entries.int(1), entries.take(entries.int(2))
        if kind == HOST_NAME:
            hosts.append(value.decode("ascii"))
    if len(hosts) != 1:
        raise Malformed("a server_name extension must name exactly one host")
    return hosts[0]


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise IndexError("past the end")
        chunk = self.data[self.at:self.at + n]
        self.at += n
        return chunk

    def skip(self, n: int) -> None:
        self.take(n)

    def int(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def done(self) -> bool:
        return self.at >= len(self.data)
