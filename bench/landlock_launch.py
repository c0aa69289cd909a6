"""Benchmark: what the Landlock launcher adds to a start.

1. `launcher`: `python3 -I -S landlock_exec.py <the kernel layer's rules> --
   /bin/true` against `/bin/true` run directly, alternating, on the host (the
   launcher only restricts its own process). Also the bare interpreter
   (`python3 -I -S -c pass`) as the floor any Python launcher pays.
2. `start`: `tappass-host start --foreground --rm` of /bin/true, landlocked,
   against the same start with Landlock unavailable (`kernel_layer =
   "best-effort"` and the host test hook TAPPASS_HOST_LANDLOCK_ABI=0),
   alternating, for crun and runc.

Needs root. Prints one JSON object. Usage: python bench/landlock_launch.py [--runs N]
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

from _sandboxes import ensure_crun_works, ms, new_host, precompile, run, unique_name, write_agent

from tappass_host import landlock
from tappass_host.layers import kernel


def timed(argv: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, env=env)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    return elapsed


def launcher(runs: int) -> dict:
    script = str(landlock.launcher_source() / "landlock_exec.py")
    rules = kernel.rules({})
    env_file = tempfile.NamedTemporaryFile(prefix="agent-env-", delete=False)
    env_file.write(b"".join(f"{entry}\0".encode() for entry in landlock.LAUNCHER_ENV))
    env_file.close()
    wrapped = [landlock.PYTHON, "-I", "-S", script, "--env", env_file.name, *rules,
               "--", "/bin/true"]
    variants = {"launcher_then_true": wrapped, "true_direct": ["/bin/true"],
                "python_I_S_pass": [landlock.PYTHON, "-I", "-S", "-c", "pass"]}
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(runs):
        for key, argv in variants.items():
            samples[key].append(timed(argv))
    added = statistics.median(samples["launcher_then_true"]) - statistics.median(
        samples["true_direct"])
    os.unlink(env_file.name)
    return {**{k: ms(v) for k, v in samples.items()}, "added_ms": round(added * 1e3, 2)}


def start(runtime: str, runs: int) -> dict:
    host = new_host()
    try:
        name = host.enroll(unique_name("llbench", runtime))
        agent = write_agent(host.root / "agent", ["/bin/true"])
        argv = host.argv("start", name, "--agent", str(agent), "--runtime", runtime,
                         "--foreground", "--rm")
        host.configure('kernel_layer = "best-effort"\n')
        without = {**os.environ, landlock.TEST_HOOK_ENV: "0"}
        for env in (None, without):  # warm up both (schema cache, bytecode)
            assert run(argv, env=env).returncode == 0
        confined, free = [], []
        for _ in range(runs):
            confined.append(timed(argv))
            free.append(timed(argv, without))
        return {"landlocked": ms(confined), "without_landlock": ms(free),
                "added_ms": round((statistics.median(confined) - statistics.median(free)) * 1e3,
                                  2)}
    finally:
        host.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    ensure_crun_works()
    precompile()
    print(json.dumps({"landlock_abi": landlock.kernel_abi(), "launcher": launcher(args.runs * 2),
                      "start": {rt: start(rt, args.runs) for rt in ("crun", "runc")}},
                     indent=2))


if __name__ == "__main__":
    main()
