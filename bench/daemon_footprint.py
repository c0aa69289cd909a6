"""Benchmark: the daemon's memory and CPU with 8 sandboxes running under
crun, their streams open, idle for 60 s (the control plane's keepalive at
its real 15 s).

Figures: RSS (VmRSS, and the peak VmHWM) and CPU time (user + system, from
/proc/<pid>/stat) over the idle window, as a percentage of one core.
Baseline, same run, same window: an idle `python -c` that imports what the
daemon imports (httpx, cryptography's x509, jsonschema, the keyring core,
the daemon and supervision modules) and sleeps: what Python plus those
libraries cost before the daemon does anything.

Goal (issue 5): RSS ≤ 60 MiB, CPU ≤ 1 % of one core.
Needs root; re-executes itself under scripts/in-crun-namespace when needed.
Prints one JSON object. Usage: python bench/daemon_footprint.py [--seconds S]
"""

import argparse
import os
import subprocess
import time
from pathlib import Path

from _sandboxes import PYTHON, ensure_crun_works, precompile, unique_name

from _fleet import Fleet, json_dump

BASELINE = """
import time, httpx, jsonschema
from cryptography import x509
import tappass_host.sync.apply, tappass_host.daemon.loop, tappass_host.daemon.supervision
import tappass_host.identity.tls
print("ready", flush=True)
time.sleep(3600)
"""
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def memory_mib(pid: int) -> dict:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = round(int(value.split()[0]) / 1024, 1)
    return found


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def measure(pids: dict[str, int], seconds: float) -> dict:
    before = {k: cpu_seconds(pid) for k, pid in pids.items()}
    start = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    return {k: {"rss_mib": memory_mib(pid)["VmRSS"], "peak_rss_mib": memory_mib(pid)["VmHWM"],
                "cpu_percent_of_one_core": round(100 * (cpu_seconds(pid) - before[k]) / elapsed,
                                                 3),
                "threads": threads(pid)}
            for k, pid in pids.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--sandboxes", type=int, default=8)
    args = parser.parse_args()
    ensure_crun_works()
    precompile()
    fleet = Fleet(args.sandboxes, keepalive=15.0)
    baseline = subprocess.Popen([PYTHON, "-c", BASELINE], stdout=subprocess.PIPE, text=True)
    try:
        for i in range(args.sandboxes):
            fleet.start(fleet.enroll(unique_name(f"idle{i}")))
        pid = fleet.start_daemon()
        log = fleet.daemon_log.read_text()
        assert log.count("stream open") == args.sandboxes, log
        assert baseline.stdout.readline().strip() == "ready"
        time.sleep(2)  # past start-up
        figures = measure({"daemon": pid, "baseline_idle_python_same_imports": baseline.pid},
                          args.seconds)
        daemon = figures["daemon"]
        json_dump({
            "benchmark": "daemon_footprint",
            "sandboxes_running_and_streaming": args.sandboxes,
            "idle_seconds": args.seconds,
            **figures,
            "daemon_minus_baseline_rss_mib": round(
                daemon["rss_mib"] - figures["baseline_idle_python_same_imports"]["rss_mib"], 1),
            "goal": {"rss_mib": 60, "cpu_percent_of_one_core": 1},
            "goal_met": daemon["rss_mib"] <= 60 and daemon["cpu_percent_of_one_core"] <= 1,
        })
    finally:
        baseline.kill()
        baseline.wait()
        fleet.close()


if __name__ == "__main__":
    main()
