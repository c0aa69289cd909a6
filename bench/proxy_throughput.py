"""Benchmark: HTTPS requests through the egress proxy from inside a real
sandbox (crun, network.mode = proxy) against the same requests made directly
from the host to the same test server, alternating, in the same run.

The server lives in a test network namespace on a link-local veth
(tests/egress_fixture.py) and answers every GET with 1 KiB. Two patterns:
`keepalive` (one tunnel per worker, many requests over it: what the relay
costs) and `fresh` (a new connection, CONNECT and TLS handshake per request:
what the per-connection policy decision costs). The same client script runs
in both places; only the route differs (HTTPS_PROXY inside, the server's
address directly on the host).

Latency (p50, p99) is measured one request at a time; throughput (rps)
with --workers concurrent clients. Goals: p99 added by the proxy <= 2 ms;
throughput >= 50 % of direct.
Needs root. Prints one JSON object.
Usage: python bench/proxy_throughput.py [--requests N] [--workers W] [--rounds R]
"""

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from _sandboxes import ensure_crun_works, new_host, precompile, python_agent, unique_name

import egress_fixture as world

CLIENT = r'''
import http.client, json, os, ssl, sys, threading, time, urllib.parse

mode, name, address, cafile = sys.argv[1:5]
requests, workers, pattern = int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
context = ssl.create_default_context(cafile=cafile)
proxy = urllib.parse.urlsplit(os.environ.get("HTTPS_PROXY", "")) if mode == "proxy" else None


def connect():
    if proxy:
        conn = http.client.HTTPSConnection(proxy.hostname, proxy.port, context=context,
                                           timeout=10)
        conn.set_tunnel(name, 8443)
        return conn
    return http.client.HTTPSConnection(address, 8443, context=context, timeout=10)


def get(conn):
    conn.request("GET", "/")
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200 and len(body) == 1024, (response.status, len(body))


latencies = []
lock = threading.Lock()


def worker(count):
    mine = []
    conn = connect() if pattern == "keepalive" else None
    if conn:
        get(conn)  # warm: the tunnel and TLS are set up outside the timing
    for _ in range(count):
        started = time.perf_counter()
        if pattern == "keepalive":
            get(conn)
        else:
            fresh = connect()
            get(fresh)
            fresh.close()
        mine.append(time.perf_counter() - started)
    if conn:
        conn.close()
    with lock:
        latencies.extend(mine)


threads = [threading.Thread(target=worker, args=(requests // workers,)) for _ in range(workers)]
started = time.perf_counter()
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.perf_counter() - started
latencies.sort()
print(json.dumps({"requests": len(latencies), "rps": round(len(latencies) / elapsed, 1),
                  "p50_ms": round(latencies[len(latencies) // 2] * 1e3, 3),
                  "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1e3, 3)}))
'''

SLEEPER = "import time\nprint('agent up', flush=True)\ntime.sleep(3600)\n"


def summarize(runs: list[dict]) -> dict:
    """Medians over the rounds."""
    return {"rps": round(statistics.median(r["rps"] for r in runs), 1),
            "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 3),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ensure_crun_works()
    precompile()
    directory = Path(tempfile.mkdtemp(prefix="tp-bench-"))
    upstream = world.start_upstream(directory / "upstream")
    host = new_host()
    name = unique_name("bench-proxy", "crun")
    try:
        world.configure(host, upstream, header_timeout=10.0)
        host.enroll(name, network=world.proxy_policy(upstream, "allowed.test"),
                    process={"memory_mb": 512, "pids_max": 128, "cpu_millis": 2000})
        host.start_ok(name, python_agent(host.root / "agent", SLEEPER), "crun")
        host.wait_log(name, "agent up")
        world.put_in_workspace(host, name, {"ca.pem": upstream.ca_pem.read_bytes(),
                                            "client.py": CLIENT})
        client = host.paths.sandbox(name).workspace / "client.py"

        def through_proxy(pattern: str, count: int, workers: int) -> dict:
            result = host.run("shell", name, "--", "python3", "/workspace/client.py", "proxy",
                              "allowed.test", upstream.address, "/workspace/ca.pem", str(count),
                              str(workers), pattern, timeout=600)
            assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
            return json.loads(result.stdout)

        def direct(pattern: str, count: int, workers: int) -> dict:
            result = subprocess.run(
                [shutil.which("python3"), str(client), "direct", "allowed.test",
                 upstream.address, str(upstream.ca_pem), str(count), str(workers),
                 pattern], capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stderr
            return json.loads(result.stdout)

        def alternate(pattern: str, count: int, workers: int) -> tuple[dict, dict]:
            proxied, straight = [], []
            for _ in range(args.rounds):
                straight.append(direct(pattern, count, workers))
                proxied.append(through_proxy(pattern, count, workers))
            return summarize(proxied), summarize(straight)

        report = {"benchmark": "proxy_throughput", "response_bytes": world.BODY_SIZE,
                  "rounds": args.rounds, "runtime": "crun",
                  "latency_workers": 1, "throughput_workers": args.workers,
                  "goal_p99_added_ms_max": 2.0, "goal_throughput_ratio_min": 0.5}
        for pattern, count in (("keepalive", args.requests), ("fresh", args.requests // 4)):
            through_proxy(pattern, args.workers * 10, args.workers)  # warm up both paths
            direct(pattern, args.workers * 10, args.workers)
            # Latency one request at a time (no queueing of our own making);
            # throughput with several workers.
            p, d = alternate(pattern, count, 1)
            p_rps, d_rps = alternate(pattern, count, args.workers)
            report[pattern] = {
                "through_proxy": {**p, "rps": p_rps["rps"]},
                "direct": {**d, "rps": d_rps["rps"]},
                "p50_added_ms": round(p["p50_ms"] - d["p50_ms"], 3),
                "p99_added_ms": round(p["p99_ms"] - d["p99_ms"], 3),
                "throughput_ratio": round(p_rps["rps"] / d_rps["rps"], 3),
            }
        print(json.dumps(report, indent=2))
    finally:
        world.teardown(host, [name])
        host.cleanup()
        upstream.stop()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
