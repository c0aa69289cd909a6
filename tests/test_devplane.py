"""The reference control plane, `tappass-devplane`, over real HTTPS (DESIGN §5, §7, §11)."""

import json
import queue
import secrets
import socket
import threading
import time

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import patience
from devplane_fixture import *  # noqa: F403
from devplane_fixture import claims_of, new_host_state
from tappass_host import signing, strictjson
from tappass_host import sandbox_record as sandboxes
from tappass_host.identity import bootstrap as bootstraps
from tappass_host.identity import certs, enrollment
from tappass_host.identity.tls import mtls_context, pinned_context
from tappass_host.keyring import PAYLOAD_TYPE, envelope


def enroll(devplane, host, name="demo") -> sandboxes.SandboxRecord:
    trust = enrollment.TrustPolicy(pinned=(devplane.trust_key,))
    return enrollment.enroll(host.paths, name, devplane.bootstrap(name), trust)


def sandbox_url(record, what: str) -> str:
    return f"{record.sync_url}/v1/sandboxes/{record.sandbox_id}/{what}"


def verified_payload(data: bytes, devplane) -> dict:
    env = envelope.parse(data)
    assert env.payload_type == PAYLOAD_TYPE
    key = signing.public_key_from_text(devplane.trust_key)
    [sig] = env.signatures
    assert sig.keyid == signing.key_id(key)
    key.verify(sig.sig, envelope.pae(env.payload_type, env.payload))
    return strictjson.loads(env.payload)


@pytest.fixture
def enrolled(devplane, host_state):
    return enroll(devplane, host_state), host_state


@pytest.fixture
def anonymous(devplane):
    with httpx.Client(base_url=devplane.url, verify=pinned_context(devplane.ca_pem)) as client:
        yield client


# -- enrollment endpoints ------------------------------------------------------------------


def _token(url: str) -> str:
    return url.rsplit("/", 1)[1]


def _signed(devplane, key, **claims) -> str:
    now = int(time.time())
    base = {"v": 1, "jti": secrets.token_urlsafe(18), "org_id": "org_dev",
            "sandbox_spec_ref": "demo", "iat": now, "exp": now + 600,
            "sign_key": signing.public_key_to_text(key.public_key()),
            "tls_ca_sha256": devplane.state.ca.sha256}
    return bootstraps.encode({**base, **claims}, key)


def test_ca_endpoint_serves_the_pinned_ca(anonymous, devplane):
    response = anonymous.get("/v1/enroll/ca")
    assert response.status_code == 200
    ca = x509.load_pem_x509_certificate(response.content)
    assert ca.public_bytes(serialization.Encoding.PEM) == devplane.ca_pem
    assert devplane.state.ca.sha256 == claims_of(devplane.bootstrap())["tls_ca_sha256"]


def test_token_refusals_in_their_order(anonymous, devplane, host_state):
    def challenge(token):
        return anonymous.post("/v1/enroll/challenge", json={"token": token}).status_code

    now = int(time.time())
    own = devplane.state.signing_key
    assert anonymous.post("/v1/enroll/challenge", content=b"{").status_code == 400
    assert anonymous.post("/v1/enroll/challenge", json={}).status_code == 400
    assert challenge("not-a-token") == 400
    assert challenge(_token(devplane.bootstrap())[:-5]) == 400
    # 401 before 404: another signer's token is unknown too
    assert challenge(_signed(devplane, signing.generate())) == 401
    # 404 before 403: our signature, never issued, expired
    assert challenge(_signed(devplane, own, iat=now - 900, exp=now - 300)) == 404
    # 410 before 403: issued, consumed and expired
    expired_url = devplane.bootstrap(iat=now - 900, exp=now - 300)
    devplane.state.burn(claims_of(expired_url)["jti"])
    assert challenge(_token(expired_url)) == 410
    assert challenge(_token(devplane.bootstrap(iat=now - 900, exp=now - 300))) == 403
    # within the 60 s clock skew: still good
    assert challenge(_token(devplane.bootstrap(iat=now - 600, exp=now - 30))) == 200
    assert challenge(_token(devplane.bootstrap())) == 200


