"""Benchmark: time from a publish on the control plane to the agent inside
a real sandbox (crun) observing the new policy_version, through the real
devplane (HTTPS, SSE) and the real daemon (verify, flip, audit, ack).

Two figures per case, both ending when the watcher agent records the new
version (inotify on the keyring directory, bench/_fleet.py):
- publish_to_agent: from just before the publish (the in-process code
  `tappass-devplane publish` runs after its own start-up: sign, store, then
  an HTTPS call telling the server to rescan) — what an operator waits;
- pushed_to_agent: from when that notify call returned (the control plane
  has the new keyring and pushes it) — roughly the daemon's share: SSE,
  verify, flip, audit, and the agent's wake-up. The server may start
  pushing before its answer to notify arrives, so this is a lower bound.

- one sandbox: 200 publishes, one at a time;
- eight sandboxes: 25 rounds, each publishing to all 8 at once (200 in all);
- baseline, same run: the same verify + flip done locally, in process, by
  the code `sync apply` runs (no network, no daemon), observed by the same
  agent; the difference is what the network path costs.

Goal (issue 5): p99 ≤ 100 ms at 8 sandboxes on loopback.
Needs root; re-executes itself under scripts/in-crun-namespace when needed.
Prints one JSON object. Usage: python bench/sync_latency.py [--publishes N]
"""

import argparse
import time

from _sandboxes import ensure_crun_works, precompile, unique_name

from _fleet import POLICY, Fleet, json_dump


def percentiles(samples_ns: list[int]) -> dict:
    ordered = sorted(samples_ns)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6, 2)

    return {"n": len(ordered), "p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99),
            "max_ms": round(ordered[-1] / 1e6, 2)}


def one_at_a_time(fleet: Fleet, name: str, count: int) -> tuple[list[int], list[int]]:
    """Returns (publish -> agent, pushed -> agent) samples in ns."""
    from tappass_host.devplane import keyrings

    total, pushed = [], []
    for _ in range(count):
        t0 = time.time_ns()
        (_, done), = keyrings.publish(fleet.devplane.state, name, POLICY)
        assert keyrings.notify(fleet.devplane.state)
        t1 = time.time_ns()
        seen = fleet.wait_seen(name, done.policy_version)
        total.append(seen - t0)
        pushed.append(seen - t1)
    return total, pushed


def in_rounds(fleet: Fleet, names: list[str], count: int) -> tuple[list[int], list[int]]:
    """Each round: one new keyring for every sandbox, one notify, all at once."""
    from tappass_host.devplane import keyrings

    total, pushed = [], []
    for _ in range(count // len(names)):
        published = []
        for name in names:
            t0 = time.time_ns()
            (_, done), = keyrings.publish(fleet.devplane.state, name, POLICY)
            published.append((name, done.policy_version, t0))
        assert keyrings.notify(fleet.devplane.state)
        t1 = time.time_ns()
        for name, version, t0 in published:
            seen = fleet.wait_seen(name, version)
            total.append(seen - t0)
            pushed.append(seen - t1)
    return total, pushed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--publishes", type=int, default=200)
    args = parser.parse_args()
    ensure_crun_works()
    precompile()
    fleet = Fleet(9)
    try:
        base = fleet.enroll(unique_name("base"))
        # the baseline sandbox's keyrings are applied locally: the control plane has none
        from tappass_host import sandbox_record
        from tappass_host.devplane import keyrings
        from tappass_host.sync.receive import receive

        sid = sandbox_record.load(fleet.host.paths, base).sandbox_id
        receive(fleet.host.paths, base, keyrings.sign(
            fleet.devplane.state, keyrings.build_payload(POLICY, sid, 1)))
        fleet.start(base, publish=False)
        fleet.wait_seen(base, 1)
        baseline = local_baseline_from(fleet, base, args.publishes)

        names = [fleet.enroll(unique_name(f"lat{i}")) for i in range(8)]
        for name in names:
            fleet.start(name)
            fleet.wait_seen(name, 1)
        fleet.start_daemon()
        one, one_pushed = one_at_a_time(fleet, names[0], args.publishes)
        eight, eight_pushed = in_rounds(fleet, names, args.publishes)
        json_dump({
            "benchmark": "sync_latency",
            "runtime": "crun",
            "one_sandbox": {"publish_to_agent": percentiles(one),
                            "pushed_to_agent": percentiles(one_pushed)},
            "eight_sandboxes": {"publish_to_agent": percentiles(eight),
                                "pushed_to_agent": percentiles(eight_pushed)},
            "baseline_local_flip_no_network": percentiles(baseline),
            "goal_p99_ms_at_8": 100,
            "goal_met_publish_to_agent": percentiles(eight)["p99_ms"] <= 100,
            "goal_met_pushed_to_agent": percentiles(eight_pushed)["p99_ms"] <= 100,
        })
    finally:
        fleet.close()


def local_baseline_from(fleet: Fleet, name: str, count: int) -> list[int]:
    """`count` local flips after v1 (already in place)."""
    from tappass_host import sandbox_record
    from tappass_host.devplane import keyrings
    from tappass_host.sync.receive import APPLIED, receive

    sandbox_id = sandbox_record.load(fleet.host.paths, name).sandbox_id
    samples = []
    for version in range(2, count + 2):
        data = keyrings.sign(fleet.devplane.state, keyrings.build_payload(POLICY, sandbox_id,
                                                                          version))
        t0 = time.time_ns()
        assert receive(fleet.host.paths, name, data).status == APPLIED
        samples.append(fleet.wait_seen(name, version) - t0)
    return samples


if __name__ == "__main__":
    main()
