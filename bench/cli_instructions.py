"""Benchmark: instructions (valgrind callgrind's total Ir; this machine has no
perf counters) of the hot commands, from a non-editable install in a venv of
its own (bench/_installed.py): `python -c pass` of that venv, `status`,
`status NAME`, `logs NAME --tail 1`, `stop NAME` (the stop's own process:
stop and conmon's exit hook both record the exit, whichever comes first;
under valgrind the hook, which is not traced, comes first as a rule, so this
is a stop that does not sign), conmon's exit hook as conmon runs it
(runtime.start.exit_command, on the exit stop just recorded: what recording
the exit with the stop's record costs; their sum `stop_plus_exit_hook`) and
`start NAME --foreground --rm` of /bin/true (the CLI's process only: not the
runtime's, conmon's or the sandbox's; valgrind does not know the Landlock
system calls, so the host's config says kernel_layer = "best-effort" and the
start under valgrind runs without Landlock): `start_foreground_rm` reuses the
bundle a first start of the same inputs prepared (tappass_host.oci.bundle_cache),
`start_foreground_rm_rendered` renders and checks it again (that cache
emptied; the schema check's verdict still cached). Instruction counts do not depend on
the machine's load, unlike wall time (bench/cli_latency.py,
bench/start_latency.py).

`--baseline-wheel FILE` counts another build's in the same run, on the
same state. Prints one JSON object, millions of instructions. Usage:
  python bench/cli_instructions.py [--runtime crun|runc] [--wheel FILE] [--baseline-wheel FILE]
"""

import argparse
import json
import re
import shutil
import subprocess

from _installed import installed_cli
from _sandboxes import ensure_crun_works, new_host, unique_name, write_agent

STOPPABLE = ["/bin/sh", "-c", "trap 'exit 0' TERM; echo ready; sleep 1000 & wait"]


def instructions(argv: list[str]) -> float:
    """Millions of instructions `argv`'s own process ran (children not traced),
    from / (`python -m` imports from the working directory first: not this checkout)."""
    result = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                             *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, timeout=600, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    return round(int(re.search(r"Collected : (\d+)", result.stderr)[1]) / 1e6, 1)


def count(cli, host, runtime: str) -> dict:
    ran, stoppable, fore = (unique_name(p) for p in ("ran", "stop", "fore"))
    for name in (ran, stoppable, fore):
        host.enroll(name)
    agent = write_agent(host.root / "agent", ["/bin/sh", "-c", "echo one; echo two"])
    waiting = write_agent(host.root / "waiting", STOPPABLE)
    true = write_agent(host.root / "true", ["/bin/true"])
    host.command = cli.command
    host.configure('kernel_layer = "best-effort"\n')
    assert host.start(ran, agent, runtime).returncode == 0
    host.wait_exited(ran)
    start = host.argv("start", fore, "--agent", str(true), "--runtime", runtime,
                      "--foreground", "--rm")
    instructions(start)  # the bundle and the schema check's verdict are cached from here on
    figures = {
        "python_c_pass": instructions([cli.python, "-c", "pass"]),
        "status": instructions(host.argv("status")),
        "status_name": instructions(host.argv("status", ran)),
        "logs_tail_1": instructions(host.argv("logs", ran, "--tail", "1")),
        "start_foreground_rm": instructions(start),
    }
    shutil.rmtree(host.paths.bundle_cache, ignore_errors=True)
    figures["start_foreground_rm_rendered"] = instructions(start)
    assert host.start(stoppable, waiting, runtime).returncode == 0
    host.started.append(stoppable)
    host.wait_log(stoppable, "ready")
    figures["stop"] = instructions(host.argv("stop", stoppable))
    hook = subprocess.run([cli.python, "-c", "import sys; from tappass_host.runtime.start import "
                           "exit_command; from tappass_host.paths import HostPaths; "
                           "print('\\0'.join(exit_command(HostPaths.resolve(sys.argv[1]), "
                           "sys.argv[2])))", str(host.state), stoppable],
                          capture_output=True, text=True, check=True, cwd="/").stdout.strip().split("\0")
    assert hook[-2:] == ["_exited", stoppable], hook
    host.paths.sandbox(stoppable).exit_record.unlink()
    figures["exit_hook"] = instructions(hook)
    assert host.exit_record(stoppable)["code"] == 0  # the hook really recorded the exit
    # what a stop costs in all: its own process and the recording of the exit with
    # the stop's record, by whichever of the two comes first
    figures["stop_plus_exit_hook"] = round(figures["stop"] + figures["exit_hook"], 1)
    figures["ratio_to_python_c_pass"] = {
        key: round(value / figures["python_c_pass"], 2) for key, value in figures.items()
        if key in ("status", "status_name", "logs_tail_1", "stop")}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runtime", choices=("crun", "runc"), default="crun")
    parser.add_argument("--wheel", help="count this wheel instead of one built from the tree")
    parser.add_argument("--baseline-wheel", help="also count this wheel's (before/after)")
    args = parser.parse_args()
    ensure_crun_works()
    clis = {"this": installed_cli("installed", args.wheel)}
    if args.baseline_wheel:
        clis["baseline"] = installed_cli("installed", args.baseline_wheel)
    out = {"benchmark": "cli_instructions", "unit": "millions of instructions (callgrind Ir)",
           "runtime": args.runtime}
    try:
        for key, cli in clis.items():
            host = new_host()
            try:
                out[key] = count(cli, host, args.runtime)
            finally:
                host.cleanup()
        if "baseline" in out:
            out["baseline_wheel"] = args.baseline_wheel
            out["this_vs_baseline"] = {key: round(out["this"][key] / out["baseline"][key], 2)
                                       for key in out["this"] if key in out["baseline"]
                                       and not isinstance(out["this"][key], dict)}
        print(json.dumps(out, indent=2))
    finally:
        for cli in clis.values():
            cli.cleanup()


if __name__ == "__main__":
    main()