def test_complete_checks_nonce_csr_and_proof_of_possession(anonymous, devplane, tmp_path):
    token = _token(devplane.bootstrap())
    jti = bootstraps.decode(token).claims.jti
    key = certs.load_or_create_machine_key(tmp_path / "key.pem")
    csr = certs.build_csr(key, "demo").decode()

    def complete(nonce, csr_pem=csr, pop=None):
        body = {"token": token, "nonce": nonce, "csr_pem": csr_pem,
                "pop": pop or certs.proof_of_possession(key, jti, nonce)}
        return anonymous.post("/v1/enroll/complete", json=body).status_code

    nonce = anonymous.post("/v1/enroll/challenge", json={"token": token}).json()["nonce"]
    assert complete(nonce, csr_pem="garbage") == 400
    assert complete("never-issued") == 401
    other_key = certs.load_or_create_machine_key(tmp_path / "other.pem")
    assert complete(nonce, pop=certs.proof_of_possession(other_key, jti, nonce)) == 401
    # a nonce is good for one attempt only
    assert complete(nonce) == 401
    nonce = anonymous.post("/v1/enroll/challenge", json={"token": token}).json()["nonce"]
    assert complete(nonce) == 200
    nonce = anonymous.post("/v1/enroll/challenge", json={"token": token}).json().get("nonce")
    assert nonce is None  # 410 now


