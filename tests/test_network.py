"""Network mode `proxy` (DESIGN §6, §8): a real sandbox under crun and runc in
its own network namespace, whose only way out is the egress proxy, talking to
a real HTTPS server in a test namespace over link-local veths."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import patience
from audit_records import read_audit
import egress_fixture as world
import image_fixture
from devplane_fixture import devplane, make_devplane  # noqa: F401 - fixtures
from sandbox_fixture import (RUNTIMES, new_host, python_agent, require_runtime, unique_name,
                             wait_for, write_agent)
from tappass_host import network
from tappass_host.network import policy as egress
from tappass_host.network.denials import LIMIT, WINDOW_S, DenialLog
from tappass_host.network.http1 import BadRequest, BadResponse, ResponseHeads, parse_head
from tappass_host.oci import invariants

SLEEPER = "import time\nprint('agent up', flush=True)\ntime.sleep(3600)\n"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    up = world.start_upstream(tmp_path_factory.mktemp("upstream"))
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture
def net(upstream):
    """A host configured for the upstream world; torn down completely after."""
    host = new_host()
    world.configure(host, upstream)
    names: list[str] = []
    host.net_names = names
    try:
        yield host
    finally:
        try:
            world.teardown(host, names)
        finally:
            host.cleanup()


def start_proxy_sandbox(host, upstream, runtime: str, prefix: str, *allowed: str) -> str:
    require_runtime(runtime)
    name = unique_name(prefix, runtime)
    host.net_names.append(name)
    host.enroll(name, network=world.proxy_policy(upstream, *allowed))
    agent = python_agent(host.root / f"agent-{name}", SLEEPER)
    result = host.start(name, agent, runtime)
    log = host.paths.runtime / "network" / "proxy.log"
    if result.returncode != 0 and log.exists():
        open("/tmp/proxy-fail.log", "w").write(log.read_text())
    assert result.returncode == 0, (result.stderr, log.exists() and log.read_text()[-3000:])
    host.wait_log(name, "agent up")
    world.put_in_workspace(host, name, {"ca.pem": upstream.ca_pem.read_bytes()})
    return name


def fetch(host, name: str, url: str) -> str:
    return world.in_sandbox(host, name, world.CLIENT, url, "/workspace/ca.pem")


def link_of(host, name: str) -> dict:
    return json.loads((host.paths.runtime / "network" / "sandboxes" / f"{name}.json").read_text())


def audit(host, event: str, name: str) -> list[dict]:
    return read_audit(host.paths.audit_log, sandbox=name, event=event)


def assert_gone(host, name: str, link: dict) -> None:
    wait_for(lambda: f"tappass-{name}" not in world.netns_names()
             and link["host_ifname"] not in world.link_names(host), 10,
             what=f"{name}'s namespace and veth to go")
    assert not (host.paths.runtime / "network" / "sandboxes" / f"{name}.json").exists()
    pid = world.proxy_pid(host)
    assert pid is None or not world.listening(host, pid, link["host_address"])


# --- the whole path, from inside real sandboxes -------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_egress_only_through_the_policy_proxy(net, upstream, runtime):
    name = start_proxy_sandbox(net, upstream, runtime, "net", "allowed.test", "*.wild.test",
                               "loop.test", "private.test")
    pid = net.status(name)["pid"]
    link = link_of(net, name)
    env = world.in_sandbox(net, name, "import os, json; print(json.dumps(dict(os.environ)))")
    env = json.loads(env)
    proxy_url = f"http://{link['host_address']}:3128"
    assert env["HTTPS_PROXY"] == env["http_proxy"] == proxy_url
    assert env["NO_PROXY"] == "localhost,127.0.0.1"

    assert fetch(net, name, upstream.url("allowed.test")) == "STATUS 200 1024"
    assert fetch(net, name, upstream.url("a.wild.test")) == "STATUS 200 1024"
    assert fetch(net, name, upstream.url("ALLOWED.test", tls=False)) == "STATUS 200 1024"
    # Not on the list, or resolving where the policy does not name.
    assert "403" in fetch(net, name, upstream.url("denied.test"))
    assert "403" in fetch(net, name, upstream.url("denied.test", tls=False))
    # Plain HTTP goes to the server the URI names, whatever Host the agent claims.
    spoofed = b"GET http://allowed.test:8080/ HTTP/1.1\r\nHost: denied.test\r\n\r\n"
    head = world.in_sandbox(net, name, world.RAW, spoofed.hex())
    assert head.startswith("HTTP/1.1 200 ") and "X-Host: allowed.test:8080" in head, head
    assert "403" in fetch(net, name, upstream.url("loop.test"))
    assert "403" in fetch(net, name, upstream.url("private.test"))
    # Around the proxy: no route anywhere, not even to the server's address.
    direct = world.in_sandbox(net, name, world.DIRECT, upstream.address, str(world.HTTPS_PORT))
    assert direct.startswith("ERROR 101 "), direct  # ENETUNREACH
    direct = world.in_sandbox(net, name, world.DIRECT, "1.1.1.1", "443")
    assert direct.startswith("ERROR 101 "), direct

    # A new keyring adds the name: the next connection is allowed, nothing restarted.
    assert "403" in fetch(net, name, upstream.url("later.test"))
    net.apply(name, network=world.proxy_policy(upstream, "allowed.test", "later.test"))
    assert fetch(net, name, upstream.url("later.test")) == "STATUS 200 1024"
    net.apply(name, network=world.proxy_policy(upstream, "allowed.test"))
    assert "403" in fetch(net, name, upstream.url("later.test"))
    assert net.status(name)["pid"] == pid

    reasons = {(e["details"]["host"], e["details"]["reason"])
               for e in audit(net, "network.denied", name)}
    assert ("denied.test", egress.NOT_ALLOWED) in reasons
    assert ("loop.test", egress.PRIVATE_ADDRESS) in reasons
    assert ("private.test", egress.PRIVATE_ADDRESS) in reasons
    assert ("later.test", egress.NOT_ALLOWED) in reasons

    result = net.run("stop", name, "--timeout", "2")
    assert result.returncode == 0, result.stderr
    assert_gone(net, name, link)


EXCHANGE = """
import socket, sys, time
address, data, timeout = (sys.argv[1], int(sys.argv[2])), bytes.fromhex(sys.argv[3]), float(sys.argv[4])
started = time.monotonic()
with socket.create_connection(address, timeout=timeout) as sock:
    sock.sendall(data)
    reply = b""
    while chunk := sock.recv(4096):
        reply += chunk
