"""The devplane's state directory: plain files, each written atomically.

    signing-key.pem                   Ed25519 key: signs bootstrap tokens and keyrings (0600)
    ca.pem, ca-key.pem                the CA behind TLS and sandbox certificates (key 0600)
    server.pem, server-key.pem        the TLS certificate of the running `serve`
    url                               the origin `serve` is reachable at
    bootstraps/<sha256(jti)>.json     bootstraps issued (never the token itself)
    consumed/<sha256(jti)>            bootstraps burned by `complete`
    sandboxes/<sandbox_id>.json       enrolled sandboxes
    keyrings/<sandbox_id>/<seq>.json  every keyring published, in order; the last is the latest
    acks/<sandbox_id>.jsonl           acks received, with the serial of the sender's certificate

Files only ever get created (or replaced whole), never edited, and the only
files two processes may race to create are named so that creation itself
decides the winner (O_EXCL or link): `serve` and the CLI share the directory
without a lock. In particular a bootstrap is burned by creating its file in
`consumed/`, which exactly one `complete` can do.
"""

import fcntl
import json
import os
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tappass_host import clock, signing, statefile, strictjson
from tappass_host.devplane.ca import CertificateAuthority, cert_pem, key_pem
from tappass_host.errors import TappassError
from tappass_host.identity import bootstrap as bootstraps

ORG_ID = "org_dev"
TRUST_DOMAIN = "devplane.tappass.test"


class DevplaneError(TappassError):
    pass


@dataclass(frozen=True)
class Published:
    """One published keyring: `seq` orders publishes, `policy_version` is the SSE id."""

    seq: int
    policy_version: int
    envelope: bytes


def utc_text(when: float) -> str:
    return clock.format_timestamp(datetime.fromtimestamp(when, timezone.utc))