def test_concurrent_completes_exactly_one_wins(devplane, tmp_path):
    token = _token(devplane.bootstrap())
    jti = bootstraps.decode(token).claims.jti
    key = certs.load_or_create_machine_key(tmp_path / "key.pem")
    csr = certs.build_csr(key, "demo").decode()
    context = pinned_context(devplane.ca_pem)
    clients = [httpx.Client(base_url=devplane.url, verify=context) for _ in range(10)]
    nonces = [c.post("/v1/enroll/challenge", json={"token": token}).json()["nonce"]
              for c in clients]
    barrier = threading.Barrier(10)
    statuses = []

    def complete(client, nonce):
        body = {"token": token, "nonce": nonce, "csr_pem": csr,
                "pop": certs.proof_of_possession(key, jti, nonce)}
        barrier.wait()
        statuses.append(client.post("/v1/enroll/complete", json=body).status_code)

    threads = [threading.Thread(target=complete, args=pair)
               for pair in zip(clients, nonces, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(patience.seconds(30))
    for c in clients:
        c.close()
    assert sorted(statuses) == [200] + [410] * 9
    assert len(devplane.state.sandboxes()) == 1


# -- mTLS on the sandbox endpoints -----------------------------------------------------------

ENDPOINTS = [("GET", "keyring"), ("GET", "events"), ("POST", "acks"), ("GET", "acks"),
             ("POST", "certificate")]


@pytest.mark.parametrize("method,what", ENDPOINTS)
def test_sandbox_endpoints_need_the_sandbox_certificate(method, what, devplane, enrolled,
                                                        tmp_path):
    record, host = enrolled
    other = new_host_state(tmp_path, "other-host")
    enroll(devplane, other, "other")
    body = {"policy_version": 1, "status": "applied"} if what == "acks" else \
        {"csr_pem": certs.build_csr(certs.load_machine_key(host.paths.machine_key), "x").decode()}
    kwargs = {"json": body} if method == "POST" else {}
    for context, status in ((pinned_context(devplane.ca_pem), 401),
                            (mtls_context(other.paths, "other"), 403)):
        with httpx.Client(verify=context) as client:
            assert client.request(method, sandbox_url(record, what), **kwargs).status_code == status
    with httpx.Client(verify=mtls_context(host.paths, "demo")) as client:
        if what == "events":
            with client.stream("GET", sandbox_url(record, what)) as response:
                assert response.status_code == 200
                assert response.headers["content-type"] == "text/event-stream"
        else:
            expected = {"keyring": 404, "acks": 204 if method == "POST" else 200,
                        "certificate": 200}[what]
            assert client.request(method, sandbox_url(record, what), **kwargs).status_code \
                == expected


def test_unknown_sandbox_is_403_not_a_hint(devplane, enrolled):
    record, host = enrolled
    with httpx.Client(verify=mtls_context(host.paths, "demo")) as client:
        response = client.get(f"{record.sync_url}/v1/sandboxes/sbx_nope/keyring")
    assert response.status_code == 403


def test_certificate_renewal_endpoint(devplane, enrolled):
    record, host = enrolled
    key = certs.load_machine_key(host.paths.machine_key)
    with httpx.Client(verify=mtls_context(host.paths, "demo")) as client:
        response = client.post(sandbox_url(record, "certificate"),
                               json={"csr_pem": certs.build_csr(key, "demo").decode()})
        assert client.post(sandbox_url(record, "certificate"),
                           json={"csr_pem": "junk"}).status_code == 400
    assert response.status_code == 200
    doc = response.json()
    assert doc["ca_pem"].encode() == devplane.ca_pem
    cert = certs.check_issued(doc["cert_pem"].encode(), devplane.ca_pem, key, record.spiffe_id)
    assert certs.spiffe_ids(cert) == [record.spiffe_id]


# -- keyrings: publish, pull, events -----------------------------------------------------------


def test_publish_json_and_toml_then_pull(devplane, enrolled, tmp_path):
    record, host = enrolled
    with httpx.Client(verify=mtls_context(host.paths, "demo")) as client:
        assert client.get(sandbox_url(record, "keyring")).status_code == 404
        (tmp_path / "p.json").write_text(json.dumps({"network": {"mode": "none"}}))
        result = devplane.cli("publish", "demo", str(tmp_path / "p.json"), "--ttl", "600")
        assert f"{record.sandbox_id} policy_version 1" in result.stdout
        first = client.get(sandbox_url(record, "keyring"))
        (tmp_path / "p.toml").write_text('[process]\nmemory_mb = 256\n')
        devplane.cli("publish", "demo", str(tmp_path / "p.toml"))
        second = client.get(sandbox_url(record, "keyring"))
    payload = verified_payload(first.content, devplane)
    assert payload["schema"] == "tappass.keyring/v1"
    assert payload["sandbox_id"] == record.sandbox_id
    assert payload["policy_version"] == 1 and payload["network"] == {"mode": "none"}
    issued = time.strptime(payload["issued_at"], "%Y-%m-%dT%H:%M:%SZ")
    expires = time.strptime(payload["expires_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert time.mktime(expires) - time.mktime(issued) == 600
    payload = verified_payload(second.content, devplane)
    assert payload["policy_version"] == 2 and payload["process"] == {"memory_mb": 256}


def test_publish_keeps_fields_the_file_sets(devplane, enrolled, tmp_path):
    record, _ = enrolled
    [published] = devplane.publish("demo", {"policy_version": 41,
                                            "issued_at": "2020-01-01T00:00:00Z"})
    payload = verified_payload(published.envelope, devplane)
    assert payload["policy_version"] == 41 and payload["issued_at"] == "2020-01-01T00:00:00Z"
    [published] = devplane.publish("demo", {})
    assert published.policy_version == 42


def test_publish_to_an_unknown_sandbox_fails(devplane, tmp_path):
    (tmp_path / "p.json").write_text("{}")
    result = devplane.cli("publish", "ghost", str(tmp_path / "p.json"), check=False)
    assert result.returncode == 1
    assert "no sandbox named 'ghost'" in result.stderr


class Stream:
    """An SSE connection read line by line in a thread, comments included."""

    def __init__(self, url: str, context, last_event_id: int | None = None):
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        self.lines: queue.Queue = queue.Queue()
        self.client = httpx.Client(verify=context, timeout=httpx.Timeout(10, read=60))
        self._stream = self.client.stream("GET", url, headers=headers)
        self.response = self._stream.__enter__()
        assert self.response.status_code == 200
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for line in self.response.iter_lines():
                self.lines.put(line)
        except (httpx.HTTPError, OSError, ValueError):
            pass
        self.lines.put(None)

    def next(self, timeout: float = 5.0):
        """('comment', text) or ('event', {field: value}); queue.Empty on timeout."""
        fields: dict = {}
        deadline = time.monotonic() + patience.seconds(timeout)
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if line is None:
                raise EOFError
            if line.startswith(":") and not fields:
                return "comment", line[1:].strip()
            if line == "":
                if fields:
                    return "event", fields
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            fields[name] = fields[name] + "\n" + value if name in fields else value

    def next_event(self, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + patience.seconds(timeout)
        while True:
            kind, item = self.next(max(0.01, deadline - time.monotonic()) / patience.factor())
            if kind == "event":
                return item

    def close(self) -> None:
        # Wake the reader with shutdown() and let it finish before closing: a
        # socket closed under a blocked reader frees its fd number, and the
        # reader's next recv() would take bytes from whatever file or socket
        # is opened next under that number.
        stream = self.response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._reader.join(patience.seconds(10))
        self.response.close()
        self.client.close()


def test_events_keepalive_push_and_replay(devplane, enrolled):
    record, host = enrolled
    url = sandbox_url(record, "events")
    stream = Stream(url, mtls_context(host.paths, "demo"))
    try:
        assert stream.next(timeout=3) == ("comment", "keepalive")  # every 0.5 s here
        [published] = devplane.publish("demo", {"network": {"mode": "none"}})
        event = stream.next_event()
        assert event["event"] == "keyring" and event["id"] == "1"
        assert event["data"].encode() == published.envelope
        assert "\n" not in event["data"]
        devplane.publish("demo", {})
        devplane.publish("demo", {"tools": {}})
        assert [stream.next_event()["id"], stream.next_event()["id"]] == ["2", "3"]
    finally:
        stream.close()

    def first_item(last_event_id):
        s = Stream(url, mtls_context(host.paths, "demo"), last_event_id)
        try:
            return s.next(timeout=3)
        finally:
            s.close()

    kind, event = first_item(None)
    assert kind == "event" and event["id"] == "3"
    kind, event = first_item(2)
    assert kind == "event" and event["id"] == "3"
    assert first_item(3) == ("comment", "keepalive")


def test_many_concurrent_streams_all_receive_a_publish(devplane, enrolled):
    record, host = enrolled
    context = mtls_context(host.paths, "demo")
    streams = [Stream(sandbox_url(record, "events"), context) for _ in range(40)]
    try:
        [published] = devplane.publish("demo", {})
        for stream in streams:
            event = stream.next_event(timeout=10)
            assert event["data"].encode() == published.envelope
    finally:
        for stream in streams:
            stream.close()


def test_raw_envelope_is_pushed_byte_for_byte(devplane, enrolled, tmp_path):
    record, host = enrolled
    forged_key = signing.generate()
    payload = strictjson.canonical({"schema": "tappass.keyring/v1", "policy_version": 5,
                                    "sandbox_id": record.sandbox_id})
    raw = envelope.sign(payload, [forged_key])
    (tmp_path / "raw.json").write_bytes(raw)
    stream = Stream(sandbox_url(record, "events"), mtls_context(host.paths, "demo"))
    try:
        devplane.cli("publish", "demo", "--raw-envelope", str(tmp_path / "raw.json"))
        event = stream.next_event()
        assert event["id"] == "5" and event["data"].encode() == raw
        (tmp_path / "junk").write_bytes(b"not json\nsecond line")
        devplane.cli("publish", "demo", "--raw-envelope", str(tmp_path / "junk"),
                     "--policy-version", "6")
        event = stream.next_event()
        assert event["id"] == "6" and event["data"] == "not json\nsecond line"
    finally:
        stream.close()
    with httpx.Client(verify=mtls_context(host.paths, "demo")) as client:
        assert client.get(sandbox_url(record, "keyring")).content == b"not json\nsecond line"


def test_sign_writes_the_envelope_for_air_gapped_hosts(devplane, enrolled, tmp_path):
    record, host = enrolled
    (tmp_path / "p.json").write_text('{"budget": {}}')
    out = tmp_path / "out.dsse.json"
    devplane.cli("sign", "demo", str(tmp_path / "p.json"), "-o", str(out))
    payload = verified_payload(out.read_bytes(), devplane)
    assert payload["sandbox_id"] == record.sandbox_id and payload["policy_version"] == 1
    with httpx.Client(verify=mtls_context(host.paths, "demo")) as client:
        assert client.get(sandbox_url(record, "keyring")).content == out.read_bytes()


def test_acks_are_recorded(devplane, enrolled):
    record, host = enrolled
    ack = {"policy_version": 3, "status": "rejected", "reason": "rollback",
           "applied_at": "2026-01-01T00:00:00Z"}
    with httpx.Client(verify=mtls_context(host.paths, "demo")) as client:
        assert client.post(sandbox_url(record, "acks"), json=ack).status_code == 204
        assert client.post(sandbox_url(record, "acks"),
                           json={"status": "maybe"}).status_code == 400
        listed = client.get(sandbox_url(record, "acks")).json()["acks"]
    assert len(listed) == 1 and {k: listed[0][k] for k in ack} == ack
    printed = [json.loads(line) for line in devplane.cli("acks", "demo").stdout.splitlines()]
    assert printed[0]["reason"] == "rollback" and printed[0]["sandbox_id"] == record.sandbox_id


def test_state_survives_a_restart(devplane, host_state):
    used = devplane.bootstrap()
    record = enrollment.enroll(host_state.paths, "demo", used,
                               enrollment.TrustPolicy(pinned=(devplane.trust_key,)))
    [published] = devplane.publish("demo", {"tools": {}})
    unused = devplane.bootstrap("later")
    ca, key = devplane.ca_pem, devplane.trust_key

    devplane.restart()

    assert devplane.ca_pem == ca and devplane.trust_key == key
    with httpx.Client(verify=mtls_context(host_state.paths, "demo")) as client:
        assert client.get(sandbox_url(record, "keyring")).content == published.envelope
    with httpx.Client(base_url=devplane.url, verify=pinned_context(ca)) as client:
        assert client.post("/v1/enroll/challenge", json={"token": _token(used)}).status_code == 410
    later = enrollment.enroll(host_state.paths, "later", unused,
                              enrollment.TrustPolicy(pinned=(key,)))
    assert later.sync_url == record.sync_url
    [published] = devplane.publish("demo", {})
    assert published.policy_version == 2


def test_publish_while_stopped_is_served_after_start(devplane, enrolled, tmp_path):
    record, host = enrolled
    devplane.stop()
    (tmp_path / "p.json").write_text("{}")
    result = devplane.cli("publish", "demo", str(tmp_path / "p.json"))
    assert "will be served when it starts" in result.stderr
    devplane.start(port=devplane.port)
    with httpx.Client(verify=mtls_context(host.paths, "demo")) as client:
        assert client.get(sandbox_url(record, "keyring")).status_code == 200


# -- the command line ----------------------------------------------------------------------------


def test_bootstrap_and_trust_key_commands(devplane, tmp_path):
    result = devplane.cli("bootstrap", "web", "--count", "3", "--ttl", "60")
    urls = result.stdout.split()
    assert len(set(urls)) == 3
    for url in urls:
        assert url.startswith(devplane.url + "/v1/enroll/")
        claims = claims_of(url)
        assert claims["exp"] - claims["iat"] == 60 and claims["sandbox_spec_ref"] == "web"
        assert claims["sign_key"] == devplane.trust_key
    assert devplane.cli("trust-key").stdout.strip() == devplane.trust_key
    assert devplane.cli("bootstrap", "web", "--ttl", "901", check=False).returncode != 0
    # The token appears on stdout and nowhere in the state directory.
    token = urls[0].rsplit("/", 1)[1]
    for path in devplane.root.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes()
            assert claims_of(urls[0])["jti"].encode() not in path.read_bytes()


def test_bootstrap_needs_a_known_url(tmp_path):
    from devplane_fixture import Devplane

    fresh = Devplane(tmp_path / "fresh")
    result = fresh.cli("bootstrap", "web", check=False)
    assert result.returncode == 1 and "start 'serve' first, or pass --url" in result.stderr
    result = fresh.cli("bootstrap", "web", "--url", "https://cp.example:9443")
    assert result.stdout.startswith("https://cp.example:9443/v1/enroll/")


def test_server_certificate_names_localhost_and_loopback(devplane):
    for host in ("127.0.0.1", "localhost"):
        with httpx.Client(verify=pinned_context(devplane.ca_pem)) as client:
            assert client.get(f"https://{host}:{devplane.port}/v1/enroll/ca").status_code == 200


def test_unknown_paths_and_methods(anonymous):
    assert anonymous.get("/v1/nothing").status_code == 404
    assert anonymous.delete("/v1/enroll/ca").status_code in (404, 405, 501)
    assert anonymous.post("/v1/enroll/ca").status_code == 405
    assert anonymous.post("/v1/admin/rescan").status_code == 204

