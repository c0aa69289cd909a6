"""The sandbox record, `<state>/sandboxes/<name>/sandbox.json` (DESIGN §4).

Written by enrollment, extended by `start`; always written atomically.
"""

import json
from collections import namedtuple
from pathlib import Path
from types import MappingProxyType

from tappass_host import statefile
from tappass_host.errors import NotFound, TappassError
from tappass_host.paths import HostPaths, SandboxPaths, check_sandbox_name


class BadRecord(TappassError):
    """sandbox.json exists but cannot be used."""


class SandboxRecord(namedtuple(
        "SandboxRecord", "name sandbox_id org_id spiffe_id sync_url signing_keys threshold "
                         "created_at agent runtime agent_uid agent_gid extra",
        defaults=(None, None, None, None, MappingProxyType({})))):
    """Immutable: a change is a `_replace` and a `save`. Strings but
    signing_keys (list[str]), threshold (int), agent_uid and agent_gid (int);
    agent, runtime, agent_uid and agent_gid None until set; extra: the fields
    other versions wrote, kept (a read-only mapping)."""

    __slots__ = ()

    def to_json(self) -> bytes:
        doc = {k: v for k, v in zip(self._fields, self) if k != "extra" and v is not None}
        doc.update(self.extra)
        return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> "SandboxRecord":
        try:
            doc = json.loads(data)
        except ValueError:
            raise BadRecord(f"{where} is not valid JSON") from None
        if not isinstance(doc, dict):
            raise BadRecord(f"{where} must hold a JSON object")
        known = set(cls._fields) - {"extra"}
        try:
            record = cls(**{k: v for k, v in doc.items() if k in known},
                         extra={k: v for k, v in doc.items() if k not in known})
        except TypeError as exc:
            raise BadRecord(f"{where} is missing a field: {exc}") from None
        check_sandbox_name(record.name)
        if not isinstance(record.signing_keys, list) or not all(
                isinstance(k, str) for k in record.signing_keys):
            raise BadRecord(f"{where}: signing_keys must be a list of key strings")
        if not isinstance(record.threshold, int) or record.threshold < 1:
            raise BadRecord(f"{where}: threshold must be an integer >= 1")
        return record


def load(paths: HostPaths, name: str) -> SandboxRecord:
    sandbox = paths.sandbox(name)
    try:
        data = sandbox.record.read_bytes()
    except FileNotFoundError:
        raise NotFound(
            f"sandbox {name!r} is not enrolled here (no {sandbox.record}); "
            f"run 'tappass-host init {name} --enroll-url URL' first"
        ) from None
    return SandboxRecord.from_json(data, sandbox.record)


def save(sandbox: SandboxPaths, record: SandboxRecord) -> None:
    check_sandbox_name(record.name)
    sandbox.root.mkdir(parents=True, exist_ok=True)
    statefile.write_atomic(sandbox.record, record.to_json(), 0o644)
