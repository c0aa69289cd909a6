"""Real non-root users for the rootless tests.

The session creates two users and removes them (and their /etc/subuid and
/etc/subgid lines) afterwards: one with a subordinate id range, one without
(the single-id fallback). Each gets a private, world-traversable directory
with its state dir. What the users run is staged in a world-readable
directory of its own, never read from the checkout, which may sit where
other users cannot reach it (a clone in /root, mode 0700 on a stock Debian;
a .venv whose python is a pyenv one under /root): a venv of the system's
python of the same version, holding a copy of this checkout's tappass_host
and of its runtime dependencies as installed in the .venv (nothing
downloaded), the test modules the users import, and the namespace wrapper.

Everything a user runs goes through scripts/in-crun-namespace, as a user of
rootless podman would go through `podman unshare`: inside the user's own user
namespace (uid 0 there is the user, 1..N its subordinate ids), with the
host's cgroup quirk handled (DESIGN §12).
"""

import fcntl
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from importlib import metadata
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

import patience
from audit_records import read_audit
from sandbox_fixture import HELLO_AGENT

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
IN_NAMESPACE = REPO / "scripts" / "in-crun-namespace"
STAGED_TESTS = "tests"             # under the staging directory, on the users' sys.path
STAGED_WRAPPER = "in-crun-namespace"
FAKE_MACHINE_KEY = "-----BEGIN PRIVATE KEY-----\nnot a real key, a canary\n-----END PRIVATE KEY-----\n"

# Run as the user, inside its namespace: enroll NAME in STATE and apply a
# first keyring through the real update path; write a canary machine key.
ENROLL = f"""
import json, os, sys
import keyrings
from tappass_host import signing
from tappass_host.sync.apply import apply_update
from tappass_host.paths import HostPaths

state, name, aspects = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
paths = HostPaths.resolve(state)
signer = signing.load_or_create_private_key(paths.state / f"{{name}}.signer.pem")
keyrings.enroll(paths, name, [signer])
apply_update(paths, name, keyrings.sign(keyrings.policy(1, **aspects), signer))
paths.machine_key.parent.mkdir(parents=True, exist_ok=True)
fd = os.open(paths.machine_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.write(fd, {FAKE_MACHINE_KEY!r}.encode())
os.close(fd)
"""


# Run as the user: sign keyring version N for NAME (with the key ENROLL made) into FILE.
SIGN = f"""
import sys
import keyrings
from tappass_host import signing
from tappass_host.paths import HostPaths

state, name, version, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
signer = signing.load_or_create_private_key(HostPaths.resolve(state).state / f"{{name}}.signer.pem")
open(out, "wb").write(keyrings.sign(keyrings.policy(version), signer))
"""


