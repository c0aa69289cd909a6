"""Benchmark: per-sandbox host overhead while sandboxes run: the resident
memory of the monitor processes (conmon, one per sandbox; no Python process
stays behind) with 8 sandboxes running the sample agent (hello-agent).

Reported per runtime: the sum of conmon's VmRSS over the 8 sandboxes divided
by 8, the same for Pss (shared pages split between the conmons), and the
count of tappass-host processes left running (must be 0).

Needs root; re-executes itself under scripts/in-crun-namespace for crun.
Prints one JSON object. Usage: python bench/monitor_rss.py [--sandboxes N]
"""

import argparse
import json
import os
import time

from _sandboxes import REPO, ensure_crun_works, new_host, unique_name

HELLO_AGENT = REPO / "examples" / "hello-agent"


def kib(pid: int, path: str, key: str) -> int:
    with open(f"/proc/{pid}/{path}") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def python_processes(state: str) -> int:
    """Python processes of this state dir (conmon's own command line names the
    exit hook, so it is told apart by its executable)."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            executable = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
        except OSError:
            continue
        if executable.startswith("python") and state.encode() in b" ".join(argv):
            count += 1
    return count


def measure(runtime: str, count: int) -> dict:
    host = new_host()
    try:
        host.configure(f"max_sandboxes = {count}\n")
        names = [host.enroll(unique_name(f"rss{i}", runtime)) for i in range(count)]
        for name in names:
            result = host.start(name, HELLO_AGENT, runtime)
            assert result.returncode == 0, result.stderr
        for name in names:
            host.wait_log(name, "policy_version=1")
        time.sleep(0.5)
        states = [json.loads((host.paths.sandbox(n).runtime / "state.json").read_text())
                  for n in names]
        conmons = [s["conmon_pid"] for s in states]
        for pid in conmons:
            with open(f"/proc/{pid}/comm") as f:
                assert f.read().strip() == "conmon"
        rss = [kib(pid, "status", "VmRSS") for pid in conmons]
        pss = [kib(pid, "smaps_rollup", "Pss") for pid in conmons]
        return {
            "sandboxes_running": sum(host.status(n)["state"] == "running" for n in names),
            "monitor_rss_per_sandbox_kib": round(sum(rss) / count),
            "monitor_rss_per_sandbox_mib": round(sum(rss) / count / 1024, 2),
            "monitor_pss_per_sandbox_kib": round(sum(pss) / count),
            "monitor_rss_min_max_kib": [min(rss), max(rss)],
            "python_processes_left": python_processes(str(host.state)),
        }
    finally:
        host.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sandboxes", type=int, default=8)
    args = parser.parse_args()
    ensure_crun_works()
    print(json.dumps({
        "benchmark": "monitor_rss",
        "sandboxes": args.sandboxes,
        "monitor": "conmon",
        "crun": measure("crun", args.sandboxes),
        "runc": measure("runc", args.sandboxes),
        "goal_mib_per_sandbox_max": 3,
    }, indent=2))


if __name__ == "__main__":
    main()
