"""The devplane's HTTPS server: the control-plane side of DESIGN §5 and §7.

Enrollment (no client certificate):
    GET  /v1/enroll/ca                       the CA, PEM
    POST /v1/enroll/challenge {token}        -> {nonce}
    POST /v1/enroll/complete  {token, nonce, csr_pem, pop}
                                             -> {sandbox_id, spiffe_id, cert_pem, ca_pem,
                                                 sync_url, signing_keys, threshold}
    Token checks, in order: 400 malformed, 401 bad signature, 404 unknown,
    410 consumed, 403 expired.

Sandbox endpoints (mTLS: 401 without a client certificate, 403 with the
certificate of another sandbox):
    GET  /v1/sandboxes/{id}/keyring          200 latest envelope | 404
    GET  /v1/sandboxes/{id}/events           SSE: event keyring, id <policy_version>
    POST /v1/sandboxes/{id}/acks             204
    GET  /v1/sandboxes/{id}/acks             {"acks": [...]}, for tests and demos
    POST /v1/sandboxes/{id}/certificate      {csr_pem} -> {cert_pem, ca_pem}

Administration:
    POST /v1/admin/rescan                    204; re-read published keyrings and push
                                             new ones to open streams. It carries no
                                             data (publishing writes the state
                                             directory), so it needs no credentials.

One thread per connection; each event stream is a thread waiting on the
hub's condition, woken by a publish or by its keepalive timer.
"""

import re
import secrets
import signal
import socket
import ssl
import sys
import threading
import time
import traceback
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tappass_host import strictjson
from tappass_host.devplane.ca import cert_pem
from tappass_host.devplane.state import TRUST_DOMAIN, DevplaneState, Published, utc_text
from tappass_host.identity import bootstrap as bootstraps
from tappass_host.identity.certs import spiffe_ids, verify_proof_of_possession
from tappass_host.identity.errors import BadBootstrap

KEEPALIVE_S = 15.0
CERT_TTL_S = 24 * 3600
CHALLENGE_TTL_S = 300
HANDSHAKE_TIMEOUT_S = 10
IDLE_TIMEOUT_S = 30
MAX_ENROLL_BODY = 64 * 1024
MAX_BODY = 2 * 1024 * 1024


class Refusal(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code


class Hub:
    """Where publishes meet event streams: the keyring history of every sandbox."""

    def __init__(self, state: DevplaneState):
        self.state = state
        self.stopping = False
        self._changed = threading.Condition()
        self._history: dict[str, list[Published]] = {}

    def rescan(self) -> None:
        with self._changed:
            changed = False
            for folder in (self.state.root / "keyrings").iterdir():
                known = self._history.setdefault(folder.name, [])
                new = self.state.keyrings(folder.name, after_seq=known[-1].seq if known else 0)
                known.extend(new)
                changed = changed or bool(new)
            if changed:
                self._changed.notify_all()

    def latest(self, sandbox_id: str) -> Published | None:
        with self._changed:
            history = self._history.get(sandbox_id)
            return history[-1] if history else None

    def _after(self, sandbox_id: str, seq: int) -> list[Published]:
        return [p for p in self._history.get(sandbox_id, ()) if p.seq > seq]

    def wait_after(self, sandbox_id: str, seq: int, timeout: float) -> list[Published]:
        """Keyrings published after `seq`, waiting up to `timeout` for one."""
        with self._changed:
            self._changed.wait_for(lambda: self.stopping or self._after(sandbox_id, seq), timeout)
            return self._after(sandbox_id, seq)

    def stop(self) -> None:
        with self._changed:
            self.stopping = True
            self._changed.notify_all()


class Challenges:
    """Nonces handed out by `challenge`, each good for one `complete`."""

    def __init__(self, ttl: float = CHALLENGE_TTL_S):
        self.ttl = ttl
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], float] = {}

    def issue(self, jti: str) -> str:
        nonce = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._open = {k: t for k, t in self._open.items() if t > now}
            self._open[(bootstraps.jti_hash(jti), nonce)] = now + self.ttl
        return nonce

    def take(self, jti: str, nonce: str) -> bool:
        with self._lock:
            expiry = self._open.pop((bootstraps.jti_hash(jti), nonce), None)
        return expiry is not None and expiry > time.monotonic()


