"""The tamper-evident audit log, `<state>/audit/audit.jsonl` (DESIGN §10).

One event per line, in canonical JSON (`strictjson.canonical`), e.g.

    {"details":{"version":3},"event":"keyring.applied","hash":"sha256:<hex>",
     "prev_hash":"sha256:<hex>","sandbox":"web","seq":17,
     "sig":"ed25519:<base64>","ts":"2024-05-01T12:00:00.123Z"}

Invariants of a valid log:
  - `seq` is 1 on the first line and goes up by exactly 1 on each next line;
  - `prev_hash` is null on the first line, else the previous line's `hash`;
  - `hash` is "sha256:" + the hex SHA-256 of the canonical JSON of the event
    without `hash` and `sig` (so it covers seq, ts, event, sandbox, details
    and prev_hash, which chains each event to all before it);
  - `sig` is "ed25519:" + the base64 Ed25519 signature, by the host audit key,
    of the UTF-8 bytes of the `hash` string itself ("sha256:" + 64 lowercase
    hex digits, 71 bytes);
  - every line, the last included, ends in "\\n"; the file only grows.

Append sequence (`AuditLog.append`):
  1. open the log O_APPEND|O_CREAT (0600) and take an exclusive flock on it;
     every writer does, so steps 2-6 run in one process at a time;
  2. load the audit key; create it (0600) only if the log is empty, and then
     fsync its directory before anything is signed with it;
  3. read the last line only, in blocks backwards from the end, for its seq
     and hash; refuse to append if it is not a well-formed event (a damaged
     tail is never repaired or skipped silently: `audit verify` names it);
  4. build the event (seq + 1, prev_hash = that hash), hash it, sign the hash;
  5. write the line with one write() and fsync the file; if either fails,
     truncate the file back to its old size so no partial line stays behind
     (events that belong together, an exit and the stop that caused it, are
     appended at once: their lines in one write() and one fsync);
  6. for the first event, fsync the directory so the new file's name is durable;
  7. close the file, which releases the lock.

Readers (`verify`, `tail`) hold a shared lock only while they note the
file's size, then read no further than that, so they never see a line that
is still being written and never hold up appends for long.

What this detects: an edited, deleted, inserted or reordered line breaks a
hash, a signature or the chain at the first line touched, and forging a line
needs the audit key. What it cannot detect: events cut off the end of the log
(what remains is a valid chain), or forgery by someone who can read the key.
"""

import fcntl
import json
import os
import re
from collections import namedtuple
from pathlib import Path

from tappass_host import signing, statefile, strictjson
from tappass_host.errors import TappassError
from tappass_host.paths import HostPaths, check_sandbox_name

HASH_PREFIX = "sha256:"
FIELDS = frozenset({"seq", "ts", "event", "sandbox", "details", "prev_hash", "hash", "sig"})
EVENT_NAME = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")
_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_BLOCK = 8192
# the next append's record of the remains of one that never completed, cut off (_torn_tail)
TORN_TAIL_CUT = "audit.torn_tail_cut"


class AuditError(TappassError):
    """The audit log cannot be appended to or read."""


class AuditLogBroken(AuditError):
    """`audit verify` found a line that breaks the chain or a signature."""

    def __init__(self, line: int, problem: str):
        super().__init__(f"audit log broken at line {line}: {problem}")
        self.line = line
        self.problem = problem


class AuditWriteFailed(AuditError):
    """An event could not be written (the filesystem is full, read-only...)."""

    def __init__(self, log_path: Path, cause: OSError):
        super().__init__(f"cannot write the audit log {log_path}: "
                         f"{cause.strerror or cause}")
        self.errno = cause.errno


# ok: bool, events: int, broken_line: int | None, problem: str | None
VerifyReport = namedtuple("VerifyReport", "ok events broken_line problem", defaults=(None, None))


def event_hash(event: dict) -> str:
    import hashlib  # 11M instructions: not for a `stop` that only reads the log (issue 13)

    unsigned = {k: v for k, v in event.items() if k not in ("hash", "sig")}
    return HASH_PREFIX + hashlib.sha256(strictjson.canonical(unsigned)).hexdigest()


