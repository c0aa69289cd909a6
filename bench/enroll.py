"""Benchmark: time from `init` start to enrolled, against a local devplane.

Runs the real `tappass-devplane serve` on 127.0.0.1 and measures, in one run:
  - enroll_in_process: `identity.enrollment.enroll()` called in this process
    (a fresh host state dir each time, so each run also creates the machine
    key and the audit key, as a first enrollment does);
  - enroll_cli: `python -m tappass_host init` in a subprocess (adds interpreter
    start-up and imports);
  - baseline: one bare TLS handshake, and one HTTPS request on a new
    connection (GET /v1/enroll/ca with httpx), each timed on its own.
Prints JSON with the median (and min/max) of RUNS runs of each, in ms.

    .venv/bin/python bench/enroll.py [--runs 20]
"""

import argparse
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tappass_host.devplane.state import DevplaneState
from tappass_host.identity import enrollment
from tappass_host.identity.tls import pinned_context
from tappass_host.paths import HostPaths


def summary(samples: list[float]) -> dict:
    ms = [s * 1000 for s in samples]
    return {"median_ms": round(statistics.median(ms), 2), "min_ms": round(min(ms), 2),
            "max_ms": round(max(ms), 2)}


def start_devplane(root: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "tappass_host.devplane", "serve", "--state",
                             str(root), "--listen", "127.0.0.1:0", "--quiet"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "serving on " not in line:
        proc.kill()
        raise SystemExit(f"devplane did not start: {line!r}")
    return proc, line.split("serving on ", 1)[1].strip()


def tls_handshake(host: str, port: int, context: ssl.SSLContext) -> float:
    start = time.perf_counter()
    with socket.create_connection((host, port)) as raw:
        with context.wrap_socket(raw, server_hostname=host):
            elapsed = time.perf_counter() - start
    return elapsed


def https_request(url: str, context: ssl.SSLContext) -> float:
    start = time.perf_counter()
    with httpx.Client(verify=context) as client:
        client.get(url + "/v1/enroll/ca").raise_for_status()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    runs = parser.parse_args().runs

    with tempfile.TemporaryDirectory(prefix="bench-enroll-") as tmp:
        tmp = Path(tmp)
        proc, url = start_devplane(tmp / "devplane")
        try:
            state = DevplaneState(tmp / "devplane")
            context = pinned_context(state.ca.pem)
            port = int(url.rsplit(":", 1)[1])
            trust = enrollment.TrustPolicy(pinned=(state.trust_key,))
            config = tmp / "config.toml"
            config.write_text("")
            env = {k: v for k, v in os.environ.items() if not k.startswith("TAPPASS_")}

            https_request(url, context)  # warm up both sides
            handshakes = [tls_handshake("127.0.0.1", port, context) for _ in range(runs)]
            requests = [https_request(url, context) for _ in range(runs)]

            in_process = []
            for i in range(runs):
                enroll_url = state.issue_bootstrap("bench", 900, url)
                paths = HostPaths.resolve(tmp / f"host-{i}")
                start = time.perf_counter()
                enrollment.enroll(paths, "bench", enroll_url, trust)
                in_process.append(time.perf_counter() - start)

            cli = []
            for i in range(runs):
                enroll_url = state.issue_bootstrap("bench", 900, url)
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "tappass_host", "--state-dir",
                                str(tmp / f"cli-{i}"), "--config", str(config), "init", "bench",
                                "--enroll-url", enroll_url, "--trust-key", state.trust_key],
                               check=True, capture_output=True, env=env)
                cli.append(time.perf_counter() - start)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)

    handshake, request = summary(handshakes), summary(requests)
    baseline = round(handshake["median_ms"] + request["median_ms"], 2)
    enroll = summary(in_process)
    print(json.dumps({
        "benchmark": "enroll",
        "runs": runs,
        "enroll_in_process": enroll,
        "enroll_cli_subprocess": summary(cli),
        "baseline": {"tls_handshake": handshake, "https_request_new_connection": request,
                     "handshake_plus_request_median_ms": baseline},
        "enroll_in_process_over_baseline": round(enroll["median_ms"] / baseline, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
