"""Builders for real signed keyrings and enrolled sandboxes, for tests."""

import json
from datetime import datetime, timedelta, timezone

from tappass_host import sandbox_record
from tappass_host import signing
from tappass_host.keyring import envelope

SANDBOX_ID = "sbx_test01"


def stamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def policy(version: int = 1, *, now: datetime | None = None, ttl: int = 300,
           issued_offset: int = 0, **aspects) -> dict:
    now = now or datetime.now(timezone.utc)
    issued = now + timedelta(seconds=issued_offset)
    doc = {
        "schema": "tappass.keyring/v1",
        "sandbox_id": SANDBOX_ID,
        "policy_version": version,
        "issued_at": stamp(issued),
        "expires_at": stamp(issued + timedelta(seconds=ttl)),
        "process": {"memory_mb": 256, "pids_max": 64, "cpu_millis": 500},
        "network": {"mode": "none", "allow_domains": ["api.tappass.ai", "*.tappass.ai"]},
        "secrets": {"OPENAI_API_KEY": "sk-test-SECRET-must-never-leak-4242"},
    }
    doc.update(aspects)
    return doc


def sign(doc, *keys, payload_type=None) -> bytes:
    payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return envelope.sign(payload, list(keys), payload_type=payload_type)


def enroll(paths, name: str, keys, threshold: int = 1, sandbox_id: str = SANDBOX_ID):
    record = sandbox_record.SandboxRecord(
        name=name, sandbox_id=sandbox_id, org_id="org_test",
        spiffe_id=f"spiffe://tappass.test/org/org_test/sandbox/{sandbox_id}",
        sync_url="https://127.0.0.1:1", threshold=threshold,
        signing_keys=[signing.public_key_to_text(k.public_key()) for k in keys],
        created_at=stamp(datetime.now(timezone.utc)),
    )
    sandbox_record.save(paths.sandbox(name), record)
    return record
