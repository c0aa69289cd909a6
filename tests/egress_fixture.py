"""An upstream world for the egress proxy, for tests and benchmarks: a test
network namespace joined to the host by a veth with link-local addresses
(outside tappass-host's address pool), an HTTPS server (trustme CA) and a
plain HTTP server inside it — on the usual ports, the test's own, and SSH's
and SMTP's, each answering HTTP and logging every request line it reads —
and a hosts file naming it, for config `network.hosts_file`. Nothing outside
169.254.0.0/16 is ever used.
"""

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path

import trustme

import patience
from sandbox_fixture import Host, wait_for

HTTPS_PORT = 8443
HTTP_PORT = 8080
HTTPS_PORTS = [HTTPS_PORT, 443]
HTTP_PORTS = [HTTP_PORT, 80, 22, 25]   # 22, 25: what network.allow_ports keeps out
TEST_PORTS = [443, 80, HTTPS_PORT, HTTP_PORT]  # network.allow_ports of configure()
BODY_SIZE = 1024
NAMES = ["allowed.test", "later.test", "a.wild.test", "denied.test"]
# Names the hosts file points at IPv6 addresses that are not globally
# routable though Python's ipaddress calls them global.
NOT_GLOBAL_V6 = {"nat64.test": "64:ff9b::a9fe:c801", "nat64local.test": "64:ff9b:1::a9fe:c801",
                 "sixtofour.test": "2002:a9fe:c801::1", "compat.test": "::a9fe:c801",
                 "siit.test": "::ffff:0:a9fe:c801", "sitelocal.test": "fec0::1"}

SERVER = r'''
import http.server, socketserver, ssl, sys, threading

BODY = b"x" * int(sys.argv[4])
LOG = sys.argv[5]

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 65536  # head and body in one write: no Nagle/delayed-ACK stall
    disable_nagle_algorithm = True
    def parse_request(self):
        with open(LOG, "a") as log:
            log.write(self.raw_requestline.decode("latin-1").rstrip("\r\n") + "\n")
        return super().parse_request()
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.send_header("X-Host", self.headers.get("Host", ""))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *args):
        pass

class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 1024

context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
context.load_cert_chain(sys.argv[3])
servers = []
for port in sys.argv[1].split(","):
    tls = Server(("0.0.0.0", int(port)), Handler)
    # The handshake in the handler's thread, not in accept(): one slow client
    # must not hold up the others.
    tls.socket = context.wrap_socket(tls.socket, server_side=True, do_handshake_on_connect=False)
    servers.append(tls)
servers += [Server(("0.0.0.0", int(port)), Handler) for port in sys.argv[2].split(",")]
for server in servers[1:]:
    threading.Thread(target=server.serve_forever, daemon=True).start()
print("serving", flush=True)
servers[0].serve_forever()
'''

# Run inside a sandbox (python3 -c): one request through the proxy the agent
# was given (urllib reads HTTPS_PROXY/HTTP_PROXY); prints one line.
CLIENT = textwrap.dedent(rf'''
    import ssl, sys, urllib.request, urllib.error
    url, cafile = sys.argv[1], sys.argv[2]
    context = ssl.create_default_context(cafile=cafile)
    try:
        with urllib.request.urlopen(url, context=context, timeout={patience.seconds(10)}) as r:
            print("STATUS", r.status, len(r.read()))
    except urllib.error.HTTPError as e:
        print("STATUS", e.code, 0)
    except OSError as e:
        print("ERROR", getattr(e, "reason", e))
''')

# Run inside a sandbox: raw bytes to the proxy the agent was given; prints the answer's head.
RAW = textwrap.dedent(rf'''
    import os, socket, sys, urllib.parse
    proxy = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
    with socket.create_connection((proxy.hostname, proxy.port), timeout={patience.seconds(10)}) as sock:
        sock.sendall(bytes.fromhex(sys.argv[1]))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    print(answer.split(b"\r\n\r\n")[0].decode())
''')

# Run inside a sandbox: a direct TCP connection, no proxy.
DIRECT = textwrap.dedent(rf'''
    import socket, sys
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout={patience.seconds(3)}).close()
        print("CONNECTED")
    except OSError as e:
        print("ERROR", e.errno, e.strerror)
''')