print(repr(reply.split(b"\\r\\n")[0]), round(time.monotonic() - started, 2))
"""

TUNNELS = """
import asyncio, collections, resource, sys
address, count = (sys.argv[1], int(sys.argv[2])), int(sys.argv[3])
stall_s = float(sys.argv[4])
resource.setrlimit(resource.RLIMIT_NOFILE, (count * 2 + 100, count * 2 + 100))

async def main():
    # Each tunnel is held open until all `count` are. The wait goes on as long as
    # tunnels keep opening, whatever the pace: only `stall_s` without a new one ends
    # it. Prints how many were open at once, and why the others were not.
    opened, ready, failed = asyncio.Event(), 0, collections.Counter()

    async def one():
        nonlocal ready
        try:
            reader, writer = await asyncio.open_connection(*address)
        except OSError as exc:
            failed[f"connect: {exc.strerror or type(exc).__name__}"] += 1
            raise
        try:
            writer.write(b"CONNECT allowed.test:8443 HTTP/1.1\\r\\nHost: allowed.test:8443\\r\\n\\r\\n")
            try:
                status = await reader.readuntil(b"\\r\\n\\r\\n")
            except (OSError, asyncio.IncompleteReadError) as exc:
                failed[f"reply: {type(exc).__name__}"] += 1
                raise
            if not status.startswith(b"HTTP/1.1 200 "):
                failed[status.split(b"\\r\\n")[0].decode("latin-1")[:80]] += 1
                return
            ready += 1
            if ready == count:
                opened.set()
            await opened.wait()
        finally:
            writer.close()

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    waiter = asyncio.create_task(opened.wait())
    seen = -1
    while not waiter.done() and ready > seen and not all(t.done() for t in tasks):
        seen = ready
        await asyncio.wait([waiter], timeout=stall_s)
    held, pending = ready, sum(not t.done() for t in tasks) - ready
    opened.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, waiter, return_exceptions=True)
    print(held if held == count else
          f"{held} (not: {dict(failed)}; {pending} unanswered after {stall_s:.0f} s without a new one)")

asyncio.run(main())
"""


# Scripts run in sandboxes scale their deadlines by PATIENCE (tests/patience.py).
IN_SANDBOX = f"PATIENCE = {patience.factor()}\n"

# Run inside a sandbox: CONNECT to argv[1]:argv[2], then a TLS handshake asking
# for server name argv[3] (any certificate accepted: the proxy is on trial).
FRONTED = IN_SANDBOX + """
import os, socket, ssl, sys, urllib.parse
proxy = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])
sock = socket.create_connection((proxy.hostname, proxy.port), timeout=10 * PATIENCE)
sock.sendall(f"CONNECT {sys.argv[1]}:{sys.argv[2]} HTTP/1.1\\r\\n\\r\\n".encode())
head = b""
while not head.endswith(b"\\r\\n\\r\\n"):
    head += sock.recv(1)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
try:
    with context.wrap_socket(sock, server_hostname=sys.argv[3]):
        print("HANDSHAKE OK")
except ssl.SSLError as e:
    print("CLOSED", type(e).__name__, e.reason)
except OSError as e:
    print("CLOSED", type(e).__name__)
"""

# Run inside a sandbox: several requests on one client connection to the
# proxy (http.client reuses it unless the answer says `Connection: close`).
PERSISTENT = IN_SANDBOX + """
import http.client, os, sys, urllib.parse
proxy = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
conn = http.client.HTTPConnection(proxy.hostname, proxy.port, timeout=10 * PATIENCE)
answers = []
try:
    for url in sys.argv[1:]:
        conn.request("GET", url)
        response = conn.getresponse()
        answers.append(f"{response.status} {len(response.read())} {response.getheader('Connection')}")
except OSError as e:
    answers.append(f"ERROR {type(e).__name__}")
print(" | ".join(answers))
"""


# Run inside an image's python3, which has no ssl module: plain HTTP through the proxy.
PLAIN_CLIENT = f"""
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout={patience.seconds(10)}) as r:
        print("STATUS", r.status, len(r.read()))
except urllib.error.HTTPError as e:
    print("STATUS", e.code, 0)