@dataclass
class User:
    name: str
    uid: int
    gid: int
    subuid: tuple[int, int] | None     # (start, count) in /etc/subuid, None for the fallback user
    home: Path
    python: str
    wrapper: Path                      # the staged scripts/in-crun-namespace

    @property
    def state(self) -> Path:
        return self.home / "state"

    @property
    def config_file(self) -> Path:
        return self.home / "config.toml"

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("TAPPASS_", "PYTHON", "VIRTUAL_ENV", "XDG_"))}
        return {**env, "HOME": str(self.home), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

    def run(self, *argv: str, timeout: float = 60, namespace: bool = True
            ) -> subprocess.CompletedProcess:
        """`argv` as this user, inside the user's namespace (or not)."""
        wrapper = [str(self.wrapper)] if namespace else []
        return subprocess.run(["runuser", "-u", self.name, "--", *wrapper, *argv],
                              capture_output=True, text=True, timeout=patience.seconds(timeout),
                              env=self.env(),
                              cwd=self.home, stdin=subprocess.DEVNULL)

    def tappass(self, *args: str, timeout: float = 60, namespace: bool = True
                ) -> subprocess.CompletedProcess:
        return self.run(self.python, "-m", "tappass_host", "--state-dir", str(self.state),
                        "--config", str(self.config_file), *args, timeout=timeout,
                        namespace=namespace)

    def enroll(self, name: str, **aspects) -> str:
        result = self.run(self.python, "-c", ENROLL, str(self.state), name, json.dumps(aspects))
        assert result.returncode == 0, result.stderr[-3000:]
        return name

    def namespace_map(self, kind: str = "uid") -> list[tuple[int, int, int]]:
        """The user's namespace as the host sees it: (inside, host, count) lines."""
        result = self.run("cat", f"/proc/self/{kind}_map")
        assert result.returncode == 0, result.stderr
        return [tuple(int(x) for x in line.split()) for line in result.stdout.splitlines()]

    def record(self, name: str) -> dict:
        return json.loads((self.state / "sandboxes" / name / "sandbox.json").read_text())

    def audit_events(self) -> list[dict]:
        return read_audit(self.state / "audit" / "audit.jsonl")

    def agent_dir(self, label: str) -> Path:
        directory = self.home / f"agent-{label}-{uuid.uuid4().hex[:6]}"
        directory.mkdir(mode=0o755)
        return directory

    def hello_agent(self) -> Path:
        """The sample agent, copied where the user can read it (not the checkout's:
        root's home, where a checkout may be, is 0700 on a stock Debian)."""
        directory = self.agent_dir("hello")
        shutil.copytree(HELLO_AGENT, directory, dirs_exist_ok=True)
        return directory


def _runtime_distributions() -> list[metadata.Distribution]:
    """tappass-host and what it needs at run time (no extras), as installed here."""
    from packaging.requirements import Requirement

    found, seen, todo = [], set(), ["tappass-host"]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        found.append(metadata.distribution(name))
        for text in found[-1].requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def _stage(root: Path) -> tuple[str, Path]:
    """What the users run, in `root` (world-readable): (their python, the wrapper)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    base = f"/usr/bin/python{version}"
    assert os.access(base, os.X_OK), f"{base} is missing: the rootless tests run it as the users"
    venv = root / "venv"
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=patience.seconds(120))
    site_packages = venv / "lib" / f"python{version}" / "site-packages"
    for dist in _runtime_distributions():
        own = dist.metadata["Name"] == "tappass-host"
        for file in dist.files or []:
            # the checkout's own package is copied whole below, not its editable hook
            if file.parts[0] == ".." or (own and not file.parts[0].endswith(".dist-info")):
                continue
            source, target = Path(dist.locate_file(file)), site_packages / file
            if source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
    shutil.copytree(REPO / "tappass_host", site_packages / "tappass_host",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / STAGED_TESTS).mkdir()
    for module in TESTS.glob("*.py"):
        shutil.copy2(module, root / STAGED_TESTS / module.name)
    (site_packages / "tappass-host-tests.pth").write_text(f"{root / STAGED_TESTS}\n")
    shutil.copy2(IN_NAMESPACE, root / STAGED_WRAPPER)
    for directory, dirs, files in os.walk(root):
        for entry in dirs + files:
            path = Path(directory) / entry
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
    return str(venv / "bin" / "python"), root / STAGED_WRAPPER


def _next_subid_start() -> int:
    # Above the root sandboxes' agent ids (agent_id_range, 200000-299999): a user whose
    # range covered them could act as those agents, and this fixture's teardown, which
    # kills whatever runs under the user's ids, killed another worker's agents (CI: a
    # running agent ended by SIGKILL; a second worker's user got 165536-231071).
    end = 300000
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            for line in Path(path).read_text().splitlines():
                fields = line.split(":")
                if len(fields) == 3:
                    end = max(end, int(fields[1]) + int(fields[2]))
        except FileNotFoundError:
            pass
    return end


def _subid(name: str, path: str) -> tuple[int, int] | None:
    try:
        for line in Path(path).read_text().splitlines():
            fields = line.split(":")
            if len(fields) == 3 and fields[0] == name:
                return int(fields[1]), int(fields[2])
    except FileNotFoundError:
        pass
    return None


def _drop_subids(name: str) -> None:
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            lines = Path(path).read_text().splitlines(keepends=True)
        except FileNotFoundError:
            continue
        kept = [line for line in lines if line.split(":", 1)[0] != name]
        if kept != lines:
            Path(path).write_text("".join(kept))


@contextmanager
def _accounts_lock():
    """Parallel test workers create users too: one at a time, so that their
    subordinate ranges never overlap."""
    with open("/tmp/.tappass-rootless-users.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def create_user(root: Path, python: str, wrapper: Path, *, subids: bool) -> User:
    name = f"tprl{uuid.uuid4().hex[:8]}"
    with _accounts_lock():
        # -r: a system account, which useradd gives no subordinate ids
        subprocess.run(["useradd", "-r", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin",
                        name], check=True, capture_output=True, timeout=patience.seconds(30))
        _drop_subids(name)
        if subids:
            start = _next_subid_start()
            subprocess.run(["usermod", "--add-subuids", f"{start}-{start + 65535}",
                            "--add-subgids", f"{start}-{start + 65535}", name],
                           check=True, capture_output=True, timeout=patience.seconds(30))
    entry = pwd.getpwnam(name)
    home = root / name
    home.mkdir(mode=0o755)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    user = User(name=name, uid=entry.pw_uid, gid=entry.pw_gid,
                subuid=_subid(name, "/etc/subuid") if subids else None, home=home, python=python,
                wrapper=wrapper)
    user.config_file.write_text("")
    can_import = user.run(python, "-c", "import tappass_host, cryptography, jsonschema")
    assert can_import.returncode == 0, (
        "a non-root user cannot run the staged tappass-host: "
        + can_import.stderr[-500:])
    return user


def remove_user(user: User) -> None:
    with _accounts_lock():
        subprocess.run(["userdel", user.name], capture_output=True, timeout=patience.seconds(30))
        _drop_subids(user.name)


@pytest.fixture(scope="session")
def staged():
    """(python, wrapper): tappass-host as any user can run it, staged world-readable."""
    root = Path(tempfile.mkdtemp(prefix="tp-stage-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield _stage(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def rootless_users(staged):
    """{"subids": User with a subordinate range, "single": User without one}."""
    if os.geteuid() != 0:
        pytest.fail("the rootless tests create users: run them as root")
    root = Path(tempfile.mkdtemp(prefix="tp-rl-", dir="/tmp"))
    root.chmod(0o755)
    users = []
    python, wrapper = staged
    try:
        users.append(create_user(root, python, wrapper, subids=True))
        users.append(create_user(root, python, wrapper, subids=False))
        yield {"subids": users[0], "single": users[1]}
    finally:
        for user in users:
            _kill_leftovers(user)
            remove_user(user)
        shutil.rmtree(root, ignore_errors=True)


def _kill_leftovers(user: User) -> None:
    """Whatever still runs as the user or its subordinate ids (nothing should)."""
    ids = {user.uid} | (set(range(user.subuid[0], user.subuid[0] + user.subuid[1]))
                        if user.subuid else set())
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            continue
        if uid in ids:
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
