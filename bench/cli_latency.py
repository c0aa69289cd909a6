"""Benchmark: wall time of `tappass-host status` (all sandboxes, and one by
name), `stop NAME` (of a running sandbox), `logs NAME --tail 1` and
`--help`, from a non-editable install in a venv of its own
(bench/_installed.py; of the distribution's python3, `--python venv`: of the
test venv's), against `python -c pass` of that same venv,
alternating, in the same run. Goal: each at most 3x `python -c pass`.

The state dir holds two enrolled sandboxes with keyrings; one has run once
(detached, and exited), so `status` and `logs` read every file they read in real use.
Before each timed `stop`, a sandbox is started detached (not timed) under
crun or runc (`--runtime`), its agent a shell that exits on SIGTERM.

Prints one JSON object. Usage:
  python bench/cli_latency.py [--runs N] [--runtime runc|crun] [--cli installed|checkout] [--wheel FILE]
                              [--baseline-wheel FILE]
"""

import argparse
import json
import os
import statistics
import time

from _installed import base_python, installed_cli
from _sandboxes import ensure_crun_works, ms, new_host, run, unique_name, write_agent

GOAL_RATIO = 3.0
STOPPABLE = ["/bin/sh", "-c", "trap 'exit 0' TERM; echo ready; sleep 1000 & wait"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--runtime", choices=("crun", "runc"), default="runc")
    parser.add_argument("--cli", choices=("installed", "checkout"), default="installed")
    parser.add_argument("--wheel", help="measure this wheel instead of one built from the tree")
    parser.add_argument("--python", choices=("system", "venv"), default="system",
                        help="the interpreter of the install's venv (as bench/start_latency.py)")
    parser.add_argument("--baseline-wheel",
                        help="also time this wheel's status, logs and stop in the same rounds "
                             "(before/after)")
    args = parser.parse_args()
    ensure_crun_works()
    interpreter = base_python(args.python)
    cli = installed_cli(args.cli, args.wheel, interpreter)
    baseline = (installed_cli("installed", args.baseline_wheel, interpreter)
                if args.baseline_wheel else None)
    host = new_host()
    host.command = cli.command
    try:
        ran = host.enroll(unique_name("ran"))
        host.enroll(unique_name("idle"))
        stoppable = host.enroll(unique_name("stop"))
        agent = write_agent(host.root / "agent", ["/bin/sh", "-c", "echo one; echo two"])
        waiting = write_agent(host.root / "waiting", STOPPABLE)
        assert host.start(ran, agent, args.runtime).returncode == 0
        host.wait_exited(ran)
        commands = {
            "python_c_pass": [cli.python, "-c", "pass"],
            "status": host.argv("status"),
            "status_name": host.argv("status", ran),
            "logs_tail_1": host.argv("logs", ran, "--tail", "1"),
            "help": host.argv("--help"),
        }
        if baseline is not None:  # another build's CLI, on the same state
            for key in ("status", "status_name", "logs_tail_1"):
                commands[f"baseline_{key}"] = [*baseline.command,
                                               *commands[key][len(cli.command):]]
        start_argv = host.argv("start", stoppable, "--agent", str(waiting), "--runtime",
                               args.runtime)
        stop_argv = host.argv("stop", stoppable, "--timeout", "10")

        def stop_once(stop_argv: list[str] = stop_argv) -> float:
            started = run(start_argv)
            assert started.returncode == 0, started.stderr
            host.started.append(stoppable)
            host.wait_log(stoppable, "ready")  # the shell's trap is set
            start = time.perf_counter()
            result = run(stop_argv)
            elapsed = time.perf_counter() - start
            assert result.returncode == 0, result.stderr
            return elapsed

        for argv in commands.values():  # warm up
            result = run(argv)
            assert result.returncode == 0, (argv, result.stderr)
        assert host.run("logs", ran, "--tail", "1").stdout == "two\n"
        stop_once()
        samples = {key: [] for key in [*commands, "stop"]}
        if baseline is not None:
            samples["baseline_stop"] = []
        for _ in range(args.runs):
            for key, argv in commands.items():
                start = time.perf_counter()
                run(argv)
                samples[key].append(time.perf_counter() - start)
            samples["stop"].append(stop_once())
            if baseline is not None:
                samples["baseline_stop"].append(
                    stop_once([*baseline.command, *stop_argv[len(cli.command):]]))
        base = statistics.median(samples["python_c_pass"])
        ratios = {f"{key}_ratio": round(statistics.median(values) / base, 2)
                  for key, values in samples.items() if key != "python_c_pass"}
        if baseline is not None:
            ratios["baseline"] = args.baseline_wheel
        print(json.dumps({
            "benchmark": "cli_latency",
            "runs_each": args.runs,
            "cli": args.wheel or args.cli,
            "runtime": args.runtime,
            "python": interpreter,
            "load_average": os.getloadavg(),
            **{key: ms(values) for key, values in samples.items()},
            **ratios,
            "goal_ratio_max": GOAL_RATIO,
            "goal_met": all(ratios[f"{key}_ratio"] <= GOAL_RATIO
                            for key in ("status", "status_name", "stop", "logs_tail_1")),
        }, indent=2))
    finally:
        host.cleanup()
        cli.cleanup()
        if baseline is not None:
            baseline.cleanup()


if __name__ == "__main__":
    main()
