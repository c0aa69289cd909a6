"""The daemon's parts without a network: backoff, and a worker driven by a
fake transport (the transport is an interface so that tests can swap it)."""

import random
import threading

from tappass_host.sync.backoff import Backoff
from tappass_host.daemon.worker import SandboxWorker, SyncSettings
from tappass_host.controlplane.client import Event
from tappass_host.controlplane.errors import Unreachable

import patience
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

    def ack(self, sandbox, policy_version, status, reason, applied_at=None):
        self.acks.append((policy_version, status, reason))

    def abort(self):
        pass

    def close(self):
        pass


def run_worker(paths, transport: FakeTransport) -> list[str]:
    """One worker for sandbox 'demo' until the transport has played its
    batches; the lines it logged."""
    lines: list[str] = []
    worker = SandboxWorker(paths, "demo", SyncSettings(backoff_initial=0.01, backoff_max=0.02),
                           transport, lines.append)
    worker.start()
    assert transport.done.wait(patience.seconds(10))
    worker.stop()
    worker.join(patience.seconds(5))
    return lines


def test_worker_applies_acks_and_does_not_reprocess_a_resent_rejection(paths, signer):
    keyrings.enroll(paths, "demo", [signer])
    good = keyrings.sign(keyrings.policy(1), signer)
    forged = keyrings.sign(keyrings.policy(2), keyrings.signing.generate())
    better = keyrings.sign(keyrings.policy(3), signer)
    transport = FakeTransport([
        [Event(1, good), Event(2, forged)],
        [Event(2, forged), Event(3, better)],  # a reconnect resends the rejected one
    ])
    lines = run_worker(paths, transport)

    assert transport.acks == [(1, "applied", None), (2, "rejected", "bad_signature"),
                              (3, "applied", None)]
    assert transport.since[:2] == [None, 1]
    assert transport.since[-1] == 3
    assert "demo: applied policy_version 1" in lines
    assert "demo: rejected policy_version 2: bad_signature" in lines


# --- the capped SSE reader -----------------------------------------------------------

from tappass_host.controlplane.sse import HEARTBEAT, EventReader, Message, Oversized  # noqa: E402


def _read(chunks, limit=100):
    return list(EventReader(limit).feed(chunks))


def test_sse_reader_frames_events_across_any_chunking():
    stream = b": keepalive\r\n\r\nevent: keyring\r\nid: 7\r\ndata: {\"a\":\ndata: 1}\r\n\r\n" \
             b"event: keyring\rid: 8\rdata: x\r\r\n"
    whole = _read([stream])
    assert whole == [HEARTBEAT, Message("keyring", "7", b'{"a":\n1}'),
                     Message("keyring", "8", b"x")]
    assert _read([bytes([b]) for b in stream]) == whole


def test_sse_reader_drops_an_oversized_event_without_buffering_it():
    reader = EventReader(100)
    huge = [b"event: keyring\nid: 9\ndata: "] + [b"A" * 50] * 1000 + [b"\n\n"]
    out = []
    for chunk in huge:
        out += reader.feed([chunk])
        assert len(reader._buffer) <= 101 and sum(map(len, reader._data)) <= 100
    assert out == [Oversized("9", out[0].size)] and out[0].size > 50_000
    # the stream goes on: the next event is read normally
    assert list(reader.feed([b"event: keyring\nid: 10\ndata: ok\n\n"])) == \
        [Message("keyring", "10", b"ok")]


def test_sse_reader_counts_many_small_lines_against_the_limit():
    lines = b"event: keyring\nid: 3\n" + b"data: 0123456789\n" * 20 + b"\n"
    (out,) = _read([lines])
    assert isinstance(out, Oversized) and out.id == "3"


def _trickled(size: int, step: int) -> tuple[list, int]:
    """A keyring event whose 'data:' line of `size` bytes arrives `step` bytes
    at a time, CRLF-framed (a CR can end a chunk); the reader's scan count."""
    line = b"event: keyring\r\nid: 4\r\ndata: " + b"A" * size + b"\r\n\r\n"
    reader = EventReader(1024 * 1024 + 4096)
    out = list(reader.feed(line[i:i + step] for i in range(0, len(line), step)))
    return out, reader.bytes_scanned


