"""The keyring directory: layout, modes, garbage collection, recovery, and
crash safety under SIGKILL at random instants."""

import json
import os
import random
import signal
import stat
import time
import traceback
from datetime import datetime, timedelta, timezone

import pytest

import patience
from keyrings import policy, sign
from tappass_host.audit import AuditLog
from tappass_host.keyring.store import KeyringStore, expires_at, store_of
from tappass_host.sync.apply import apply_update

BASE = datetime.now(timezone.utc).replace(microsecond=0)


def envelope_for(version: int, signer) -> bytes:
    """Deterministic: Ed25519 signatures and the JSON here depend only on inputs."""
    return sign(policy(version, now=BASE, ttl=3600), signer)


def keyring_dir(paths):
    return paths.sandbox("demo").keyring


def version_dirs(paths):
    return sorted(p.name for p in keyring_dir(paths).iterdir() if p.name.startswith("..v"))


def test_layout_links_and_modes(paths, sandbox, signer):
    apply_update(paths, "demo", envelope_for(1, signer), render_files=lambda k: {
        "harness/claude-code/settings.json": b"{}", "layers/extra/a/b.txt": b"b"})
    top = keyring_dir(paths)
    current = os.readlink(top / "..data")
    assert current.startswith("..v0000000001-") and "/" not in current
    for name in ("keyring.json", "keyring.dsse.json", "harness", "layers"):
        assert os.readlink(top / name) == f"..data/{name}"
    assert stat.S_IMODE(top.stat().st_mode) == 0o750
    for dirpath, dirnames, filenames in os.walk(top / current):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o550, dirpath
        for name in filenames:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, name)).st_mode) == 0o440
    assert (top / "harness" / "claude-code" / "settings.json").read_bytes() == b"{}"
    assert (top / "layers" / "extra" / "a" / "b.txt").read_bytes() == b"b"
    assert json.loads((top / "keyring.json").read_bytes())["policy_version"] == 1
    dsse = json.loads((top / "keyring.dsse.json").read_bytes())
    assert dsse["payloadType"] == "application/vnd.tappass.keyring+json"


def test_files_belong_to_the_agent_group(paths, signer):
    import keyrings
    from tappass_host import sandbox_record

    record = keyrings.enroll(paths, "demo", [signer])
    record = record._replace(agent_gid=201234)
    sandbox_record.save(paths.sandbox("demo"), record)
    apply_update(paths, "demo", envelope_for(1, signer))
    top = keyring_dir(paths)
    assert top.stat().st_gid == 201234
    assert (top / "keyring.json").stat().st_gid == 201234


def test_garbage_collection_keeps_the_previous_version(paths, sandbox, signer):
    for version in range(1, 6):
        apply_update(paths, "demo", envelope_for(version, signer))
    assert [d[:13] for d in version_dirs(paths)] == ["..v0000000004", "..v0000000005"]


def test_recovery_removes_leftovers_which_never_become_current(paths, sandbox, signer):
    apply_update(paths, "demo", envelope_for(1, signer))
    top = keyring_dir(paths)
    (top / "..tmp-deadbeef").mkdir()
    (top / "..tmp-deadbeef" / "keyring.json").write_text('{"half":')
    newer = "..v0000000009-20991231T000000Z"
    (top / newer).mkdir()
    os.symlink(newer, top / "..data_tmp")
    (top / "keyring.json").unlink()  # crash before the first links were made
    store = KeyringStore(top, paths.sandbox("demo").keyring_lock)
    with store.transaction():
        assert store.current_version().policy_version == 1
    assert sorted(p.name for p in top.iterdir() if p.name.startswith("..")) == [
        "..data", version_dirs(paths)[0]]
    assert json.loads((top / "keyring.json").read_bytes())["policy_version"] == 1
    apply_update(paths, "demo", envelope_for(2, signer))
    assert json.loads((top / "keyring.json").read_bytes())["policy_version"] == 2


def test_no_keyring_yet(paths, sandbox):
    store = KeyringStore(keyring_dir(paths), paths.sandbox("demo").keyring_lock)
    with store.transaction():
        assert store.current_version() is None
        assert store.read_current() is None


