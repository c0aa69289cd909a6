"""Benchmark: `tappass-host start --foreground --rm` of an agent running
/bin/true, against a bare `<runtime> run` of an equivalent bundle (the very
config.json tappass-host rendered, args /bin/true, a copy of its rootfs dir),
alternating, in the same run, for crun and runc. A second baseline runs the
rendered config unchanged: its args start with the kernel layer's Landlock
launcher (a python3 inside the sandbox, part of the sandbox, not of
tappass-host's host-side overhead), so `ratio_same_config` and
`overhead_same_config_ms` are tappass-host's own cost.

Reported per runtime: medians (and p90, min) of both, the ratio of medians,
and tappass-host's own overhead (the difference). The schema check's result
is cached by config digest after the first start (see oci/bundle.py); a
separate "cold" figure is measured with that cache emptied before each run.

Needs root. crun needs the cgroup quirk handled: the script re-executes
itself under scripts/in-crun-namespace when needed.
Prints one JSON object. Usage: python bench/start_latency.py [--runs N]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time

from _sandboxes import PYTHON, ensure_crun_works, ms, new_host, precompile, run, unique_name, write_agent


def measure(runtime: str, runs: int, cold_runs: int, network: str = "none") -> dict:
    host = new_host()
    try:
        name = host.enroll(unique_name("bench", runtime))
        proxied = host.enroll(unique_name("benchnet", runtime), network={
            "mode": "proxy", "allow_domains": []}) if network == "proxy" else None
        agent = write_agent(host.root / "agent", ["/bin/true"])
        first = host.start(name, agent, runtime, "--foreground")  # renders the bundle
        assert first.returncode == 0, first.stderr
        bundle = host.paths.sandbox(name).bundle
        bare = host.root / "bare"
        bare.mkdir()
        # cp -a keeps owners: the agent reads /run/tappass/agent.env through its group
        subprocess.run(["cp", "-a", str(bundle / "rootfs"), str(bare / "rootfs")], check=True)
        config = json.loads((bundle / "config.json").read_text())
        config["root"]["path"] = str(bare / "rootfs")
        same = host.root / "same"
        same.mkdir()
        (same / "config.json").write_text(json.dumps(config))
        os.symlink(bare / "rootfs", same / "rootfs")
        config["process"]["args"] = ["/bin/true"]
        (bare / "config.json").write_text(json.dumps(config))
        bare_root = host.root / "bare-root"
        bare_argv = [shutil.which(runtime), "--root", str(bare_root), "run", "--bundle", str(bare),
                     f"bare-{name}"]
        same_argv = [shutil.which(runtime), "--root", str(bare_root), "run", "--bundle", str(same),
                     f"same-{name}"]
        ours_argv = host.argv("start", name, "--agent", str(agent), "--runtime", runtime,
                              "--foreground", "--rm")
        proxied_argv = proxied and host.argv("start", proxied, "--agent", str(agent), "--runtime",
                                             runtime, "--foreground", "--rm")
        for argv in (ours_argv, bare_argv, same_argv, proxied_argv):  # warm up all
            warm = argv and run(argv)
            assert not argv or warm.returncode == 0, (argv, warm.stderr)

        ours, baseline, same_config, with_proxy = [], [], [], []
        for _ in range(runs):
            for argv, samples in ((ours_argv, ours), (bare_argv, baseline),
                                  (same_argv, same_config), (proxied_argv, with_proxy)):
                if not argv:
                    continue
                start = time.perf_counter()
                result = run(argv)
                samples.append(time.perf_counter() - start)
                assert result.returncode == 0, result.stderr
        cold = []
        for _ in range(cold_runs):
            shutil.rmtree(host.paths.runtime / "schema-ok", ignore_errors=True)
            start = time.perf_counter()
            assert run(ours_argv).returncode == 0
            cold.append(time.perf_counter() - start)
        assert not host.paths.sandbox(name).runtime.exists()  # --rm left nothing
        ours_median, bare_median = statistics.median(ours), statistics.median(baseline)
        same_median = statistics.median(same_config)
        return {
            "tappass_host_start_foreground_rm": ms(ours),
            f"bare_{runtime}_run": ms(baseline),
            f"bare_{runtime}_run_same_config": ms(same_config),
            "ratio": round(ours_median / bare_median, 2),
            "overhead_ms": round((ours_median - bare_median) * 1e3, 2),
            "ratio_same_config": round(ours_median / same_median, 2),
            "overhead_same_config_ms": round((ours_median - same_median) * 1e3, 2),
            "tappass_host_cold_schema_check": ms(cold),
            **({"tappass_host_start_network_proxy": ms(with_proxy),
                "network_proxy_added_ms": round((statistics.median(with_proxy) - ours_median)
                                                * 1e3, 2)} if with_proxy else {}),
        }
    finally:
        if proxied:
            stop_egress_proxy(host)
        host.cleanup()


def stop_egress_proxy(host) -> None:
    """The egress proxy idles a minute after its last sandbox; end it now."""
    import signal

    try:
        os.kill(int((host.paths.runtime / "network" / "proxy.pid").read_text()), signal.SIGTERM)
    except (OSError, ValueError):
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=25)
    parser.add_argument("--cold-runs", type=int, default=5)
    parser.add_argument("--network", choices=("none", "proxy"), default="none",
                        help="proxy: also time starts with network.mode = proxy (goal: "
                             "<= 40 ms more than none)")
    args = parser.parse_args()
    ensure_crun_works()
    precompile()
    interpreter = []
    for _ in range(args.runs):
        start = time.perf_counter()
        run([PYTHON, "-c", "pass"])
        interpreter.append(time.perf_counter() - start)
    print(json.dumps({
        "benchmark": "start_latency",
        "runs_each": args.runs,
        "agent": "/bin/true",
        "bytecode": "precompiled",
        "python_c_pass": ms(interpreter),
        "crun": measure("crun", args.runs, args.cold_runs, args.network),
        "runc": measure("runc", args.runs, args.cold_runs, args.network),
        "goal_ratio_max": 6,
    }, indent=2))


if __name__ == "__main__":
    main()
