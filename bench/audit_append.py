"""Audit log append cost against a plain append+fsync of the same bytes.

    python bench/audit_append.py [--events N] [--dir DIR]

Prints one JSON object. The baseline writes each line the audit log wrote,
in order, to a second file through one open O_APPEND descriptor with an
fsync after each line: the floor any durable append log pays on this disk.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from tappass_host.audit import AuditLog


def _summary(latencies: list[float], total: float) -> dict:
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "appends_per_s": round(len(latencies) / total, 1),
        "p50_ms": round(cuts[49] * 1000, 3),
        "p99_ms": round(cuts[98] * 1000, 3),
    }


def bench_audit(root: Path, events: int) -> tuple[dict, list[bytes]]:
    log = AuditLog(root / "audit" / "audit.jsonl", root / "audit" / "audit-key.pem")
    log.append("bench.warmup")  # creates the key and the file outside the timing
    latencies = []
    start = time.perf_counter()
    for i in range(events):
        t0 = time.perf_counter()
        log.append("keyring.applied", "bench", {"version": i, "digest": "sha256:" + "ab" * 32})
        latencies.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    return _summary(latencies, total), log.log_path.read_bytes().splitlines(keepends=True)[1:]


def bench_baseline(root: Path, lines: list[bytes]) -> dict:
    fd = os.open(root / "baseline.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        latencies = []
        start = time.perf_counter()
        for line in lines:
            t0 = time.perf_counter()
            os.write(fd, line)
            os.fsync(fd)
            latencies.append(time.perf_counter() - t0)
        total = time.perf_counter() - start
    finally:
        os.close(fd)
    return _summary(latencies, total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--dir", help="where to write (default: a temp dir; the disk matters)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        audit, lines = bench_audit(root, args.events)
        baseline = bench_baseline(root, lines)
        verify_start = time.perf_counter()
        report = AuditLog(root / "audit" / "audit.jsonl", root / "audit" / "audit-key.pem").verify()
        verify_s = time.perf_counter() - verify_start
    print(json.dumps({
        "events": args.events,
        "line_bytes_avg": round(sum(map(len, lines)) / len(lines), 1),
        "audit_append": audit,
        "baseline_write_fsync": baseline,
        "p50_overhead_ratio": round(audit["p50_ms"] / baseline["p50_ms"], 2),
        "verify_events_per_s": round(report.events / verify_s, 1),
        "verify_ok": report.ok,
    }, indent=2))


if __name__ == "__main__":
    main()