def test_readers_see_the_current_version_through_the_store(paths, sandbox, signer):
    store = store_of(paths.sandbox("demo"))
    derived = []
    follower = store.follow(lambda payload: derived.append(payload["policy_version"])
                            or payload["policy_version"])
    assert store.read_current() is None and follower.current() is None
    assert not store.is_current(envelope_for(1, signer))
    apply_update(paths, "demo", envelope_for(1, signer))
    assert store.read_current()["policy_version"] == 1
    assert store.is_current(envelope_for(1, signer))
    assert follower.current() == follower.current() == 1
    apply_update(paths, "demo", envelope_for(2, signer))
    assert not store.is_current(envelope_for(1, signer))
    assert follower.current() == follower.current() == 2
    assert derived == [1, 2]  # derived once per flip, not once per question
    assert expires_at(store.read_current()) == BASE + timedelta(seconds=3600)
    assert expires_at({}) is None and expires_at({"expires_at": "soon"}) is None
    assert expires_at([]) is None


def test_a_reader_refuses_an_unreadable_keyring(paths, sandbox, signer):
    apply_update(paths, "demo", envelope_for(1, signer))
    store = store_of(paths.sandbox("demo"))
    follower = store.follow(lambda payload: payload["policy_version"])
    assert follower.current() == 1
    version = keyring_dir(paths) / os.readlink(keyring_dir(paths) / "..data")
    version.chmod(0o750)
    (version / "keyring.json").chmod(0o640)
    (version / "keyring.json").write_text('{"half":')
    assert store.read_current() is None
    assert follower.current() is None
    (version / "keyring.json").unlink()
    assert store.read_current() is None
    assert follower.current() is None
    assert store.current_version().policy_version == 1  # the version is named by ..data


def _apply_forever(paths, signer, first: int, ready_fd: int) -> None:
    """Runs in a forked child: apply updates until killed; never returns."""
    os.write(ready_fd, b"x")
    version = first
    try:
        while True:
            apply_update(paths, "demo", envelope_for(version, signer))
            version += 1
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(1)


def _fork_applier(paths, signer, first: int) -> int:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _apply_forever(paths, signer, first, write_fd)
    os.close(write_fd)
    os.read(read_fd, 1)
    os.close(read_fd)
    return pid


def _current_version(paths) -> int:
    data = (keyring_dir(paths) / "keyring.json").read_bytes()
    return json.loads(data)["policy_version"]


def test_sigkill_at_random_instants_leaves_one_whole_version(paths, sandbox, signer):
    """SIGKILL lands inside applies whatever the machine's speed: the child
    reports each apply it begins; the parent kills it once it has begun two
    or three, at a random instant within one apply's duration, as measured
    between the child's last two reports. What is left is always the
    version before the last one begun, or that one: whole, nothing torn."""
    written = {v: envelope_for(v, signer) for v in range(1, 2000)}
    payload_of = {v: json.dumps(policy(v, now=BASE, ttl=3600)).encode() for v in written}
    apply_update(paths, "demo", written[1])
    rng = random.Random(1234)

    def applier(first: int, reports: int) -> None:
        """The forked child: report, then apply, each next version, until killed."""
        try:
            version = first
            while True:
                os.write(reports, version.to_bytes(8, "big"))
                apply_update(paths, "demo", written[version])
                version += 1
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)

    def next_report(fd: int) -> int | None:
        data = b""
        while len(data) < 8:
            chunk = os.read(fd, 8 - len(data))
            if not chunk:
                return None
            data += chunk
        return int.from_bytes(data, "big")

    seen_versions, interrupted = set(), 0
    for _ in range(200):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            applier(_current_version(paths) + 1, write_fd)
        os.close(write_fd)
        begun = [(next_report(read_fd), time.monotonic()) for _ in range(rng.randint(2, 3))]
        assert None not in [version for version, _ in begun], "the child stopped by itself"
        time.sleep(rng.uniform(0, begun[-1][1] - begun[-2][1]))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), "the child stopped by itself"
        last = begun[-1][0]
        while (more := next_report(read_fd)) is not None:
            last = more
        os.close(read_fd)

        store = KeyringStore(keyring_dir(paths), paths.sandbox("demo").keyring_lock)
        with store.transaction():
            current = store.current_version()
        version = _current_version(paths)
        assert version == current.policy_version
        assert version in (last - 1, last), (version, last)
        top = keyring_dir(paths)
        assert (top / "keyring.json").read_bytes() == payload_of[version]
        assert (top / "keyring.dsse.json").read_bytes() == written[version]
        leftovers = [p.name for p in top.iterdir()
                     if p.name.startswith(("..tmp-", "..data_tmp"))]
        assert leftovers == []
        seen_versions.add(version)
        interrupted += version == last - 1
    assert len(seen_versions) > 50, "no apply completed between the kills"
    assert interrupted > 0, "no kill landed inside an apply"
    report = AuditLog.for_host(paths).verify()
    assert report.ok, report