@dataclass
class Upstream:
    netns: str
    host_ifname: str
    host_address: str
    address: str
    ca_pem: Path
    hosts_file: Path
    process: subprocess.Popen
    requests_log: Path

    def url(self, name: str, tls: bool = True, port: int | None = None) -> str:
        port = port or (HTTPS_PORT if tls else HTTP_PORT)
        return f"{'https' if tls else 'http'}://{name}:{port}/"

    def requests_seen(self) -> str:
        """Every request line the upstream has read, one a line."""
        return self.requests_log.read_text() if self.requests_log.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        subprocess.run(["ip", "link", "del", self.host_ifname], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _claim_block(ifname: str) -> tuple[str, str]:
    """A /30 in 169.254.200.0/22 (off the default pool) that no interface on
    the host has yet, assigned to `ifname`: (host end, upstream end). Under a
    lock, since parallel test workers claim blocks at the same time."""
    with open("/run/tappass-test-egress.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        used = subprocess.run(["ip", "-4", "-o", "addr", "show"], check=True,
                              capture_output=True, text=True).stdout
        for base in range(0, 1024, 4):
            host_address = f"169.254.{200 + base // 256}.{base % 256 + 1}"
            if f" {host_address}/" not in used:
                _ip("addr", "add", f"{host_address}/30", "dev", ifname)
                return host_address, f"169.254.{200 + base // 256}.{base % 256 + 2}"
    raise AssertionError("no free /30 left in 169.254.200.0/22 for a test upstream")


def start_upstream(directory: Path) -> Upstream:
    """The test server's namespace, link, certificates and hosts file."""
    directory.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:6]
    netns, ifname = f"tpt-{tag}", f"tpt{tag}"
    _ip("netns", "add", netns)
    try:
        _ip("link", "add", ifname, "type", "veth", "peer", "name", "up0", "netns", netns)
        host_address, address = _claim_block(ifname)
        _ip("link", "set", ifname, "up")
        _ip("-n", netns, "addr", "add", f"{address}/30", "dev", "up0")
        _ip("-n", netns, "link", "set", "up0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        ca = trustme.CA()
        cert = ca.issue_cert(*NAMES, address)
        ca_pem, cert_pem = directory / "ca.pem", directory / "server.pem"
        ca.cert_pem.write_to_path(str(ca_pem))
        cert.private_key_and_cert_chain_pem.write_to_path(str(cert_pem))
        ca_pem.chmod(0o644)
        hosts = directory / "hosts"
        hosts.write_text(f"{address} {' '.join(NAMES)}\n127.0.0.1 loop.test\n"
                         "10.9.8.7 private.test\n" + "".join(
                             f"{ip} {name}\n" for name, ip in NOT_GLOBAL_V6.items()))
        requests_log = directory / "requests.log"
        process = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c", SERVER,
             ",".join(map(str, HTTPS_PORTS)), ",".join(map(str, HTTP_PORTS)), str(cert_pem),
             str(BODY_SIZE), str(requests_log)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert process.stdout.readline().strip() == "serving"
    except BaseException:
        subprocess.run(["ip", "link", "del", ifname], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        raise
    return Upstream(netns, ifname, host_address, address, ca_pem, hosts_file=hosts,
                    process=process, requests_log=requests_log)


def configure(host: Host, upstream: Upstream, header_timeout: float = 1.0) -> None:
    """The egress settings of the network tests. The proxy's header timeout is a
    deadline (a head that takes longer is dropped with 408), so it scales with the
    machine (tests/patience.py): under emulation 1,000 heads arriving at once took
    the proxy more than 1 s each to read, and every one was dropped."""
    host.configure(f'[network]\nhosts_file = "{upstream.hosts_file}"\n'
                   f"header_timeout_s = {patience.seconds(header_timeout)}\n"
                   f"allow_ports = {TEST_PORTS}\n")


def proxy_policy(upstream: Upstream, *names: str) -> dict:
    return {"mode": "proxy", "allow_domains": [*names, upstream.address]}


def proxy_pid(host: Host) -> int | None:
    try:
        pid = int((host.paths.runtime / "network" / "proxy.pid").read_text())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"tappass_host.network" in cmdline and str(host.root).encode() in cmdline \
        else None


def put_in_workspace(host: Host, name: str, files: dict[str, bytes | str]) -> None:
    workspace = host.paths.sandbox(name).workspace
    for relpath, data in files.items():
        path = workspace / relpath
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        path.chmod(0o644)


def in_sandbox(host: Host, name: str, source: str, *args: str, timeout: float = 60) -> str:
    result = host.run("shell", name, "--", "python3", "-c", source, *args, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def netns_names() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def hub(host: Host) -> str:
    from tappass_host import network

    return network.hub_name(host.paths)


def link_names(host: Host) -> set[str]:
    """Interfaces on the host and in the host's egress hub."""
    names = set(os.listdir("/sys/class/net"))
    result = subprocess.run(["ip", "-n", hub(host), "-o", "link"], capture_output=True,
                            text=True)
    names |= {line.split(":")[1].strip().split("@")[0] for line in result.stdout.splitlines()}
    return names


def in_hub(host: Host, source: str, *args: str, timeout: float = 120) -> str:
    """Run python `source` in the egress hub: where the proxy listens."""
    result = subprocess.run(["ip", "netns", "exec", hub(host), sys.executable, "-c", source,
                             *args], capture_output=True, text=True,
                            timeout=patience.seconds(timeout))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def listening(host: Host, pid: int, address: str) -> bool:
    """Does process `pid` hold a socket listening on `address` in the hub?"""
    a, b, c, d = address.split(".")
    hex_address = f"{int(d):02X}{int(c):02X}{int(b):02X}{int(a):02X}"
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    tcp = in_hub(host, "print(open('/proc/net/tcp').read())")
    rows = [line.split() for line in tcp.splitlines()[1:]]
    return any(r[1].startswith(hex_address + ":") and r[3] == "0A" and r[9] in inodes
               for r in rows)


def teardown(host: Host, names: list[str]) -> None:
    """After the test: stop sandboxes, end the proxy, remove what is left."""
    for name in names:
        host._cleanup_sandbox(name)
    pid = proxy_pid(host)
    if pid:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{pid}").exists() or
                 "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3], 10)
    for name in names:
        subprocess.run(["ip", "netns", "del", f"tappass-{name}"], capture_output=True)
    subprocess.run(["ip", "netns", "del", hub(host)], capture_output=True)