except OSError as e:
    print("ERROR", getattr(e, "reason", e))
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_an_image_sandbox_reaches_only_what_its_proxy_allows(net, upstream, runtime, tmp_path):
    """An agent whose root is an image (issue 14) is confined to the proxy as a
    host-root one is: the allowed name through it, nothing else, no route around."""
    require_runtime(runtime)
    image = image_fixture.python_image(tmp_path / "image")
    for path in [tmp_path, image.layout, *image.layout.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    name = unique_name("net-img", runtime)
    net.net_names.append(name)
    net.enroll(name, network=world.proxy_policy(upstream, "allowed.test"),
               image={"allowed_digests": [image.digest]})
    agent = write_agent(tmp_path / "agent", ["python3", "/opt/agent/main.py"],
                        files={"main.py": SLEEPER})
    net.start_ok(name, agent, runtime, "--image", f"oci:{image.layout}")
    net.wait_log(name, "agent up")
    link = link_of(net, name)
    assert net.status(name)["image"] == image.digest
    assert "TapPass test image" in world.in_sandbox(net, name, "print(open('/etc/os-release').read())")

    assert world.in_sandbox(net, name, PLAIN_CLIENT, upstream.url("allowed.test", tls=False)) \
        == "STATUS 200 1024"
    assert "403" in world.in_sandbox(net, name, PLAIN_CLIENT, upstream.url("denied.test", tls=False))
    direct = world.in_sandbox(net, name, world.DIRECT, upstream.address, str(world.HTTPS_PORT))
    assert direct.startswith("ERROR 101 "), direct  # ENETUNREACH
    assert ("denied.test", egress.NOT_ALLOWED) in {
        (e["details"]["host"], e["details"]["reason"]) for e in audit(net, "network.denied", name)}

    assert net.run("stop", name, "--timeout", "2").returncode == 0
    assert_gone(net, name, link)


def test_tls_inside_a_tunnel_must_ask_for_an_allowed_name(net, upstream):
    """Domain fronting by SNI: CONNECT to an allowed name, then a ClientHello
    for another site on the same addresses (on a CDN: any site)."""
    name = start_proxy_sandbox(net, upstream, RUNTIMES[0], "sni", "allowed.test", "*.wild.test")
    port = str(world.HTTPS_PORT)
    assert world.in_sandbox(net, name, FRONTED, "allowed.test", port, "allowed.test") == \
        "HANDSHAKE OK"
    assert world.in_sandbox(net, name, FRONTED, "allowed.test", port, "a.wild.test") == \
        "HANDSHAKE OK"  # another name the policy allows
    # The upstream's certificate covers denied.test too: only the proxy stands in the way.
    fronted = world.in_sandbox(net, name, FRONTED, "allowed.test", port, "denied.test")
    assert fronted == "CLOSED SSLError TLSV1_ALERT_ACCESS_DENIED", fronted
    # The alert is sent after the denial is handed to the audit writer, not
    # after it is on disk: waited for.
    wait_for(lambda: ("denied.test", egress.SNI_NOT_ALLOWED) in {
        (e["details"]["host"], e["details"]["reason"]) for e in audit(net, "network.denied", name)},
        what="the sni_not_allowed denial audited")
    assert fetch(net, name, upstream.url("allowed.test")) == "STATUS 200 1024"


# Run inside a sandbox: each argument (hex) sent on a connection of its own
# to the proxy; prints the first line of each answer.
HEADS = IN_SANDBOX + """
import os, socket, sys, urllib.parse
proxy = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
for data in sys.argv[1:]:
    with socket.create_connection((proxy.hostname, proxy.port), timeout=10 * PATIENCE) as sock:
        sock.sendall(bytes.fromhex(data))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    print(answer.split(b"\\r\\n")[0].decode())
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_one_exchange_per_connection_said_and_smuggled_heads_refused(net, upstream, runtime):
    """RFC 9112 §9.6: the proxy closes after one exchange, so the answer says
    `Connection: close` and a client's second request on its connection opens
    a new one (was RemoteDisconnected). A head another parser would split
    differently — bare LF, bare CR, obs-fold, control characters, ambiguous
    framing — is refused (400) and never reaches the upstream."""
    import uuid

    name = start_proxy_sandbox(net, upstream, runtime, "h11", "allowed.test")
    url = upstream.url("allowed.test", tls=False)
    assert world.in_sandbox(net, name, PERSISTENT, url, url + "again", url) == \
        "200 1024 close | 200 1024 close | 200 1024 close"

    marker = uuid.uuid4().hex
    target = f"GET http://allowed.test:{world.HTTP_PORT}/{marker}".encode()
    smuggled = [
        target + b"-lf HTTP/1.1\r\nX-A: 1\nHost: other.test\r\n\r\n",
        target + b"-cr HTTP/1.1\r\nX-A: 1\rHost: other.test\r\n\r\n",
        target + b"-fold HTTP/1.1\r\nX-A: 1\r\n Host: other.test\r\n\r\n",
        target + b"-nul HTTP/1.1\r\nX-A: 1\x00\r\n\r\n",
        target + b"-vt HTTP/1.1\r\nX-A: \x0b1\r\n\r\n",
        target + b"-del HTTP/1.1\r\nX-A: 1\x7f\r\n\r\n",
        target + b"-esc\x1b HTTP/1.1\r\n\r\n",
        target + b"-tab\tx HTTP/1.1\r\n\r\n",
        target + b"-clte HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
        target + b"-clcl HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 4\r\n\r\n",
    ]
    answers = world.in_sandbox(net, name, HEADS, *(h.hex() for h in smuggled)).splitlines()
    assert len(answers) == len(smuggled)
    for head, answer in zip(smuggled, answers):
        assert answer.startswith("HTTP/1.1 400 "), (head, answer)
    # The same request, well formed, does reach the upstream: the check can fail.
    fine = target + b"-fine HTTP/1.1\r\nX-A: 1\r\n\r\n"
    assert world.in_sandbox(net, name, HEADS, fine.hex()).startswith("HTTP/1.1 200 ")
    seen = [line for line in upstream.requests_seen().splitlines() if marker in line]
    assert seen == [f"GET /{marker}-fine HTTP/1.1"], seen


# Run inside a sandbox: curl with these arguments (it reads https_proxy);
# prints its exit status and what it wrote.
CURL = IN_SANDBOX + """
import subprocess, sys
result = subprocess.run(["curl", *sys.argv[1:]], capture_output=True, text=True,
                        timeout=30 * PATIENCE)
print(result.returncode, (result.stdout + result.stderr).strip())
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_refused_server_name_gets_a_tls_access_denied_alert(net, upstream, runtime):
    """curl through the proxy, CONNECT to an allowed name, SNI of another:
    a TLS alert access_denied, not a connection closed without a word."""
    name = start_proxy_sandbox(net, upstream, runtime, "alert", "allowed.test")
    port = world.HTTPS_PORT

    def curl(url: str, *args: str) -> str:
        return world.in_sandbox(net, name, CURL, "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                "--cacert", "/workspace/ca.pem", *args, url)

    fronted = curl(f"https://denied.test:{port}/", "--connect-to",
                   f"denied.test:{port}:allowed.test:{port}")
    assert fronted.startswith("35 ") and "alert access denied" in fronted, fronted
    assert curl(f"https://allowed.test:{port}/") == "0 200"
    reasons = {(e["details"]["host"], e["details"]["reason"])
               for e in audit(net, "network.denied", name)}
    assert reasons == {("denied.test", egress.SNI_NOT_ALLOWED)}


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_only_allowed_ports_and_globally_routable_addresses(net, upstream, runtime):
    """An allowed name's SSH and SMTP ports are not reachable (config
    network.allow_ports: 443 and 80 by default, the test's own added here);
    names resolving into IPv6 ranges that lead to private IPv4 addresses
    (NAT64, 6to4, SIIT, IPv4-compatible) or nowhere (site-local) are refused."""
    import uuid

    name = start_proxy_sandbox(net, upstream, runtime, "ports", "allowed.test",
                               *world.NOT_GLOBAL_V6)
    for port in (443, world.HTTPS_PORT):
        assert fetch(net, name, upstream.url("allowed.test", port=port)) == "STATUS 200 1024"
    for port in (80, world.HTTP_PORT):
        assert fetch(net, name, upstream.url("allowed.test", tls=False, port=port)) == \
            "STATUS 200 1024"
    marker = uuid.uuid4().hex
    for port in (22, 25):
        url = upstream.url("allowed.test", tls=False, port=port) + marker
        assert fetch(net, name, url) == "STATUS 403 0"
        connect = f"CONNECT allowed.test:{port} HTTP/1.1\r\n\r\n".encode()
        assert world.in_sandbox(net, name, HEADS, connect.hex()).startswith("HTTP/1.1 403 ")
    assert marker not in upstream.requests_seen()
    for v6name in world.NOT_GLOBAL_V6:
        assert fetch(net, name, f"http://{v6name}/") == "STATUS 403 0", v6name
    denied = [e["details"] for e in audit(net, "network.denied", name)]
    assert sorted((d["host"], d["reason"], d["port"]) for d in denied) == sorted(
        [("allowed.test", egress.PORT_NOT_ALLOWED, port) for port in (22, 22, 25, 25)]
        + [(v6name, egress.PRIVATE_ADDRESS, 80) for v6name in world.NOT_GLOBAL_V6])


def test_proxy_survives_abuse_without_leaking(net, upstream):
    name = start_proxy_sandbox(net, upstream, "crun", "abuse", "allowed.test")
    link = link_of(net, name)
    address = (link["host_address"], "3128")
    proxy = world.proxy_pid(net)
    assert proxy
    before = len(os.listdir(f"/proc/{proxy}/fd"))

    def exchange(data: bytes, timeout: float = 5) -> tuple[bytes, float]:
        line, elapsed = world.in_hub(net, EXCHANGE, *address, data.hex(),
                                     str(patience.seconds(timeout))) \
            .rsplit(" ", 1)
        return eval(line), float(elapsed)  # noqa: S307 - the repr of bytes we printed

    for line in (b"CONNECT allowed.test HTTP/1.1\r\n\r\n", b"CONNECT :443 HTTP/1.1\r\n\r\n",
                 b"CONNECT allowed.test:99999 HTTP/1.1\r\n\r\n", b"\x00\xff garbage\r\n\r\n",
                 b"GET /relative HTTP/1.1\r\n\r\n", b"CONNECT a b c d\r\n\r\n",
                 b"GET ftp://allowed.test/ HTTP/1.1\r\n\r\n"):
        assert exchange(line)[0].startswith(b"HTTP/1.1 400 "), line
    assert exchange(b"CONNECT allowed.test:443 HTTP/1.1\r\nX: " + b"a" * 20000
                    + b"\r\n\r\n")[0].startswith(b"HTTP/1.1 431 ")
    # Slowloris: half a request head, then silence: dropped after header_timeout_s.
    reply, elapsed = exchange(b"CONNECT allowed.test:8443 HTTP/1.1\r\nHost: a", timeout=10)
    assert reply.startswith(b"HTTP/1.1 408 ") and elapsed < patience.seconds(5)
    # An IP literal is allowed only when listed; the proxy's own addresses never.
    began = time.monotonic()  # the first denial, which opens the limit's window
    assert exchange(f"CONNECT {link['host_address']}:22 HTTP/1.1\r\n\r\n".encode())[0] \
        .startswith(b"HTTP/1.1 403 ")
    # The hub holds nothing but the proxy: no host service is reachable from the link.
    assert "ERROR" in world.in_sandbox(net, name, world.DIRECT, link["host_address"], "22")

    # Denials beyond the rate limit are counted, not written.
    for _ in range(30):
        assert exchange(b"CONNECT denied.test:443 HTTP/1.1\r\n\r\n")[0] \
            .startswith(b"HTTP/1.1 403")
    denied = audit(net, "network.denied", name)
    if time.monotonic() - began < WINDOW_S - 5:  # all 31 denials in the limit's window
        assert len(denied) == LIMIT
    else:  # an emulated machine: a second window began, which writes its own
        assert LIMIT <= len(denied) <= 31 and sum(
            e["details"].get("suppressed", 0) for e in denied) <= 31 - LIMIT, denied

    # 1,000 tunnels open at once, however long opening them takes here (the
    # script waits while they keep opening); then every descriptor is released,
    # waited for as long as their number keeps falling.
    assert world.in_hub(net, TUNNELS, *address, "1000", str(patience.seconds(60)),
                        timeout=3600) == "1000"

    def descriptors() -> int:
        return len(os.listdir(f"/proc/{proxy}/fd"))

    fewest, since = descriptors(), time.monotonic()
    while (held := descriptors()) > before + 2:
        if held < fewest:
            fewest, since = held, time.monotonic()
        assert time.monotonic() - since < 60, \
            f"the proxy holds {held} descriptors ({before} before the tunnels): none released"
        time.sleep(0.1)
    # Still serving the sandbox.
    assert fetch(net, name, upstream.url("allowed.test")) == "STATUS 200 1024"


def test_nothing_left_after_sigkill_of_everything_and_start(net, upstream):
    first = start_proxy_sandbox(net, upstream, "crun", "kill", "allowed.test")
    second = start_proxy_sandbox(net, upstream, "runc", "kill", "allowed.test")
    links = {n: link_of(net, n) for n in (first, second)}
    proxy = world.proxy_pid(net)
    victims = [proxy]
    for name in (first, second):
        state = json.loads((net.paths.sandbox(name).runtime / "state.json").read_text())
        victims += [state["conmon_pid"], state["pid"]]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: net.status(first)["state"] != "running"
             and net.status(second)["state"] != "running", 10)
    assert f"tappass-{first}" in world.netns_names()  # what the crash left

    agent = python_agent(net.root / "agent-again", SLEEPER)
    net.start_ok(second, agent, "runc")
    assert_gone(net, first, links[first])
    proxy = world.proxy_pid(net)
    assert proxy and world.listening(net, proxy, link_of(net, second)["host_address"])
    net.wait_log(second, "agent up")
    assert fetch(net, second, upstream.url("allowed.test")) == "STATUS 200 1024"

    assert net.run("stop", second, "--timeout", "2").returncode == 0
    assert_gone(net, second, link_of_or(links[second], net, second))


def test_a_killed_proxy_comes_back_for_running_sandboxes(net, upstream):
    """The proxy alone dies: the next start brings one up that listens again
    for the sandboxes still running."""
    first = start_proxy_sandbox(net, upstream, "crun", "revive", "allowed.test")
    os.kill(world.proxy_pid(net), signal.SIGKILL)
    wait_for(lambda: world.proxy_pid(net) is None, 10)
    assert fetch(net, first, upstream.url("allowed.test")).startswith("ERROR")
    start_proxy_sandbox(net, upstream, "runc", "revive", "allowed.test")
    assert fetch(net, first, upstream.url("allowed.test")) == "STATUS 200 1024"


def link_of_or(default: dict, host, name: str) -> dict:
    try:
        return link_of(host, name)
    except FileNotFoundError:
        return default


def test_agent_exit_removes_its_network(net, upstream):
    """The exit hook (conmon) removes the namespace when the agent ends by itself."""
    name = unique_name("exits", "crun")
    net.net_names.append(name)
    net.enroll(name, network=world.proxy_policy(upstream, "allowed.test"))
    agent = python_agent(net.root / "agent-exits", "import time; time.sleep(0.5)\n")
    net.start_ok(name, agent, "crun")
    link = link_of(net, name)
    net.wait_exited(name)
    assert_gone(net, name, link)


# --- the decision and its pieces, as pure functions ----------------------------


def policy_of(*patterns: str) -> egress.Policy:
    return egress.from_keyring({"network": {"mode": "proxy", "allow_domains": list(patterns)}})


def test_allow_decision():
    p = policy_of("api.tappass.ai", "*.example.com", "169.254.1.2", "BÜCHER.example")
    assert egress.check_name(p, "api.tappass.ai") is None
    assert egress.check_name(p, "API.TapPass.AI") is None
    assert egress.check_name(p, "a.b.example.com") is None
    assert egress.check_name(p, "example.com") == egress.NOT_ALLOWED
    assert egress.check_name(p, "evil-example.com") == egress.NOT_ALLOWED
    assert egress.check_name(p, "api.tappass.ai.evil.com") == egress.NOT_ALLOWED
    assert egress.check_name(p, "bücher.example") is None
    assert egress.check_name(p, "xn--bcher-kva.example") is None
    assert egress.check_name(p, "169.254.1.2") is None
    assert egress.check_name(p, "10.0.0.1") == egress.IP_NOT_LISTED
    assert egress.check_name(p, "::ffff:169.254.1.2") is None
    off = egress.from_keyring({"network": {"mode": "none", "allow_domains": ["a.b"]}})
    assert egress.check_name(off, "a.b") == egress.PROXY_OFF


def test_server_name_decision():
    p = policy_of("api.tappass.ai", "*.example.com", "169.254.1.2")
    assert egress.check_server_name(p, "api.tappass.ai", "api.tappass.ai") is None
    assert egress.check_server_name(p, "API.tappass.ai", "api.TAPPASS.ai") is None
    assert egress.check_server_name(p, "api.tappass.ai", None) is None  # no SNI at all
    assert egress.check_server_name(p, "api.tappass.ai", "a.example.com") is None
    assert egress.check_server_name(p, "169.254.1.2", "api.tappass.ai") is None
    for fronted in ("evil.com", "*.example.com", "api.tappass.ai.", "tappass.ai"):
        assert egress.check_server_name(p, "api.tappass.ai", fronted) == \
            egress.SNI_NOT_ALLOWED, fronted
    assert egress.check_name(p, "*.example.com") == egress.NOT_ALLOWED  # a name, not a pattern


def _client_hello(server_name: str | None) -> bytes:
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _reframed(hello: bytes, first: int) -> bytes:
    """The same ClientHello split over two records, as TLS allows."""
    message = hello[5:]
    return b"".join(b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part
                    for part in (message[:first], message[first:]))


def test_client_hello_server_name():
    from tappass_host.network import client_hello as ch

    hello = _client_hello("api.tappass.ai")
    assert ch.is_tls(hello[0]) and not ch.is_tls(b"G"[0])
    assert ch.needed(hello[:3]) == 2 and ch.needed(hello[:5]) == len(hello) - 5
    assert ch.needed(hello) == 0 and ch.server_name(hello) == "api.tappass.ai"
    assert ch.server_name(_client_hello(None)) is None
    for first in (2, 40, len(hello) - 10):
        split = _reframed(hello, first)
        assert ch.needed(split[:len(split) - 1]) == 1
        assert ch.needed(split) == 0 and ch.server_name(split) == "api.tappass.ai"
    bad = [
        b"\x17\x03\x03\x00\x05hello",                    # application data, not a handshake
        b"\x16\x03\x01\x00\x00",                          # an empty record
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",        # a ServerHello
        b"\x16\x03\x01\xff\xff",                          # past the size the proxy holds
    ]
    for data in bad:
        with pytest.raises(ch.Malformed):
            ch.needed(data)
    with pytest.raises(ch.Malformed):
        ch.server_name(hello[:60])  # cut inside its cipher suites


def test_destination_refuses_private_unless_listed():
    import ipaddress

    ip = ipaddress.ip_address
    p = policy_of("a.example", "169.254.1.2")
    for private in ("127.0.0.1", "10.1.1.1", "192.168.0.1", "172.16.0.1", "169.254.9.9",
                    "0.0.0.0", "224.0.0.1", "::1", "fe80::1", "fc00::1", "100.64.0.1",
                    "::ffff:127.0.0.1", *world.NOT_GLOBAL_V6.values(), "64:ff9b::5db8:d822",
                    "2002:5db8:d822::1", "::5db8:d822", "fec0:1::1"):
        assert egress.pick_destination(p, [ip(private)]) == egress.PRIVATE_ADDRESS, private
    assert egress.pick_destination(p, [ip("2606:2800:220:1::1")]) == ip("2606:2800:220:1::1")
    assert egress.pick_destination(p, [ip("127.0.0.1"), ip("93.184.216.34")]) == \
        ip("93.184.216.34")
    assert egress.pick_destination(p, [ip("169.254.1.2")]) == ip("169.254.1.2")


def test_request_parsing():
    assert parse_head(b"CONNECT a.example:443 HTTP/1.1\r\n\r\n").port == 443
    request = parse_head(b"GET http://a.example:81/x?q=1 HTTP/1.1\r\nProxy-Authorization: s\r\n"
                         b"Accept: */*\r\n\r\n")
    assert (request.host, request.port, request.path) == ("a.example", 81, "/x?q=1")
    assert request.headers == (b"Accept: */*",)
    for bad in (b"CONNECT a.example HTTP/1.1\r\n\r\n", b"GET /x HTTP/1.1\r\n\r\n",
                b"GET http://u:p@a.example/ HTTP/1.1\r\n\r\n",
                b"CONNECT a.example:443 HTTP/2\r\n\r\n", b"CONNECT a.example:0 HTTP/1.1\r\n\r\n",
                b"CONNECT a.example:443 HTTP/1.1\r\nno colon\r\n\r\n",
                b"GET http://a.example/ HTTP/1.1\r\nA: 1\nB: 2\r\n\r\n",
                b"GET http://a.example/ HTTP/1.1\r\nA: 1\rB: 2\r\n\r\n",
                b"GET http://a.example/ HTTP/1.1\r\nA: 1\r\n\tB: 2\r\n\r\n",
                b"GET http://a.example/\x0c HTTP/1.1\r\n\r\n",
                "GET http://a.example/\u00e9 HTTP/1.1\r\n\r\n".encode(),
                b"GET http://a.example/ HTTP/1.1\r\nContent-Length: 1x\r\n\r\n",
                b"GET http://a.example/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Length: 1\r\n\r\n"):
        with pytest.raises(BadRequest):
            parse_head(bad)
    # Field values may hold HTAB and UTF-8; the Connection header's options are hop-by-hop.
    request = parse_head("GET http://a.example/ HTTP/1.1\r\nX-A:\tcafé \r\n"
                         "Connection: keep-alive, X-Secret\r\nX-Secret: s\r\n\r\n".encode())
    assert request.headers == ("X-A:\tcafé ".encode(),)


def test_response_heads_say_close():
    answer = ResponseHeads()
    assert answer.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nConn") == \
        b"HTTP/1.1 100 Continue\r\n\r\n"
    assert not answer.done and answer.forwarded
    out = answer.feed(b"ection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
                      b"Content-Length: 4\r\n\r\nbo")
    assert out == b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbo"
    assert answer.done and answer.feed(b"dy\r\n\r\n") == b"dy\r\n\r\n"
    bare = ResponseHeads()
    assert bare.feed(b"HTTP/1.0 404 Not Found\nServer: x\n\nbody") == \
        b"HTTP/1.0 404 Not Found\r\nServer: x\r\nConnection: close\r\n\r\nbody"
    for bad in (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", b"HTTP/1.1 200 OK\r\nA: 1\r\n folded\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nA: " + b"a" * 70000):
        with pytest.raises(BadResponse):
            ResponseHeads().feed(bad)
    assert not ResponseHeads().forwarded


def test_tls_alert_record():
    from tappass_host.network import client_hello as ch

    assert ch.alert(ch.ACCESS_DENIED) == bytes([21, 3, 3, 0, 2, 2, 49])


def test_allowed_ports_setting(tmp_path):
    from tappass_host import config
    from tappass_host.errors import ConfigError
    from tappass_host.network.settings import Settings, parse
    from tappass_host.paths import HostPaths

    assert config.DEFAULTS["network"]["allow_ports"] == [443, 80]
    assert egress.check_port(egress.DEFAULT_PORTS, 443) is None
    assert egress.check_port(frozenset({443, 80}), 22) == egress.PORT_NOT_ALLOWED
    paths = HostPaths(state=Path("/s"), runtime=Path("/r"))
    settings = Settings(port=3128, pool="169.254.64.0/18", allow_ports=(443, 8443))
    assert parse(settings.argv(paths)) == (paths, settings)
    assert parse(Settings(port=1, pool="p", allow_ports=()).argv(paths))[1].allow_ports == ()
    assert Settings.from_config(config.load(None)).allow_ports == (443, 80)
    for bad in ("[0]", "[65536]", '["443"]', "[true]", "443"):
        (tmp_path / "config.toml").write_text(f"[network]\nallow_ports = {bad}\n")
        with pytest.raises(ConfigError, match="'network.allow_ports' must be"):
            config.load(tmp_path / "config.toml")


def test_denials_are_rate_limited():
    written = []
    now = [0.0]
    log = DenialLog(lambda *event: written.append(event), limit=3, window=60,
                    clock=lambda: now[0])
    for _ in range(10):
        log.denied("s", "x.example", "not_allowed")
    assert len(written) == 3
    now[0] = 61
    log.denied("s", "y.example", "not_allowed")
    assert written[-1][2] == {"host": "y.example", "reason": "not_allowed", "suppressed": 7}
    log.denied("other", "x.example", "not_allowed")
    assert written[-1][1] == "other"


def test_invariants_accept_only_the_sandboxes_own_namespace(tmp_path, monkeypatch):
    """A layer may join tappass-<this sandbox>, never the host's nor another's."""
    from tappass_host.layers import Host

    monkeypatch.setattr(invariants, "_RULES", (invariants._check_namespaces,))
    mine = unique_name("inv")
    state = tmp_path / "state"

    def check(path: str) -> None:
        config = {"linux": {"namespaces": [{"type": t} for t in
                                           ("pid", "mount", "ipc", "uts")]
                            + [{"type": "network", "path": path}]}}
        invariants.check(config, state_dir=state,
                         keyring_dir=state / "sandboxes" / mine / "keyring",
                         workspace_dir=state / "sandboxes" / mine / "workspace",
                         rootless=False, provenance={"linux.namespaces[4]": "evil"},
                         host=Host(rootless=False, agent_uid=200000, agent_gid=200000),
                         rootfs=state / "bundle" / "rootfs")

    check(network.netns_path(mine))
    for path in ("/proc/1/ns/net", "/run/netns/tappass-other", "/run/netns/other",
                 "/run/netns/../netns/tappass-other", "/run/netns"):
        with pytest.raises(invariants.InvariantViolation, match="host network namespace"):
            check(path)
    own = network.netns_path(mine)  # ours by name, the host's in fact
    os.makedirs("/run/netns", exist_ok=True)
    os.symlink("/proc/self/ns/net", own)
    try:
        with pytest.raises(invariants.InvariantViolation):
            check(own)
    finally:
        os.unlink(own)


# --- the same live change, published to the devplane and received by the daemon ---


def test_published_allowlist_takes_effect_live_and_daemon_cleans_up(devplane, tmp_path,
                                                                     upstream):
    import uuid

    from daemon_fixture import POLICY, SYNC_CONFIG, DaemonProcess, enroll, publish
    from devplane_fixture import new_host_state, run_host

    host = new_host_state(tmp_path, "host")
    host.config.write_text(SYNC_CONFIG + f'[network]\nhosts_file = "{upstream.hosts_file}"\n'
                           f"allow_ports = {world.TEST_PORTS}\n")
    name = "netd-" + uuid.uuid4().hex[:6]
    daemon = None
    try:
        enroll(devplane, host, name)

        def policy(*names: str) -> dict:
            return {**POLICY, "network": world.proxy_policy(upstream, *names)}

        def fetch_here(url: str) -> str:
            result = run_host(host, "shell", name, "--", "python3", "-c", world.CLIENT, url,
                              "/workspace/ca.pem")
            assert result.returncode == 0, result.stderr
            return result.stdout.strip()

        assert publish(devplane, tmp_path, policy("allowed.test"), name) == 1
        agent = python_agent(tmp_path / "agent", SLEEPER)
        result = run_host(host, "start", name, "--agent", str(agent), "--runtime", "crun")
        assert result.returncode == 0, result.stderr
        ca = host.paths.sandbox(name).workspace / "ca.pem"
        ca.write_bytes(upstream.ca_pem.read_bytes())
        ca.chmod(0o644)
        daemon = DaemonProcess(host, tmp_path / "daemon.log")
        daemon.wait_line(f"{name}: stream open (policy_version 1)")
        assert "403" in fetch_here(upstream.url("later.test"))

        assert publish(devplane, tmp_path, policy("allowed.test", "later.test"), name) == 2
        daemon.wait_line(f"{name}: applied policy_version 2")
        assert fetch_here(upstream.url("later.test")) == "STATUS 200 1024"
        assert publish(devplane, tmp_path, policy("allowed.test"), name) == 3
        daemon.wait_line(f"{name}: applied policy_version 3")
        assert "403" in fetch_here(upstream.url("later.test"))

        # Everything dies; the daemon (no start needed) removes what was left.
        records = host.paths.runtime / "network" / "sandboxes"
        link = json.loads((records / f"{name}.json").read_text())
        state = json.loads((host.paths.sandbox(name).runtime / "state.json").read_text())
        for pid in (int((host.paths.runtime / "network" / "proxy.pid").read_text()),
                    state["conmon_pid"], state["pid"]):
            os.kill(pid, signal.SIGKILL)
        daemon.wait_line(f"removed the network of stopped sandbox(es) {name}", timeout=20)
        wait_for(lambda: f"tappass-{name}" not in world.netns_names(), 10)
        assert not (records / f"{name}.json").exists()
        hub_links = subprocess.run(["ip", "-n", network.hub_name(host.paths), "-o", "link"],
                                   capture_output=True, text=True).stdout
        assert link["host_ifname"] not in hub_links
    finally:
        if daemon is not None:
            daemon.terminate()
        run_host(host, "stop", name, "--timeout", "1")
        subprocess.run(["crun", "--root", str(host.paths.runtime / "oci" / "crun"), "delete",
                        "--force", f"tappass-{name}"], capture_output=True)
        # the proxy the file names only if it is still ours: the one killed above left its
        # number there, which on a busy host (pid_max 32768 here) another process may have
        # by now, e.g. another test's agent
        proxy = world.proxy_pid(host)
        if proxy:
            os.kill(proxy, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", f"tappass-{name}"], capture_output=True)
        subprocess.run(["ip", "netns", "del", network.hub_name(host.paths)], capture_output=True)


def test_network_layer_output():
    from types import SimpleNamespace

    from tappass_host import layers
    from tappass_host.layers import network as layer

    def inputs(mode: str, rootless: bool = False, proxy: str = "http://169.254.64.1:3128"):
        host = layers.Host(rootless=rootless, agent_uid=1000, agent_gid=1000, egress_proxy=proxy)
        return SimpleNamespace(name="demo", host=host,
                               keyring={"network": {"mode": mode, "allow_domains": ["a.b"]}})

    result = layer.apply(inputs("proxy"))
    assert result.oci["linux"]["namespaces"] == [{"type": "network",
                                                  "path": "/run/netns/tappass-demo"}]
    env = dict(e.split("=", 1) for e in result.oci["process"]["env"])
    assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://169.254.64.1:3128"
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1"
    assert "network.allow_domains" in result.hot_reload and "network.mode" in result.restart
    assert layer.apply(inputs("none")).oci == {}
    for bad in (inputs("proxy", rootless=True), inputs("proxy", proxy=""), inputs("open")):
        with pytest.raises(layers.LayerUnavailable):
            layer.apply(bad)


def test_control_socket_works_under_a_state_dir_deeper_than_af_unix_allows(tmp_path):
    """AF_UNIX paths stop at 108 bytes; state dirs do not."""
    import threading

    from tappass_host.network import control, service
    from tappass_host.paths import HostPaths

    deep = tmp_path.joinpath(*["d" * 40] * 4)
    paths = HostPaths(state=deep / "state", runtime=deep / "run")
    network.service_dir(paths).mkdir(parents=True)
    assert len(str(network.control_socket(paths))) > 108
    listener = service._bound_control_socket(paths)
    listener.listen(1)

    def answer():
        conn, _ = listener.accept()
        with conn:
            assert json.loads(conn.recv(1024)) == {"op": "ping"}
            conn.sendall(b'{"ok": true}\n')

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        assert control._ask(paths, {"op": "ping"}) == {"ok": True}
    finally:
        thread.join(patience.seconds(5))
        listener.close()
    assert oct(network.control_socket(paths).stat().st_mode & 0o777) == "0o600"
