"""Benchmark: wall time of `tappass-host status` (all sandboxes, and one by
name) and `tappass-host --help`, against `python -c pass` with the same
interpreter (the venv's), alternating, in the same run.

The state dir holds two enrolled sandboxes with keyrings, one of which has
run once (foreground), so `status` reads every file it reads in real use.
No sandbox runs: status never calls the runtime.

Prints one JSON object. Usage: python bench/cli_latency.py [--runs N]
"""

import argparse
import json
import statistics
import time

from _sandboxes import PYTHON, ensure_crun_works, ms, new_host, precompile, run, unique_name, write_agent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    ensure_crun_works()
    precompile()
    host = new_host()
    try:
        ran = host.enroll(unique_name("ran"))
        host.enroll(unique_name("idle"))
        agent = write_agent(host.root / "agent", ["/bin/true"])
        assert host.start(ran, agent, "runc", "--foreground").returncode == 0
        commands = {
            "python_c_pass": [PYTHON, "-c", "pass"],
            "status": host.argv("status"),
            "status_name": host.argv("status", ran),
            "help": [PYTHON, "-m", "tappass_host", "--help"],
        }
        for argv in commands.values():
            assert run(argv).returncode == 0
        samples = {key: [] for key in commands}
        for _ in range(args.runs):
            for key, argv in commands.items():
                start = time.perf_counter()
                run(argv)
                samples[key].append(time.perf_counter() - start)
        base = statistics.median(samples["python_c_pass"])
        print(json.dumps({
            "benchmark": "cli_latency",
            "runs_each": args.runs,
            "bytecode": "precompiled",
            **{key: ms(values) for key, values in samples.items()},
            "status_ratio": round(statistics.median(samples["status"]) / base, 2),
            "status_name_ratio": round(statistics.median(samples["status_name"]) / base, 2),
            "help_ratio": round(statistics.median(samples["help"]) / base, 2),
            "goal_status_ratio_max": 5,
        }, indent=2))
    finally:
        host.cleanup()


if __name__ == "__main__":
    main()