def _ec_csr(text: object) -> x509.CertificateSigningRequest:
    if not isinstance(text, str):
        raise Refusal(400, "malformed", "csr_pem must be a string")
    try:
        csr = x509.load_pem_x509_csr(text.encode("ascii"))
    except (ValueError, UnicodeError):
        raise Refusal(400, "malformed", "csr_pem is not a PEM CSR") from None
    key = csr.public_key()
    if not csr.is_signature_valid or not isinstance(key, ec.EllipticCurvePublicKey) \
            or key.curve.name != "secp256r1":
        raise Refusal(400, "malformed", "the CSR must be self-signed by an ECDSA P-256 key")
    return csr


def _redacted(path: str) -> str:
    if path.startswith(bootstraps.ENROLL_PATH) and \
            path[len(bootstraps.ENROLL_PATH):] not in ("ca", "challenge", "complete"):
        return bootstraps.ENROLL_PATH + "<token>"
    return path


SANDBOX = r"/v1/sandboxes/(?P<sid>[A-Za-z0-9_-][A-Za-z0-9_.-]*)"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tappass-devplane"
    sys_version = ""
    server: "DevplaneServer"

    ROUTES = [
        ("GET", "/v1/enroll/ca", "enroll_ca"),
        ("POST", "/v1/enroll/challenge", "enroll_challenge"),
        ("POST", "/v1/enroll/complete", "enroll_complete"),
        ("GET", SANDBOX + "/keyring", "keyring"),
        ("GET", SANDBOX + "/events", "events"),
        ("POST", SANDBOX + "/acks", "add_ack"),
        ("GET", SANDBOX + "/acks", "list_acks"),
        ("POST", SANDBOX + "/certificate", "renew"),
        ("POST", "/v1/admin/rescan", "rescan"),
    ]

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        self._raw_body = None
        try:
            # Read the body before anything can refuse the request: closing a
            # socket with unread data makes the client see a reset, not our answer.
            if method == "POST":
                self._raw_body = self._read_body()
            matched = False
            for route_method, pattern, action in self.ROUTES:
                match = re.fullmatch(pattern, path)
                if match:
                    matched = True
                    if route_method == method:
                        return getattr(self, action)(**match.groupdict())
            if matched:
                raise Refusal(405, "method_not_allowed", f"{method} is not allowed here")
            raise Refusal(404, "not_found", "no such endpoint")
        except Refusal as refusal:
            self._json(refusal.status, {"error": refusal.code, "message": str(refusal)})
        except OSError:
            self.close_connection = True
        except Exception:  # noqa: BLE001 - answer 500 rather than drop the connection
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            self._json(500, {"error": "internal", "message": "internal error"})

    # -- plumbing -----------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json"):
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if status != 204:
            self.wfile.write(body)

    def _json(self, status: int, doc) -> None:
        self._send(status, strictjson.canonical(doc))

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit():
            self.close_connection = True
            raise Refusal(400, "malformed", "Content-Length is not a number")
        if int(length) > MAX_BODY:
            self.close_connection = True
            raise Refusal(413, "too_large", f"the body is over {MAX_BODY} bytes")
        return self.rfile.read(int(length))

    def _body(self, limit: int) -> dict:
        if len(self._raw_body) > limit:
            raise Refusal(413, "too_large", f"the body is over {limit} bytes")
        try:
            doc = strictjson.loads(self._raw_body)
        except strictjson.StrictJSONError:
            raise Refusal(400, "malformed", "the body is not strict JSON") from None
        if not isinstance(doc, dict):
            raise Refusal(400, "malformed", "the body must be a JSON object")
        return doc

    def _sandbox(self, sid: str) -> tuple[dict, x509.Certificate]:
        """mTLS: the caller's certificate must carry this sandbox's SPIFFE id."""
        der = self.connection.getpeercert(binary_form=True)
        if not der:
            raise Refusal(401, "no_client_certificate", "this endpoint needs the sandbox's "
                                                        "client certificate")
        cert = x509.load_der_x509_certificate(der)
        record = self.server.state.sandbox(sid)
        if record is None or record["spiffe_id"] not in spiffe_ids(cert):
            raise Refusal(403, "forbidden", "the client certificate is not this sandbox's")
        return record, cert

    def _bootstrap(self, text: object) -> bootstraps.Token:
        """The token checks of DESIGN §5, in their order: 400, 401, 404, 410, 403."""
        state = self.server.state
        if not isinstance(text, str):
            raise Refusal(400, "malformed", "token must be a string")
        try:
            token = bootstraps.decode(text)
            bootstraps.check_signature(token, state.trust_key)
        except BadBootstrap as exc:
            if exc.reason == "bad_signature":
                raise Refusal(401, "bad_signature", "the bootstrap is not signed by this "
                                                    "control plane") from None
            raise Refusal(400, "malformed", "the bootstrap token is malformed") from None
        jti = token.claims.jti
        if state.bootstrap(jti) is None:
            raise Refusal(404, "unknown", "this control plane did not issue the bootstrap")
        if state.is_consumed(jti):
            raise Refusal(410, "consumed", "the bootstrap was already consumed")
        if time.time() > token.claims.exp + bootstraps.CLOCK_SKEW_S:
            raise Refusal(403, "expired", "the bootstrap has expired")
        return token

    # -- enrollment ------------------------------------------------------------------

    def enroll_ca(self) -> None:
        self._send(200, self.server.state.ca.pem, "application/x-pem-file")

    def enroll_challenge(self) -> None:
        token = self._bootstrap(self._body(MAX_ENROLL_BODY).get("token"))
        self._json(200, {"nonce": self.server.challenges.issue(token.claims.jti)})

    def enroll_complete(self) -> None:
        body = self._body(MAX_ENROLL_BODY)
        if not isinstance(body.get("nonce"), str) or not isinstance(body.get("pop"), str):
            raise Refusal(400, "malformed", "nonce and pop must be strings")
        csr = _ec_csr(body.get("csr_pem"))
        token = self._bootstrap(body.get("token"))
        claims, state = token.claims, self.server.state
        if not self.server.challenges.take(claims.jti, body["nonce"]):
            raise Refusal(401, "bad_challenge", "the nonce is unknown, used or expired")
        if not verify_proof_of_possession(csr.public_key(), claims.jti, body["nonce"],
                                          body["pop"]):
            raise Refusal(401, "bad_pop", "the proof of possession does not verify")
        if not state.burn(claims.jti):
            raise Refusal(410, "consumed", "the bootstrap was already consumed")
        sandbox_id = "sbx_" + secrets.token_hex(6)
        spiffe_id = f"spiffe://{TRUST_DOMAIN}/org/{claims.org_id}/sandbox/{sandbox_id}"
        cert = state.ca.issue_client(csr, spiffe_id, self.server.cert_ttl)
        state.add_sandbox({
            "sandbox_id": sandbox_id, "name": claims.sandbox_spec_ref, "org_id": claims.org_id,
            "spiffe_id": spiffe_id, "created_at": utc_text(time.time()),
            "bootstrap": "sha256:" + claims.jti_hash,
        })
        self._json(200, {
            "sandbox_id": sandbox_id, "spiffe_id": spiffe_id,
            "cert_pem": cert_pem(cert).decode("ascii"), "ca_pem": state.ca.pem.decode("ascii"),
            "sync_url": self.server.url, "signing_keys": [state.trust_key], "threshold": 1,
        })

    # -- sync --------------------------------------------------------------------------

    def keyring(self, sid: str) -> None:
        self._sandbox(sid)
        self.server.hub.rescan()
        latest = self.server.hub.latest(sid)
        if latest is None:
            raise Refusal(404, "no_keyring", "no keyring has been published for this sandbox")
        self._send(200, latest.envelope)

    def events(self, sid: str) -> None:
        self._sandbox(sid)
        try:
            last_id = int(self.headers.get("Last-Event-ID", ""))
        except ValueError:
            last_id = None
        hub = self.server.hub
        hub.rescan()
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        latest = hub.latest(sid)
        seen = latest.seq if latest else 0
        if latest and (last_id is None or latest.policy_version > last_id):
            self._event(latest)
        while not hub.stopping:
            newer = hub.wait_after(sid, seen, self.server.keepalive)
            for published in newer:
                self._event(published)
                seen = published.seq
            if not newer and not hub.stopping:
                self.wfile.write(b": keepalive\n\n")

    def _event(self, published: Published) -> None:
        lines = [b"event: keyring", b"id: %d" % published.policy_version]
        lines += [b"data: " + line for line in published.envelope.splitlines() or [b""]]
        self.wfile.write(b"\n".join(lines) + b"\n\n")

    def add_ack(self, sid: str) -> None:
        _, cert = self._sandbox(sid)
        ack = self._body(MAX_ENROLL_BODY)
        if type(ack.get("policy_version")) is not int \
                or ack.get("status") not in ("applied", "rejected"):
            raise Refusal(400, "malformed", "an ack needs an integer policy_version and a "
                                            "status of applied or rejected")
        ack["received_at"] = utc_text(time.time())
        ack["cert_serial"] = format(cert.serial_number, "x")
        self.server.state.add_ack(sid, ack)
        self._send(204)

    def list_acks(self, sid: str) -> None:
        self._sandbox(sid)
        self._json(200, {"acks": self.server.state.acks(sid)})

    def renew(self, sid: str) -> None:
        record, _ = self._sandbox(sid)
        csr = _ec_csr(self._body(MAX_ENROLL_BODY).get("csr_pem"))
        ca = self.server.state.ca
        cert = ca.issue_client(csr, record["spiffe_id"], self.server.cert_ttl)
        self._json(200, {"cert_pem": cert_pem(cert).decode("ascii"),
                         "ca_pem": ca.pem.decode("ascii")})

    def rescan(self) -> None:
        self.server.hub.rescan()
        self._send(204)

    # -- logging: never the token in a bootstrap URL -------------------------------------

    def log_request(self, code="-", size="-") -> None:
        if self.server.verbose:
            sys.stderr.write(f"{self.address_string()} {self.command} "
                             f"{_redacted(urlsplit(self.path).path)} {code}\n")

    def log_error(self, format, *args) -> None:
        if self.server.verbose and args:
            sys.stderr.write(f"{self.address_string()} error {args[0]}\n")


class DevplaneServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], state: DevplaneState, *,
                 keepalive: float = KEEPALIVE_S, cert_ttl: float = CERT_TTL_S,
                 verbose: bool = True):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)
        self.state = state
        self.hub = Hub(state)
        self.challenges = Challenges()
        self.keepalive = keepalive
        self.cert_ttl = timedelta(seconds=cert_ttl)
        self.verbose = verbose
        self.url = ""
        self.tls: ssl.SSLContext | None = None

    def start_tls(self, url: str) -> None:
        """Issue a server certificate for the hosts clients may use, and arm TLS."""
        hosts = ["localhost", "127.0.0.1", "::1", urlsplit(url).hostname]
        if self.server_address[0] not in ("0.0.0.0", "::"):
            hosts.append(self.server_address[0])
        cert_file, key_file = self.state.write_server_identity(hosts)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_file, key_file)
        context.load_verify_locations(cadata=self.state.ca.pem.decode("ascii"))
        # Optional at the TLS layer: enrollment has no certificate yet; the
        # sandbox endpoints refuse a request without one (401).
        context.verify_mode = ssl.CERT_OPTIONAL
        self.tls = context
        self.url = url

    def finish_request(self, request, client_address) -> None:
        # The handshake runs here, in the connection's own thread, so that a
        # slow or hostile client never holds up accept().
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        # Headers and body go out in separate writes; without this, Nagle's
        # algorithm and the client's delayed ACK add 40 ms to every response.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            connection = self.tls.wrap_socket(request, server_side=True)
        except OSError:
            return
        try:
            connection.settimeout(IDLE_TIMEOUT_S)
            self.RequestHandlerClass(connection, client_address, self)
        except OSError:
            pass
        finally:
            connection.close()

    def stop(self) -> None:
        self.hub.stop()
        self.shutdown()


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen must be HOST:PORT, not {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def serve(state: DevplaneState, listen: str, *, url: str | None = None,
          keepalive: float = KEEPALIVE_S, cert_ttl: float = CERT_TTL_S, verbose: bool = True,
          on_ready=None) -> None:
    """Serve until SIGTERM or SIGINT."""
    host, port = parse_listen(listen)
    server = DevplaneServer((host, port), state, keepalive=keepalive, cert_ttl=cert_ttl,
                            verbose=verbose)
    url = (url or f"https://{_url_host(host)}:{server.server_address[1]}").rstrip("/")
    server.start_tls(url)
    state.set_url(url)
    server.hub.rescan()

    def stop(signum, frame):
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if on_ready:
        on_ready(url)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.hub.stop()
        server.server_close()
