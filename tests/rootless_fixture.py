"""Real non-root users for the rootless tests.

The session creates two users and removes them (and their /etc/subuid and
/etc/subgid lines) afterwards: one with a subordinate id range, one without
(the single-id fallback). Each gets a private, world-traversable directory
with its state dir and an interpreter it can run: the project's .venv points
at a pyenv python under /root, which other users cannot reach, so each user
runs a venv of the system's python of the same version whose site points at
this checkout's .venv site-packages (the same packages, nothing downloaded).

Everything a user runs goes through scripts/in-crun-namespace, as a user of
rootless podman would go through `podman unshare`: inside the user's own user
namespace (uid 0 there is the user, 1..N its subordinate ids), with the
host's cgroup quirk handled (DESIGN §12).
"""

import fcntl
import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from audit_records import read_audit

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
IN_NAMESPACE = REPO / "scripts" / "in-crun-namespace"
FAKE_MACHINE_KEY = "-----BEGIN PRIVATE KEY-----\nnot a real key, a canary\n-----END PRIVATE KEY-----\n"

# Run as the user, inside its namespace: enroll NAME in STATE and apply a
# first keyring through the real update path; write a canary machine key.
ENROLL = f"""
import json, os, sys
sys.path.insert(0, {str(TESTS)!r})
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
sys.path.insert(0, {str(TESTS)!r})
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
        wrapper = [str(IN_NAMESPACE)] if namespace else []
        return subprocess.run(["runuser", "-u", self.name, "--", *wrapper, *argv],
                              capture_output=True, text=True, timeout=timeout, env=self.env(),
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


def _user_python(root: Path) -> str:
    """A venv the users can run: the system python of our version, with our site-packages."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    base = f"/usr/bin/python{version}"
    assert os.access(base, os.X_OK), f"{base} is missing: the rootless tests run it as the users"
    venv = root / "venv"
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    sites = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    site_packages = venv / "lib" / f"python{version}" / "site-packages"
    (site_packages / "tappass-host-checkout.pth").write_text(
        "".join(f"import site; site.addsitedir({s!r})\n" for s in sites))
    return str(venv / "bin" / "python")


def _next_subid_start() -> int:
    end = 100000
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


def create_user(root: Path, python: str, *, subids: bool) -> User:
    name = f"tprl{uuid.uuid4().hex[:8]}"
    with _accounts_lock():
        # -r: a system account, which useradd gives no subordinate ids
        subprocess.run(["useradd", "-r", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin",
                        name], check=True, capture_output=True, timeout=30)
        _drop_subids(name)
        if subids:
            start = _next_subid_start()
            subprocess.run(["usermod", "--add-subuids", f"{start}-{start + 65535}",
                            "--add-subgids", f"{start}-{start + 65535}", name],
                           check=True, capture_output=True, timeout=30)
    entry = pwd.getpwnam(name)
    home = root / name
    home.mkdir(mode=0o755)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    user = User(name=name, uid=entry.pw_uid, gid=entry.pw_gid,
                subuid=_subid(name, "/etc/subuid") if subids else None, home=home, python=python)
    user.config_file.write_text("")
    can_import = user.run(python, "-c", "import tappass_host, cryptography, jsonschema")
    assert can_import.returncode == 0, (
        "a non-root user cannot run this checkout (is it and its .venv readable by others?): "
        + can_import.stderr[-500:])
    return user


def remove_user(user: User) -> None:
    with _accounts_lock():
        subprocess.run(["userdel", user.name], capture_output=True, timeout=30)
        _drop_subids(user.name)


@pytest.fixture(scope="session")
def rootless_users():
    """{"subids": User with a subordinate range, "single": User without one}."""
    if os.geteuid() != 0:
        pytest.fail("the rootless tests create users: run them as root")
    root = Path(tempfile.mkdtemp(prefix="tp-rl-", dir="/tmp"))
    root.chmod(0o755)
    users = []
    try:
        python = _user_python(root)
        users.append(create_user(root, python, subids=True))
        users.append(create_user(root, python, subids=False))
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
