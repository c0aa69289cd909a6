"""Benchmark: `tappass-host start NAME --agent PKG --foreground --rm` of an
agent running /bin/true, from a non-editable install in a venv of its own
(bench/_installed.py) made, as the README's production install is, of the
distribution's python3 (`--python venv`: of the test venv's), against, in the same run, alternating, per runtime
(crun, runc):

- `bare`: `<runtime> run` of a minimal bundle: `runc spec`'s config, args
  /bin/true, a rootfs of mount points and the merged-/usr symlinks with the
  host's /usr and /etc bound read-only. The divisor of every ratio.
- `podman`: `podman --runtime <runtime> run --rm --network none --rootfs` of
  that same rootfs (the same two binds; podman makes its cgroup, as it does
  for users). `"podman": "missing"` when podman is not installed
  (`apt-get install podman`, or `scripts/setup podman`).
- `bare_rendered`: `<runtime> run` of the config tappass-host rendered, as is
  (its args start with the kernel layer's Landlock launcher, a python3 inside
  the sandbox), over a copy of its rootfs: what the sandbox itself costs.
- `bare_rendered_true`: the same config with args /bin/true (no launcher).
- the runtime directory (runtime state, bundles, the runtime's --root, bare's too) is a
  tmpfs, as `/run` is on the hosts users run (systemd mounts one; `$XDG_RUNTIME_DIR` is
  one too); `--runtime-dir disk` keeps it beside the state dir, on this disk.
- with `--network proxy`, also starts of a sandbox whose keyring says
  `network.mode = "proxy"` (goal: at most 40 ms more than mode none).

`breakdown` splits tappass-host's median: the venv's `python -c pass`
(interpreter), importing the modules the start imports (imports),
`bare_rendered` (sandbox), and the rest (tappass-host's own work: reading
the keyring, rendering, checks, files, fsyncs, runtime calls).

A start of the same inputs as an earlier one reuses the bundle it prepared
(oci/bundle_cache.py): the timed `tappass_host_start` runs are such starts
(`all_reused` says they were, from their audit records). `rendered_start`
is a start with that cache emptied (appliers, render, invariants; the schema
check's verdict, cached by config digest, reused), `cold_start` one with both
caches emptied (the first start of a sandbox).

Needs root; re-executes itself under scripts/in-crun-namespace where crun
needs it. Benchmarks are CPU-sensitive: run on a quiet machine.
Prints one JSON object. Usage:
  python bench/start_latency.py [--runs N] [--runtime crun|runc|both]
                                [--network none|proxy] [--cli installed|checkout] [--wheel FILE]
                                [--baseline-wheel FILE]  (e.g. one built at the commit before)
                                [--runtime-dir tmpfs|disk] [--python system|venv]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _installed import base_python, installed_cli
from _sandboxes import ensure_crun_works, ms, new_host, run, unique_name, write_agent

from audit_records import read_audit  # noqa: E402
from sandbox_fixture import _MODULES_AT_EXIT  # noqa: E402

GOAL_RATIO, MOONSHOT_RATIO, GOAL_PROXY_ADDED_MS = 5.0, 3.5, 40.0
MERGED_USR = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# podman's default rlimits (nofile 1048576) exceed this machine's hard limits
PODMAN_LIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")


def minimal_bundle(directory: Path) -> Path:
    """`runc spec`'s bundle running /bin/true over the host's /usr and /etc."""
    rootfs = directory / "rootfs"
    for sub in ("usr", "etc"):
        (rootfs / sub).mkdir(parents=True)
    for link in MERGED_USR:
        if os.path.islink(f"/{link}"):
            os.symlink(os.readlink(f"/{link}"), rootfs / link)
    subprocess.run([shutil.which("runc"), "spec", "--bundle", str(directory)], check=True)
    config = json.loads((directory / "config.json").read_text())
    config["process"].update(terminal=False, args=["/bin/true"])
    config["root"] = {"path": str(rootfs), "readonly": True}
    config["mounts"] += [{"destination": d, "type": "bind", "source": d,
                          "options": ["rbind", "ro", "nosuid", "nodev"]} for d in ("/usr", "/etc")]
    (directory / "config.json").write_text(json.dumps(config))
    return rootfs


def podman_argv(runtime: str, rootfs: Path) -> list[str] | None:
    podman = shutil.which("podman")
    if podman is None:
        return None
    return [podman, "--runtime", runtime, "run", "--rm", "--network", "none", *PODMAN_LIMITS,
            "-v", "/usr:/usr:ro", "-v", "/etc:/etc:ro", "--rootfs", str(rootfs), "/bin/true"]


def timed_rounds(commands: dict[str, list[str]], runs: int) -> dict[str, list[float]]:
    """Each command once per round, in the same order, `runs` rounds."""
    samples = {key: [] for key in commands}
    for _ in range(runs):
        for key, argv in commands.items():
            start = time.perf_counter()
            result = run(argv, cwd="/")  # `python -c` would import this checkout's modules
            samples[key].append(time.perf_counter() - start)
            assert result.returncode == 0, (key, result.stderr)
    return samples


def modules_imported(cli, argv: list[str]) -> list[str]:
    """What the CLI run `argv` imports beyond a bare `python -c pass`."""
    def loaded(args):
        result = subprocess.run(args, capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL, cwd="/")  # not this checkout's modules
        line = next((line for line in result.stderr.splitlines()
                     if line.startswith("MODULES ")), None)
        assert line, result.stderr[-2000:]
        return set(json.loads(line[len("MODULES "):]))

    bare = loaded([cli.python, "-c", "import atexit, json, sys; atexit.register(lambda: print("
                   "'MODULES ' + json.dumps(sorted(sys.modules)), file=sys.stderr))"])
    ours = loaded([cli.python, "-c", _MODULES_AT_EXIT, *argv])
    return sorted(m for m in ours - bare if m not in ("__main__", "runpy"))


def import_argv(cli, modules: list[str]) -> list[str]:
    return [cli.python, "-c",
            "import importlib\nfor m in %r:\n    try: importlib.import_module(m)\n"
            "    except Exception: pass" % (modules,)]


def measure(cli, runtime: str, runs: int, cold_runs: int, network: str, baseline=None,
            runtime_dir: str = "tmpfs") -> dict:
    host = new_host()
    host.command = cli.command
    proxied = None
    run_dir = host.paths.runtime
    try:
        if runtime_dir == "tmpfs":
            run_dir.mkdir(parents=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "tmpfs",
                            str(run_dir)], check=True)
        name = host.enroll(unique_name("bench", runtime))
        if network == "proxy":
            proxied = host.enroll(unique_name("benchnet", runtime),
                                  network={"mode": "proxy", "allow_domains": []})
        agent = write_agent(host.root / "agent", ["/bin/true"])
        first = host.start(name, agent, runtime, "--foreground")  # renders the bundle
        assert first.returncode == 0, first.stderr
        bundle = host.paths.sandbox(name).bundle
        rendered = host.root / "rendered"
        rendered.mkdir()
        # cp -a keeps owners: the agent reads /run/tappass/agent.env through its group
        subprocess.run(["cp", "-a", str(bundle / "rootfs"), str(rendered / "rootfs")], check=True)
        config = json.loads((bundle / "config.json").read_text())
        config["root"]["path"] = str(rendered / "rootfs")
        (rendered / "config.json").write_text(json.dumps(config))
        rendered_true = host.root / "rendered-true"
        rendered_true.mkdir()
        config["process"]["args"] = ["/bin/true"]
        (rendered_true / "config.json").write_text(json.dumps(config))
        minimal = host.root / "minimal"
        minimal.mkdir()
        minimal_rootfs = minimal_bundle(minimal)
        binary, state = shutil.which(runtime), str(run_dir / "bare-root")

        def bare(directory: Path, cid: str) -> list[str]:
            return [binary, "--root", state, "run", "--bundle", str(directory), f"{cid}-{name}"]

        ours = host.argv("start", name, "--agent", str(agent), "--runtime", runtime,
                         "--foreground", "--rm")
        commands = {
            "tappass_host_start": ours,
            "bare": bare(minimal, "bare"),
            "bare_rendered": bare(rendered, "rendered"),
            "bare_rendered_true": bare(rendered_true, "true"),
            "python_c_pass": [cli.python, "-c", "pass"],
        }
        podman = podman_argv(runtime, minimal_rootfs)
        if podman:
            commands["podman"] = podman
        if baseline is not None:  # another build's CLI, on the same state
            commands["baseline_start"] = [*baseline.command, *ours[len(cli.command):]]
        if proxied:
            commands["tappass_host_start_network_proxy"] = host.argv(
                "start", proxied, "--agent", str(agent), "--runtime", runtime,
                "--foreground", "--rm")
        commands["imports"] = import_argv(cli, modules_imported(cli, ours[1:] if len(
            cli.command) == 1 else ours[3:]))
        timed_rounds(commands, 2)  # warm up every one (caches, podman's storage)

        def started(sandbox: str) -> list[dict]:
            return read_audit(host.paths.audit_log, sandbox, "sandbox.started")

        # the timed starts only: a baseline build's first start (a warm-up) renders for its code
        warm = {sandbox: len(started(sandbox)) for sandbox in (name, proxied) if sandbox}
        samples = timed_rounds(commands, runs)

        def all_reused(sandbox: str) -> bool:  # a build without the cache: no such key
            return all(e["details"].get("config_reused", True)
                       for e in started(sandbox)[warm[sandbox]:])

        reused = {"all_reused": all_reused(name)}
        if proxied:
            reused["network_proxy_all_reused"] = all_reused(proxied)
        cold, rendered_starts = [], []
        for _ in range(cold_runs):
            for caches, samples_of in (((host.paths.bundle_cache, host.paths.schema_ok), cold),
                                       ((host.paths.bundle_cache,), rendered_starts)):
                for cache in caches:
                    shutil.rmtree(cache, ignore_errors=True)
                start = time.perf_counter()
                assert run(ours).returncode == 0
                samples_of.append(time.perf_counter() - start)
        assert not host.paths.sandbox(name).runtime.exists()  # --rm left nothing
        median = {key: statistics.median(values) for key, values in samples.items()}
        ratio = lambda key: round(median[key] / median["bare"], 2)  # noqa: E731
        result = {key: ms(values) for key, values in samples.items() if key != "imports"}
        result["ratio"] = ratio("tappass_host_start")
        result["goal_met"] = result["ratio"] <= GOAL_RATIO and (
            not podman or median["tappass_host_start"] < median["podman"])
        result["moonshot_met"] = result["ratio"] <= MOONSHOT_RATIO
        if podman:
            result["podman_ratio"] = ratio("podman")
            result["start_vs_podman"] = round(median["tappass_host_start"] / median["podman"], 2)
        else:
            result["podman"] = "missing"
        if baseline is not None:
            result["baseline_ratio"] = ratio("baseline_start")
            result["saved_vs_baseline_ms"] = round(
                (median["baseline_start"] - median["tappass_host_start"]) * 1e3, 2)
        result.update(reused)
        result["rendered_start"] = ms(rendered_starts)
        result["cold_start"] = ms(cold)
        if proxied:
            result["network_proxy_added_ms"] = round(
                (median["tappass_host_start_network_proxy"] - median["tappass_host_start"]) * 1e3, 2)
        interpreter = median["python_c_pass"]
        imports = max(0.0, median["imports"] - interpreter)
        result["breakdown_ms"] = {
            "interpreter": round(interpreter * 1e3, 2),
            "imports": round(imports * 1e3, 2),
            "sandbox (bare_rendered)": round(median["bare_rendered"] * 1e3, 2),
            "own_work": round((median["tappass_host_start"] - interpreter - imports
                               - median["bare_rendered"]) * 1e3, 2),
        }
        return result
    finally:
        if proxied:
            stop_egress_proxy(host)
        host.cleanup()  # before the unmount: it stops what runs from the runtime dir
        if runtime_dir == "tmpfs":
            subprocess.run(["umount", "--lazy", str(run_dir)], capture_output=True)
            shutil.rmtree(host.root, ignore_errors=True)


def stop_egress_proxy(host) -> None:
    """The egress proxy idles a minute after its last sandbox; end it now."""
    import signal

    try:
        os.kill(int((host.paths.runtime / "network" / "proxy.pid").read_text()), signal.SIGTERM)
    except (OSError, ValueError):
        pass


def main() -> None:
    import sys

    if "--image" in sys.argv[1:]:  # issue 14: image start / bare run of its root (--runs, --runtime)
        image_start = str(Path(__file__).with_name("image_start.py"))
        os.execv(sys.executable, [sys.executable, image_start,
                                  *(a for a in sys.argv[1:] if a != "--image")])
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--runtime", choices=("crun", "runc", "both"), default="both")
    parser.add_argument("--network", choices=("none", "proxy"), default="none",
                        help="proxy: also time starts with network.mode = proxy")
    parser.add_argument("--runtime-dir", choices=("tmpfs", "disk"), default="tmpfs",
                        help="tmpfs: the runtime directory on a tmpfs, as /run is on a "
                             "standard host (default); disk: beside the state dir")
    parser.add_argument("--cli", choices=("installed", "checkout"), default="installed",
                        help="installed: a wheel of this tree in a venv of its own (the "
                             "figures to report); checkout: the test venv's editable install")
    parser.add_argument("--wheel", help="measure this wheel instead of one built from the tree")
    parser.add_argument("--python", choices=("system", "venv"), default="system",
                        help="the interpreter of the install's venv: system, the distribution's "
                             "python3 as a production install uses it (default, when of the "
                             "test venv's version); venv: the test venv's")
    parser.add_argument("--baseline-wheel",
                        help="also time this wheel's start in the same rounds (before/after)")
    args = parser.parse_args()
    ensure_crun_works()
    base = base_python(args.python)
    cli = installed_cli(args.cli, args.wheel, base)
    baseline = installed_cli("installed", args.baseline_wheel, base) if args.baseline_wheel else None
    try:
        runtimes = ("crun", "runc") if args.runtime == "both" else (args.runtime,)
        print(json.dumps({
            "benchmark": "start_latency",
            "runs_each": args.runs,
            "cli": args.wheel or args.cli,
            "agent": "/bin/true",
            "load_average": os.getloadavg(),
            "runtime_dir": args.runtime_dir,
            "python": subprocess.run([cli.python, "-c", "import sys; print(sys.version.split()[0])"],
                                     capture_output=True, text=True).stdout.strip() + f" ({base})",
            "podman": shutil.which("podman") and subprocess.run(
                ["podman", "--version"], capture_output=True, text=True).stdout.strip()
            or "missing",
            "baseline": args.baseline_wheel,
            **{runtime: measure(cli, runtime, args.runs, args.cold_runs, args.network, baseline,
                               args.runtime_dir)
               for runtime in runtimes},
            "goal": {"ratio_max": GOAL_RATIO, "faster_than_podman": True,
                     "moonshot_ratio_max": MOONSHOT_RATIO,
                     "network_proxy_added_ms_max": GOAL_PROXY_ADDED_MS},
        }, indent=2))
    finally:
        cli.cleanup()
        if baseline is not None:
            baseline.cleanup()


if __name__ == "__main__":
    tempfile.tempdir = "/tmp"
    main()