def _create_exclusive(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Create `path` with `data` unless it exists; readers never see it half-written."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    statefile.write_file_durably(tmp, data, mode)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    statefile.fsync_dir(path.parent)
    return True


def _read_json(path: Path):
    try:
        return strictjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None


class DevplaneState:
    def __init__(self, root: Path):
        self.root = Path(root).absolute()

    @classmethod
    def open(cls, root: Path) -> "DevplaneState":
        """Open `root`, creating the CA and signing key on first use."""
        state = cls(root)
        for sub in ("", "bootstraps", "consumed", "sandboxes", "keyrings", "acks"):
            (state.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        with state._locked(".init.lock"):
            if not (state.root / "ca.pem").exists():
                ca = CertificateAuthority.create(TRUST_DOMAIN)
                statefile.write_atomic(state.root / "ca-key.pem", key_pem(ca.key), 0o600)
                statefile.write_atomic(state.root / "ca.pem", cert_pem(ca.cert), 0o644)
            signing.load_or_create_private_key(state.root / "signing-key.pem")
        return state

    def publishing(self):
        """Held while the next policy_version is chosen and published."""
        return self._locked(".publish.lock")

    def _locked(self, name: str):
        return statefile.locked(self.root / name)

    # -- keys and certificates ------------------------------------------------

    @cached_property
    def signing_key(self) -> Ed25519PrivateKey:
        return signing.load_or_create_private_key(self.root / "signing-key.pem")

    @property
    def trust_key(self) -> str:
        """The key hosts pin: `ed25519:<b64>`."""
        return signing.public_key_to_text(self.signing_key.public_key())

    @cached_property
    def ca(self) -> CertificateAuthority:
        return CertificateAuthority.from_pem((self.root / "ca.pem").read_bytes(),
                                             (self.root / "ca-key.pem").read_bytes())

    def write_server_identity(self, hosts: list[str]) -> tuple[Path, Path]:
        key, cert = self.ca.issue_server(hosts)
        statefile.write_atomic(self.root / "server-key.pem", key_pem(key), 0o600)
        statefile.write_atomic(self.root / "server.pem", cert_pem(cert), 0o644)
        return self.root / "server.pem", self.root / "server-key.pem"

    # -- where `serve` listens --------------------------------------------------

    @property
    def url(self) -> str | None:
        try:
            return (self.root / "url").read_text("ascii").strip() or None
        except FileNotFoundError:
            return None

    def set_url(self, url: str) -> None:
        statefile.write_atomic(self.root / "url", (url + "\n").encode("ascii"))

    # -- bootstraps -------------------------------------------------------------

    def issue_bootstrap(self, name: str, ttl: int, url: str, *, now: float | None = None,
                        iat: int | None = None, exp: int | None = None) -> str:
        """Record a new bootstrap for sandbox spec `name`; returns its enroll URL.

        `iat`/`exp` override the times (tests use this to make expired tokens).
        """
        now = int(time.time() if now is None else now)
        claims = {
            "v": bootstraps.VERSION,
            "jti": secrets.token_urlsafe(18),
            "org_id": ORG_ID,
            "sandbox_spec_ref": name,
            "iat": now if iat is None else iat,
            "exp": now + ttl if exp is None else exp,
            "sign_key": self.trust_key,
            "tls_ca_sha256": self.ca.sha256,
        }
        record = {k: claims[k] for k in ("org_id", "sandbox_spec_ref", "iat", "exp")}
        path = self.root / "bootstraps" / f"{bootstraps.jti_hash(claims['jti'])}.json"
        if not _create_exclusive(path, strictjson.canonical(record)):
            raise DevplaneError("bootstrap id collision; try again")
        token = bootstraps.encode(claims, self.signing_key)
        return f"{url.rstrip('/')}{bootstraps.ENROLL_PATH}{token}"

    def bootstrap(self, jti: str) -> dict | None:
        return _read_json(self.root / "bootstraps" / f"{bootstraps.jti_hash(jti)}.json")

    def is_consumed(self, jti: str) -> bool:
        return (self.root / "consumed" / bootstraps.jti_hash(jti)).exists()

    def burn(self, jti: str) -> bool:
        """True for exactly one caller per bootstrap, across threads and processes."""
        path = self.root / "consumed" / bootstraps.jti_hash(jti)
        return _create_exclusive(path, utc_text(time.time()).encode("ascii") + b"\n")

    # -- sandboxes ----------------------------------------------------------------

    def add_sandbox(self, record: dict) -> None:
        path = self.root / "sandboxes" / f"{record['sandbox_id']}.json"
        if not _create_exclusive(path, json.dumps(record, indent=2, sort_keys=True).encode()):
            raise DevplaneError(f"sandbox id {record['sandbox_id']} already exists")

    def sandbox(self, sandbox_id: str) -> dict | None:
        if not sandbox_id or "/" in sandbox_id or sandbox_id.startswith("."):
            return None
        return _read_json(self.root / "sandboxes" / f"{sandbox_id}.json")

    def sandboxes(self) -> list[dict]:
        found = (_read_json(p) for p in sorted((self.root / "sandboxes").glob("*.json")))
        return sorted((r for r in found if r), key=lambda r: r["created_at"])

    def find_sandboxes(self, name_or_id: str) -> list[dict]:
        """Sandboxes enrolled under spec `name_or_id`, or the one with that id."""
        return [r for r in self.sandboxes() if name_or_id in (r["name"], r["sandbox_id"])]

    # -- keyrings -----------------------------------------------------------------

    def keyrings(self, sandbox_id: str, after_seq: int = 0) -> list[Published]:
        folder = self.root / "keyrings" / sandbox_id
        try:
            names = sorted(p.name for p in folder.iterdir() if p.name[0] != ".")
        except FileNotFoundError:
            return []
        published = []
        for name in names:
            seq = int(name.split(".")[0])
            if seq > after_seq:
                doc = _read_json(folder / name)
                published.append(Published(seq=seq, policy_version=doc["policy_version"],
                                           envelope=doc["envelope"].encode("utf-8")))
        return published

    def latest(self, sandbox_id: str) -> Published | None:
        found = self.keyrings(sandbox_id)
        return found[-1] if found else None

    def next_policy_version(self, sandbox_id: str) -> int:
        return max((p.policy_version for p in self.keyrings(sandbox_id)), default=0) + 1

    def publish(self, sandbox_id: str, envelope: bytes, policy_version: int) -> Published:
        """Append `envelope` as the latest keyring of `sandbox_id`."""
        folder = self.root / "keyrings" / sandbox_id
        folder.mkdir(mode=0o700, exist_ok=True)
        doc = {"policy_version": policy_version, "published_at": utc_text(time.time()),
               "envelope": envelope.decode("utf-8")}
        while True:
            latest = self.latest(sandbox_id)
            seq = latest.seq + 1 if latest else 1
            if _create_exclusive(folder / f"{seq:010d}.json", strictjson.canonical(doc)):
                return Published(seq=seq, policy_version=policy_version, envelope=envelope)

    # -- acks -----------------------------------------------------------------------

    def add_ack(self, sandbox_id: str, ack: dict) -> None:
        path = self.root / "acks" / f"{sandbox_id}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, strictjson.canonical(ack) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    def acks(self, sandbox_id: str) -> list[dict]:
        try:
            lines = (self.root / "acks" / f"{sandbox_id}.jsonl").read_bytes().splitlines()
        except FileNotFoundError:
            return []
        return [strictjson.loads(line) for line in lines if line]