def _decode_sig(text: str) -> bytes | None:
    if not text.startswith(signing.PREFIX):
        return None
    import base64
    import binascii

    try:
        return base64.b64decode(text[len(signing.PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        return None


def _shape_problem(event) -> str | None:
    """What is wrong with the fields of a parsed line, if anything."""
    if not isinstance(event, dict):
        return "not a JSON object"
    if event.keys() != FIELDS:
        missing = ", ".join(sorted(FIELDS - event.keys()))
        extra = ", ".join(sorted(event.keys() - FIELDS))
        return f"missing fields: {missing}" if missing else f"unexpected fields: {extra}"
    seq = event["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return "seq is not a positive integer"
    for name in ("ts", "event", "hash", "sig"):
        if not isinstance(event[name], str):
            return f"{name} is not a string"
    if not isinstance(event["sandbox"], (str, type(None))):
        return "sandbox is neither a string nor null"
    if not isinstance(event["details"], dict):
        return "details is not an object"
    if event["prev_hash"] is not None and not (
        isinstance(event["prev_hash"], str) and _HASH.fullmatch(event["prev_hash"])
    ):
        return "prev_hash is neither 'sha256:<hex>' nor null"
    if not _HASH.fullmatch(event["hash"]):
        return "hash is not 'sha256:<hex>'"
    if _decode_sig(event["sig"]) is None:
        return "sig is not 'ed25519:<base64>'"
    return None


def _last_lines(fd: int, end: int, count: int) -> list[bytes]:
    """The last `count` lines before offset `end` (where a line ends), oldest first."""
    chunks, newlines, pos = [], 0, end
    while pos > 0 and newlines <= count:
        step = min(_BLOCK, pos)
        pos -= step
        chunk = os.pread(fd, step, pos)
        chunks.append(chunk)
        newlines += chunk.count(b"\n")
    lines = b"".join(reversed(chunks)).split(b"\n")[:-1]
    if pos > 0:
        lines = lines[1:]  # may have started mid-line
    return lines[-count:] if count else []


def _torn_tail(fd: int, size: int) -> int:
    """How many bytes at the log's end follow its last newline: what is left of
    an append that never completed. Every completed append ends in a newline
    and is fsynced before it returns; SIGKILL can stop a write between two
    pages (a crash, between the write and its fsync), and `_write_line`'s
    truncation never runs. Such a tail is no event anyone was told of."""
    pos = size
    while pos > 0:
        step = min(_BLOCK, pos)
        pos -= step
        newline = os.pread(fd, step, pos).rfind(b"\n")
        if newline >= 0:
            return size - (pos + newline + 1)
    return size


def _tail_events(fd: int, size: int, count: int) -> list[dict]:
    if size == 0 or count == 0:
        return []
    damaged = AuditError("the audit log ends in a damaged line; run 'tappass-host audit verify'")
    if os.pread(fd, 1, size - 1) != b"\n":
        raise damaged
    events = []
    for line in _last_lines(fd, size, count):
        try:
            event = strictjson.loads(line)
        except strictjson.StrictJSONError:
            raise damaged from None
        if _shape_problem(event) is not None:
            raise damaged
        events.append(event)
    return events


def _size_under_shared_lock(fd: int) -> int:
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        return os.fstat(fd).st_size
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


class _Broken(Exception):
    """A line of the log breaks an invariant; the message says which."""


def _checked_hash(line: bytes, number: int, prev_hash: str | None, public_key) -> str:
    """Check line `number` (1-based) and return its hash, or raise _Broken."""
    body = line[:-1] if line.endswith(b"\n") else line
    try:
        event = strictjson.loads(body)
    except strictjson.StrictJSONError as exc:
        raise _Broken(f"{exc} (truncated or garbled line)") from None
    problem = _shape_problem(event)
    if problem is not None:
        raise _Broken(problem)
    if strictjson.canonical(event) != body:
        raise _Broken("line is not in canonical JSON form")
    if event_hash(event) != event["hash"]:
        raise _Broken("hash does not match the event's contents (event edited)")
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(_decode_sig(event["sig"]), event["hash"].encode("utf-8"))
    except InvalidSignature:
        raise _Broken("signature does not verify with the host audit key") from None
    if event["seq"] != number:
        raise _Broken(f"seq is {event['seq']}, expected {number} "
                      "(events deleted, inserted or reordered)")
    if event["prev_hash"] != prev_hash:
        raise _Broken("prev_hash does not match the previous line's hash "
                      "(events deleted, inserted or reordered)")
    if not line.endswith(b"\n"):
        raise _Broken("line does not end in a newline (torn write)")
    return event["hash"]


class AuditLog:
    """Appends to, verifies and reads one hash-chained, signed audit log."""

    def __init__(self, log_path: Path, key_path: Path):
        self.log_path = Path(log_path)
        self.key_path = Path(key_path)
        self._key = None

    @classmethod
    def for_host(cls, paths: HostPaths) -> "AuditLog":
        return cls(paths.audit_log, paths.audit_key)

    def append(self, event: str, sandbox: str | None = None, details: dict | None = None) -> dict:
        """Write one event durably and return it exactly as written."""
        return self.append_all([(event, details)], sandbox)[0]

    def append_all(self, events: list[tuple[str, dict | None]],
                   sandbox: str | None = None) -> list[dict]:
        """Write `events` (each (name, details), all of `sandbox`) durably and
        at once: consecutive lines, one write() and one fsync; return them
        exactly as written."""
        for event, _ in events:
            if not isinstance(event, str) or not EVENT_NAME.fullmatch(event):
                raise AuditError(f"invalid audit event name {event!r}: use dotted lowercase words")
        if sandbox is not None:
            check_sandbox_name(sandbox)
        checked = [(event, self._plain_details(details)) for event, details in events]
        try:
            return self._append(checked, sandbox)
        except OSError as exc:  # e.g. ENOSPC: nothing partial stays behind (_write_line)
            raise AuditWriteFailed(self.log_path, exc) from exc

    def _append(self, events: list[tuple[str, dict]], sandbox: str | None) -> list[dict]:
        self.log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.log_path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            import base64  # as clock: where an event is written, not for every reader

            from tappass_host import clock  # datetime: only where an event is written

            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            cut = []
            if torn := _torn_tail(fd, size):
                size -= torn
                os.ftruncate(fd, size)
                cut = [(TORN_TAIL_CUT, {"bytes": torn}, None)]
            key = self._signing_key(log_is_empty=size == 0)
            last = _tail_events(fd, size, 1)
            seq, prev_hash = (last[0]["seq"], last[0]["hash"]) if last else (0, None)
            records = []
            for event, details, of in [*cut, *((e, d, sandbox) for e, d in events)]:
                seq += 1
                record = {"seq": seq, "ts": clock.now_text("milliseconds"), "event": event,
                          "sandbox": of, "details": details, "prev_hash": prev_hash}
                record["hash"] = prev_hash = event_hash(record)
                record["sig"] = signing.PREFIX + base64.b64encode(
                    key.sign(record["hash"].encode("utf-8"))
                ).decode("ascii")
                records.append(record)
            self._write_line(fd, size, b"".join(strictjson.canonical(r) + b"\n" for r in records))
            if size == 0:
                statefile.fsync_dir(self.log_path.parent)
            return records[len(cut):]
        finally:
            os.close(fd)

    def end(self) -> int:
        """Where the log ends now: the offset of the next event's line (`events_after`)."""
        try:
            fd = os.open(self.log_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            return _size_under_shared_lock(fd)
        finally:
            os.close(fd)

    def events_after(self, offset: int) -> list[dict]:
        """The events appended since the log ended at `offset` (`end`), oldest
        first: parsed only, not checked (`verify` checks); a line that does not
        parse is left out."""
        try:
            fd = os.open(self.log_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        try:
            size = _size_under_shared_lock(fd)
            data = os.pread(fd, size - offset, offset) if size > offset else b""
        finally:
            os.close(fd)
        events = []
        for line in data.split(b"\n")[:-1]:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def verify(self) -> VerifyReport:
        """Check every line's shape, hash, signature and link to the line before."""
        try:
            f = open(self.log_path, "rb")
        except FileNotFoundError:
            return VerifyReport(ok=True, events=0)
        except OSError as exc:
            raise AuditError(f"cannot read {self.log_path}: {exc.strerror}") from None
        with f:
            remaining = _size_under_shared_lock(f.fileno())
            if remaining == 0:
                return VerifyReport(ok=True, events=0)
            public_key = self._verifying_key()
            prev_hash, number = None, 0
            try:
                while remaining > 0:
                    line = f.readline(remaining)
                    remaining -= len(line)
                    number += 1
                    prev_hash = _checked_hash(line, number, prev_hash, public_key)
            except _Broken as exc:
                return VerifyReport(ok=False, events=number - 1, broken_line=number,
                                    problem=str(exc))
        return VerifyReport(ok=True, events=number)

    def tail(self, n: int = 20) -> list[dict]:
        """The last `n` events, oldest first."""
        if n < 0:
            raise AuditError("the number of events to show cannot be negative")
        try:
            fd = os.open(self.log_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        try:
            return _tail_events(fd, _size_under_shared_lock(fd), n)
        finally:
            os.close(fd)

    @staticmethod
    def _plain_details(details) -> dict:
        """A JSON round-trip copy, so the returned event is exactly what is on disk."""
        if details is None:
            return {}
        if not isinstance(details, dict):
            raise AuditError(f"audit details must be a dict, not {type(details).__name__}")
        try:
            return strictjson.loads(strictjson.canonical(details))
        except (TypeError, ValueError) as exc:
            raise AuditError(f"audit details are not JSON-serializable: {exc}") from None

    def _signing_key(self, log_is_empty: bool):
        """The private audit key; called under the exclusive lock, so creation cannot race."""
        if self._key is None:
            if self.key_path.exists():
                self._key = signing.load_signer(self.key_path)
            elif log_is_empty:
                self._key = signing.load_or_create_private_key(self.key_path)
                # Durable before it signs anything; its directory may be new too.
                statefile.fsync_dir(self.key_path.parent)
                statefile.fsync_dir(self.key_path.parent.parent)
            else:
                # A new key would make every existing event unverifiable.
                raise AuditError(
                    f"audit key {self.key_path} is missing but the audit log has events: "
                    "restore the key, or move the log aside to start a new one"
                )
        return self._key

    def _verifying_key(self):
        if not self.key_path.exists():
            raise AuditError(f"cannot verify the audit log: audit key {self.key_path} is missing")
        return signing.load_or_create_private_key(self.key_path).public_key()

    @staticmethod
    def _write_line(fd: int, old_size: int, line: bytes) -> None:
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise AuditError(f"short write to the audit log ({written} of {len(line)} bytes)")
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, old_size)
            raise