def test_sse_reader_scans_a_trickled_line_once():
    """Issue 10 item 8: a control plane trickling one long line a few bytes at
    a time made the reader rescan the whole partial line per chunk (O(n^2),
    100 % CPU). Each byte is now searched for a line end about once."""
    size = 512 * 1024
    out, scanned = _trickled(size, 7)
    assert out == [Message("keyring", "4", b"A" * size)]
    assert scanned <= size + 64
    # linear: four times the input costs four times the scanning, not sixteen
    _, small = _trickled(size // 4, 7)
    assert scanned <= 4 * small + 64


def test_an_sse_id_is_a_policy_version_only_when_it_looks_like_one():
    """The id of an event whose envelope cannot be read is what gets audited
    and acked: a hostile one must not become a huge or odd version."""
    from tappass_host.controlplane.client import _event_id

    assert [_event_id(t) for t in ("7", "0", "9999999999")] == [7, 0, 9999999999]
    for text in ("", "+7", " 7", "7 ", "-1", "1_0", "\u0663", "1e3", "99999999999", "9" * 5000):
        assert _event_id(text) is None, text


# --- acks that fail are kept (the latest) and retried ------------------------------------


class FlakyAcks(FakeTransport):
    def __init__(self, batches, failing):
        super().__init__(batches)
        self.failing = failing

    def ack(self, sandbox, policy_version, status, reason, applied_at=None):
        if self.failing.is_set():
            raise Unreachable("control plane down")
        self.acks.append((policy_version, status, reason, applied_at))


def test_a_failed_ack_is_retried_after_reconnecting_latest_only(paths, signer):
    keyrings.enroll(paths, "demo", [signer])
    failing = threading.Event()
    failing.set()
    batches = [[Event(1, keyrings.sign(keyrings.policy(1), signer)),
                Event(2, keyrings.sign(keyrings.policy(2), signer))], []]
    transport = FlakyAcks(batches, failing)
    original = transport.events

    def events(sandbox, last_event_id, on_open=None):
        if len(transport.since) == 1:
            failing.clear()  # the control plane is back for the second session
        return original(sandbox, last_event_id, on_open)

    transport.events = events
    lines = run_worker(paths, transport)
    assert [a[:3] for a in transport.acks] == [(2, "applied", None)]
    assert transport.acks[0][3]  # the time it was applied, not the time of the retry
    assert any("ack of policy_version 2 failed" in line for line in lines)


# --- supervision's parts ------------------------------------------------------------------

from tappass_host.paths import HostPaths  # noqa: E402
from tappass_host.runtime.doorbell import Doorbell, ring  # noqa: E402
from tappass_host.daemon.supervision import wants_restart  # noqa: E402


def test_restart_policies():
    crash, clean, oom = {"code": 3}, {"code": 0}, {"code": 0, "oom": True}
    assert [wants_restart("no", e) for e in (crash, clean, oom)] == [False, False, False]
    assert [wants_restart("on-failure", e) for e in (crash, clean, oom)] == [True, False, True]
    assert [wants_restart("always", e) for e in (crash, clean, oom)] == [True, True, True]


def test_the_doorbell_wakes_the_daemon_even_under_a_deep_state_dir(tmp_path):
    paths = HostPaths.resolve(tmp_path / ("deep" * 30) / "state")  # over AF_UNIX's 108 bytes
    assert len(str(paths.runtime / "daemon.sock")) > 108
    bell = Doorbell(paths)
    try:
        ring(paths, "a")
        ring(paths, "b")
        assert bell.wait(patience.seconds(5)) == {"a", "b"}
        assert bell.wait(0.01) == set()
        assert oct((paths.runtime / "daemon.sock").stat().st_mode & 0o777) == "0o600"
    finally:
        bell.close()
    ring(paths, "a")  # nobody listens: nothing happens, nothing raised
    assert not (paths.runtime / "daemon.sock").exists()
