"""The daemon's parts without a network: backoff, and a worker driven by a
fake transport (the transport is an interface so that tests can swap it)."""

import random
import threading

from tappass_host.sync.backoff import Backoff
from tappass_host.sync.daemon import SandboxWorker, SyncSettings
from tappass_host.sync.transport import Event, Unreachable

import keyrings


def test_backoff_doubles_up_to_its_cap_with_jitter_and_resets():
    backoff = Backoff(0.5, 4.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [0.5, 1, 2, 4, 4, 4, 4, 4]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings))
    assert len(set(delays)) == len(delays)
    backoff.reset()
    assert backoff.next_delay() <= 0.5


class FakeTransport:
    """Serves `batches` of events, one batch per connection, then fails."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.acks = []
        self.since = []
        self.done = threading.Event()

    def pull_latest(self, sandbox):
        return None

    def events(self, sandbox, last_event_id, on_open=None):
        self.since.append(last_event_id)
        if not self.batches:
            self.done.set()
            raise Unreachable("no more batches")
        if on_open:
            on_open()
        yield from self.batches.pop(0)
        raise Unreachable("stream closed")

    def ack(self, sandbox, policy_version, status, reason):
        self.acks.append((policy_version, status, reason))

    def abort(self):
        pass


def test_worker_applies_acks_and_does_not_reprocess_a_resent_rejection(paths, signer):
    keyrings.enroll(paths, "demo", [signer])
    good = keyrings.sign(keyrings.policy(1), signer)
    forged = keyrings.sign(keyrings.policy(2), keyrings.signing.generate())
    better = keyrings.sign(keyrings.policy(3), signer)
    transport = FakeTransport([
        [Event(1, good), Event(2, forged)],
        [Event(2, forged), Event(3, better)],  # a reconnect resends the rejected one
    ])
    lines = []
    worker = SandboxWorker(paths, "demo", SyncSettings(backoff_initial=0.01, backoff_max=0.02),
                           transport, lines.append)
    worker.start()
    assert transport.done.wait(10)
    worker.stop()
    worker.join(5)

    assert transport.acks == [(1, "applied", None), (2, "rejected", "bad_signature"),
                              (3, "applied", None)]
    assert transport.since[:2] == [None, 1]
    assert transport.since[-1] == 3
    assert "demo: applied policy_version 1" in lines
    assert "demo: rejected policy_version 2: bad_signature" in lines
