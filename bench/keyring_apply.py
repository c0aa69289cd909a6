"""Benchmark: applying 1,000 successive ~4 KiB keyrings (20 secrets) to one
sandbox through the real update path (verify, flip, audit; fsync on), next to
a baseline measured in the same run: writing the same envelope bytes with a
plain temp file + fsync + rename.

Prints one JSON object. Usage: python bench/keyring_apply.py [--count N] [--dir DIR]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from keyrings import enroll, policy, sign  # noqa: E402
from tappass_host import signing  # noqa: E402
from tappass_host.sync.apply import apply_update  # noqa: E402
from tappass_host.paths import HostPaths  # noqa: E402


def realistic_policy(version: int, now: datetime) -> dict:
    doc = policy(version, now=now, ttl=3600)
    doc["secrets"] = {f"SECRET_{i:02d}": os.urandom(48).hex() for i in range(20)}
    doc["gateway"] = {"base_url": "https://gw.tappass.ai", "capability_token": "tp_gw_" + "x" * 200}
    doc["harness"] = {"runtime": "claude-code",
                      "permissions": {"allow": [f"Bash(tool{i}:*)" for i in range(20)],
                                      "deny": ["Read(~/.ssh/**)"]}}
    doc["compliance_tags"] = ["soc2", "gdpr", "hipaa"]
    return doc


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def figures(samples: list[float]) -> dict:
    return {
        "p50_ms": round(statistics.median(samples) * 1e3, 3),
        "p99_ms": round(percentile(samples, 99) * 1e3, 3),
        "per_s": round(len(samples) / sum(samples), 1),
    }


def baseline_write(directory: Path, data: bytes) -> None:
    tmp = directory / ".keyring.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o440)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    os.rename(tmp, directory / "keyring.json")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-keyring-", dir=args.dir))
    paths = HostPaths.resolve(root / "state")
    key = signing.generate()
    enroll(paths, "bench", [key])
    now = datetime.now(timezone.utc).replace(microsecond=0)
    envelopes = [sign(realistic_policy(v, now), key) for v in range(1, args.count + 1)]
    plain = root / "plain"
    plain.mkdir()

    applies, plain_writes = [], []
    for data in envelopes:  # alternate, so both see the same disk conditions
        start = time.perf_counter()
        apply_update(paths, "bench", data, now=now)
        applies.append(time.perf_counter() - start)
        start = time.perf_counter()
        baseline_write(plain, data)
        plain_writes.append(time.perf_counter() - start)

    apply_fig, base_fig = figures(applies), figures(plain_writes)
    print(json.dumps({
        "benchmark": "keyring_apply",
        "count": args.count,
        "envelope_bytes": round(statistics.mean(len(e) for e in envelopes)),
        "apply": apply_fig,
        "baseline_tempfile_fsync_rename": base_fig,
        "p99_ratio": round(apply_fig["p99_ms"] / base_fig["p99_ms"], 2),
        "goal_p99_ratio_max": 3.0,
        "filesystem_dir": str(root),
    }, indent=2))


if __name__ == "__main__":
    main()