def test_reader_never_sees_a_torn_or_missing_keyring(paths, sandbox, signer):
    apply_update(paths, "demo", envelope_for(1, signer))
    pid = _fork_applier(paths, signer, 2)
    path = keyring_dir(paths) / "keyring.json"
    versions = []
    deadline = time.monotonic() + patience.seconds(60)
    try:
        # At least 10,000 reads, and on until 20 flips were seen (a loaded CI
        # machine may flip slowly), within a minute.
        while len(versions) < 10_000 or (versions[-1] - versions[0] < 20
                                         and time.monotonic() < deadline):
            with open(path, "rb") as f:
                doc = json.loads(f.read())
            versions.append(doc["policy_version"])
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert versions == sorted(versions)
    assert versions[-1] - versions[0] >= 20, "no flips happened while reading"


@pytest.mark.parametrize("entry", ["..data_tmp", "..tmp-0001"])
def test_a_stray_leftover_alone_is_cleaned(paths, sandbox, entry):
    top = keyring_dir(paths)
    top.mkdir(parents=True)
    (top / entry).mkdir()
    store = KeyringStore(top, paths.sandbox("demo").keyring_lock)
    with store.transaction():
        assert store.current_version() is None
    assert not (top / entry).exists()


def test_complete_exchanges_the_current_version_in_place(paths, sandbox, signer):
    """A start whose layers render other files than the flip did: the version is
    rewritten and exchanged whole; `..data` and the keyring's bytes never change."""
    apply_update(paths, "demo", envelope_for(1, signer), render_files=lambda k: {})
    top = keyring_dir(paths)
    data, payload = os.readlink(top / "..data"), (top / "keyring.json").read_bytes()
    store = KeyringStore(top, paths.sandbox("demo").keyring_lock)
    wanted = {"layers/notes/note.txt": b"v1", "harness/x/settings.json": b"{}"}
    with store.transaction():
        assert store.read_current()["policy_version"] == 1
        assert store.complete(wanted)
        assert not store.complete(wanted)  # already there
    assert os.readlink(top / "..data") == data
    assert (top / "keyring.json").read_bytes() == payload
    assert (top / "layers" / "notes" / "note.txt").read_bytes() == b"v1"
    assert sorted(p.name for p in top.iterdir() if p.name.startswith("..")) == ["..data", data]
    with store.transaction(), pytest.raises(ValueError):
        store.complete({"keyring.json": b"{}"})  # only under harness/, layers/
    assert (top / "keyring.json").read_bytes() == payload


def test_a_version_from_before_layers_existed_is_completed(paths, sandbox, signer):
    apply_update(paths, "demo", envelope_for(1, signer), render_files=lambda k: {})
    top = keyring_dir(paths)
    version = top / os.readlink(top / "..data")
    version.chmod(0o750)
    (version / "layers").rmdir()  # as an older tappass-host wrote it
    store = KeyringStore(top, paths.sandbox("demo").keyring_lock)
    with store.transaction():
        assert store.complete({})
    assert os.listdir(top / "layers") == []
