"""Benchmark: an image-based start (issue 14) against a bare runtime run of
the same unpacked root, per runtime (crun, runc), alternating, in one run:

- `image_start`: `tappass-host start NAME --agent PKG --image sha256:<digest>
  --foreground --rm` of an agent running `/bin/sh -c :` in the busybox test
  image (tests/image_fixture.py), already in the store: admission by the
  keyring, the run's overlay, render, the Landlock launcher (the host's
  python3 through its loader, from /run/tappass/hostusr), unmount.
- `bare`: `<runtime> run` of `runc spec`'s bundle running the same command
  over a copy of the store's unpacked root (read-only root; the runtime makes
  its mount points in the copy). The divisor of `ratio`.
- `host_start`: the same agent on the host's root (`--rootfs host`), for
  what an image costs over it.

The CLI is this checkout's (for an installed one, see bench/start_latency.py).
Needs root; re-executes itself under scripts/in-crun-namespace where crun
needs it. Prints one JSON object.
Usage: python bench/image_start.py [--runs N] [--runtime crun|runc|both]
"""

import argparse
import json
import shutil
import statistics
import subprocess
import time

from _sandboxes import ensure_crun_works, ms, new_host, precompile, run, unique_name, write_agent

import image_fixture

COMMAND = ["/bin/sh", "-c", ":"]


def bare_bundle(directory, root) -> None:
    subprocess.run(["cp", "-a", str(root), str(directory / "rootfs")], check=True)
    subprocess.run([shutil.which("runc"), "spec", "--bundle", str(directory)], check=True)
    config = json.loads((directory / "config.json").read_text())
    config["process"].update(terminal=False, args=COMMAND)
    config["root"] = {"path": str(directory / "rootfs"), "readonly": True}
    (directory / "config.json").write_text(json.dumps(config))


def measure(runtime: str, runs: int) -> dict:
    host = new_host()
    try:
        image = image_fixture.busybox_image(host.root / "layout")
        name = host.enroll(unique_name("bench-img", runtime),
                           image={"allowed_digests": [image.digest]})
        plain = host.enroll(unique_name("bench-host", runtime))
        agent = write_agent(host.root / "agent", COMMAND)
        imported = host.run("image", "import", f"oci:{image.layout}")
        assert imported.returncode == 0, imported.stderr
        root = host.paths.image_rootfs(image_fixture.sha256(image.config)[7:])
        bare = host.root / "bare"
        bare.mkdir()
        bare_bundle(bare, root)
        commands = {
            "image_start": host.argv("start", name, "--agent", str(agent), "--runtime", runtime,
                                     "--image", image.digest, "--foreground", "--rm"),
            "bare": [shutil.which(runtime), "--root", str(host.root / "bare-root"), "run",
                     "--bundle", str(bare), f"bare-{name}"],
            "host_start": host.argv("start", plain, "--agent", str(agent), "--runtime", runtime,
                                    "--foreground", "--rm"),
        }
        samples = {key: [] for key in commands}
        for round_ in range(runs + 2):  # two warm-up rounds
            for key, argv in commands.items():
                start = time.perf_counter()
                result = run(argv, cwd="/")
                assert result.returncode == 0, (key, result.stderr)
                if round_ >= 2:
                    samples[key].append(time.perf_counter() - start)
        figures = {key: ms(values) for key, values in samples.items()}
        median = {key: statistics.median(values) for key, values in samples.items()}
        return {**figures, "ratio_image_start_to_bare": round(median["image_start"] /
                                                               median["bare"], 2),
                "image_over_host_start_ms": round((median["image_start"] -
                                                   median["host_start"]) * 1e3, 2)}
    finally:
        host.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--runtime", choices=("crun", "runc", "both"), default="both")
    args = parser.parse_args()
    ensure_crun_works()
    precompile()
    runtimes = ("crun", "runc") if args.runtime == "both" else (args.runtime,)
    print(json.dumps({"runs": args.runs,
                      **{runtime: measure(runtime, args.runs) for runtime in runtimes}},
                     indent=2))


if __name__ == "__main__":
    main()
