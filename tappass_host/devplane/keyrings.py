"""Turning a policy file into signed keyrings, and publishing them.

A policy file (JSON, or TOML when it ends in `.toml`) holds the keyring's
aspects. Publishing fills in what the control plane owns — `schema`,
`sandbox_id`, the next `policy_version`, `issued_at`, `expires_at` — unless
the file already sets it (tests use that to publish rollbacks, replays and
expired keyrings), signs the payload as a DSSE envelope, stores it as the
latest, and asks a running `serve` to push it to open event streams.
"""

import time
import tomllib
from pathlib import Path

from tappass_host import strictjson
from tappass_host.devplane.state import DevplaneError, DevplaneState, Published, utc_text
from tappass_host.identity.tls import pinned_context
from tappass_host.keyring import envelope

SCHEMA = "tappass.keyring/v1"
DEFAULT_TTL_S = 3600


def load_policy(path: Path) -> dict:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DevplaneError(f"cannot read {path}: {exc.strerror}") from None
    try:
        policy = tomllib.loads(data.decode("utf-8")) if path.suffix == ".toml" \
            else strictjson.loads(data)
    except (tomllib.TOMLDecodeError, strictjson.StrictJSONError, UnicodeError) as exc:
        raise DevplaneError(f"{path} is not a valid policy file: {exc}") from None
    if not isinstance(policy, dict):
        raise DevplaneError(f"{path} must hold an object of keyring aspects")
    return policy


def build_payload(policy: dict, sandbox_id: str, policy_version: int, *, ttl: int = DEFAULT_TTL_S,
                  now: float | None = None) -> dict:
    now = time.time() if now is None else now
    payload = dict(policy)
    payload.setdefault("schema", SCHEMA)
    payload.setdefault("sandbox_id", sandbox_id)
    payload.setdefault("policy_version", policy_version)
    payload.setdefault("issued_at", utc_text(now))
    payload.setdefault("expires_at", utc_text(now + ttl))
    return payload


def sign(state: DevplaneState, payload: dict) -> bytes:
    return envelope.sign(strictjson.canonical(payload), [state.signing_key])


def resolve(state: DevplaneState, name: str) -> list[dict]:
    found = state.find_sandboxes(name)
    if not found:
        raise DevplaneError(f"no sandbox named {name!r} has enrolled with this devplane")
    return found


def publish(state: DevplaneState, name: str, policy: dict, *, ttl: int = DEFAULT_TTL_S,
            now: float | None = None) -> list[tuple[dict, Published]]:
    """Sign and publish `policy` as the next keyring of every sandbox named `name`."""
    done = []
    with state.publishing():
        for record in resolve(state, name):
            sandbox_id = record["sandbox_id"]
            payload = build_payload(policy, sandbox_id, state.next_policy_version(sandbox_id),
                                    ttl=ttl, now=now)
            done.append((record, state.publish(sandbox_id, sign(state, payload),
                                               payload["policy_version"])))
    return done


def publish_raw(state: DevplaneState, name: str, data: bytes,
                policy_version: int | None = None) -> list[tuple[dict, Published]]:
    """Test hook for a misbehaving control plane: push `data` exactly as given.

    The SSE id is `policy_version`, or else what the payload says if it can be
    read, or else 0.
    """
    try:
        data.decode("utf-8")
    except UnicodeError:
        raise DevplaneError("a raw envelope must be UTF-8 text: SSE cannot carry it") from None
    if policy_version is None:
        policy_version = _claimed_version(data)
    return [(record, state.publish(record["sandbox_id"], data, policy_version))
            for record in resolve(state, name)]


def _claimed_version(data: bytes) -> int:
    try:
        payload = strictjson.loads(envelope.parse(data).payload)
        version = payload["policy_version"]
        return version if type(version) is int else 0
    except (envelope.EnvelopeError, strictjson.StrictJSONError, TypeError, KeyError):
        return 0


def notify(state: DevplaneState, timeout: float = 5.0) -> bool:
    """Ask the running `serve` to re-read its keyrings now; False if none answers."""
    import httpx

    if not state.url:
        return False
    try:
        with httpx.Client(verify=pinned_context(state.ca.pem), timeout=timeout) as client:
            return client.post(state.url + "/v1/admin/rescan").status_code == 204
    except httpx.HTTPError:
        return False
