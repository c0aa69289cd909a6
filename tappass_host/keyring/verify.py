"""The trust boundary: every keyring update passes through `verify`.

`verify` applies the acceptance rules of DESIGN §6 in their fixed order
against one `now`, and either returns a `VerifiedKeyring` or raises
`KeyringRejected` carrying the first failed rule's reason code. It reads no
files and writes nothing: the caller decides what to do with the verdict.

The payload is parsed only after its signatures verify (DSSE's rule: never
interpret unauthenticated bytes), so a signed payload that is not strict
JSON is `malformed`, found after `bad_signature` would have been.

Rejection messages name the rule and the field, never a value: a value may
be a secret.
"""

import hashlib
import json
import posixpath
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any

from cryptography.exceptions import InvalidSignature

from tappass_host import domains, signing, strictjson
from tappass_host.clock import parse_timestamp
from tappass_host.errors import TappassError
from tappass_host.keyring import (  # noqa: F401  (KeyringVersion, VerifiedKeyring, Limits: re-exported)
    MAX_ENVELOPE_BYTES,
    PAYLOAD_TYPE,
    KeyringVersion,
    Limits,
    VerifiedKeyring,
    envelope,
    harness_rules,
    image_policy,
)

CLOCK_SKEW = timedelta(seconds=60)
MAX_POLICY_VERSION = 9_999_999_999  # ten digits: the version directory's name

# The reason codes, in the order the rules are checked.
REASONS = (
    "too_large", "malformed", "wrong_type", "bad_signature", "schema",
    "wrong_sandbox", "rollback", "replay", "future", "expired", "invalid",
)


class KeyringRejected(TappassError):
    """An update failed an acceptance rule; `reason` is its code."""

    def __init__(self, reason: str, detail: str, *, policy_version: int | None = None,
                 sha256: str | None = None):
        assert reason in REASONS, reason
        super().__init__(f"keyring rejected ({reason}): {detail}")
        self.reason = reason
        self.detail = detail
        self.policy_version = policy_version
        self.sha256 = sha256


@dataclass(frozen=True)
class Trust:
    """What keyrings for one sandbox are verified against (from sandbox.json)."""

    sandbox_id: str
    keys: dict[str, Any]  # keyid -> Ed25519PublicKey
    threshold: int

    @classmethod
    def from_record(cls, record) -> "Trust":
        keys = {}
        for text in record.signing_keys:
            key = signing.public_key_from_text(text)
            keys[signing.key_id(key)] = key
        return cls(sandbox_id=record.sandbox_id, keys=keys, threshold=record.threshold)


def envelope_sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _is_integer_literal(checker, value) -> bool:
    return type(value) is int


@cache
def _schema_validator():
    """The shipped schema, with `integer` read narrowly: a JSON integer
    literal. JSON Schema counts 99.0 as an integer, but a float is not a
    version or a limit anywhere past this check."""
    import jsonschema

    text = resources.files("tappass_host").joinpath("schemas/keyring.v1.json").read_text()
    schema = json.loads(text)
    base = jsonschema.validators.validator_for(schema)
    base.check_schema(schema)
    strict = jsonschema.validators.extend(
        base, type_checker=base.TYPE_CHECKER.redefine("integer", _is_integer_literal))
    return strict(schema)


def _schema_error(payload: dict) -> str | None:
    error = next(iter(_schema_validator().iter_errors(payload)), None)
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    return f"{where} fails '{error.validator}'"


def _count_valid_signatures(env: envelope.Envelope, trust: Trust) -> int:
    """How many distinct pinned keys made a valid signature.

    A keyid is an unauthenticated hint (DSSE). A signature whose keyid names
    a pinned key is checked against that key only, once per key. One whose
    keyid names none (another scheme's id, upper-case hex, empty) is tried
    against each pinned key not yet counted, for at most `threshold` such
    signatures. An envelope stuffed with signatures thus costs at most
    (1 + threshold) x pinned keys checks.
    """
    message = envelope.pae(env.payload_type, env.payload)
    verified: set[str] = set()
    tried: set[str] = set()
    unhinted = []
    for sig in env.signatures:
        if sig.keyid not in trust.keys:
            unhinted.append(sig)
        elif sig.keyid not in tried:
            tried.add(sig.keyid)
            if _signed_by(trust.keys[sig.keyid], sig, message):
                verified.add(sig.keyid)
    for sig in unhinted[:trust.threshold]:
        if len(verified) >= trust.threshold:
            break
        for keyid, key in trust.keys.items():
            if keyid not in verified and _signed_by(key, sig, message):
                verified.add(keyid)
                break
    return len(verified)


def _signed_by(key, sig: envelope.Signature, message: bytes) -> bool:
    try:
        key.verify(sig.sig, message)
    except InvalidSignature:
        return False
    return True


def _path_problem(path: str) -> str | None:
    if not path.startswith("/"):
        return "is not absolute"
    if "\0" in path:
        return "contains a NUL byte"
    if ".." in path.split("/"):
        return "contains '..'"
    if posixpath.normpath(path) != path or path.startswith("//"):
        return "is not normalized"
    return None


def _semantic_problems(payload: dict, limits: Limits, issued: datetime, expires: datetime):
    if expires <= issued:
        yield "expires_at is not after issued_at"
    fs = payload.get("filesystem", {})
    for key in ("workspace",):
        if key in fs and (problem := _path_problem(fs[key])):
            yield f"filesystem.{key} {problem}"
    for key in ("read_only", "deny_paths"):
        for i, path in enumerate(fs.get(key, [])):
            if problem := _path_problem(path):
                yield f"filesystem.{key}[{i}] {problem}"
    for i, pattern in enumerate(payload.get("network", {}).get("allow_domains", [])):
        try:
            domains.normalize_pattern(pattern)
        except domains.BadDomainPattern:
            yield f"network.allow_domains[{i}] is not a valid domain pattern"
    for key, value in payload.get("process", {}).items():
        if value > getattr(limits, key):
            yield f"process.{key} exceeds this host's maximum of {getattr(limits, key)}"
    for aspect, key in (("gateway", "base_url"), ("mcp", "proxy_url")):
        url = payload.get(aspect, {}).get(key)
        if url is not None and not url.startswith(("https://", "http://")):
            yield f"{aspect}.{key} is not an http(s) URL"
    yield from harness_rules.problems(payload)
    yield from image_policy.problems(payload)


def verify(data: bytes, trust: Trust, current: KeyringVersion | None, now: datetime,
           limits: Limits = Limits()) -> VerifiedKeyring:
    """Check `data` against every acceptance rule, in order; see module doc."""
    digest = envelope_sha256(data) if isinstance(data, bytes) else None
    version_seen: int | None = None

    def reject(reason: str, detail: str):
        return KeyringRejected(reason, detail, policy_version=version_seen, sha256=digest)

    if not isinstance(data, bytes):
        raise KeyringRejected("malformed", "envelope must be bytes")
    if len(data) > MAX_ENVELOPE_BYTES:
        raise reject("too_large", f"envelope is {len(data)} bytes, over the 1 MiB limit")
    try:
        env = envelope.parse(data)
    except envelope.EnvelopeError as exc:
        raise reject("malformed", str(exc)) from None
    if env.payload_type != PAYLOAD_TYPE:
        raise reject("wrong_type", f"payloadType is not {PAYLOAD_TYPE}")
    valid = _count_valid_signatures(env, trust)
    if valid < trust.threshold:
        raise reject("bad_signature", f"{valid} valid signature(s) by pinned keys, "
                                      f"{trust.threshold} required")
    try:
        payload = strictjson.loads(env.payload)
    except strictjson.StrictJSONError as exc:
        raise reject("malformed", f"payload is {exc}") from None
    if not isinstance(payload, dict):
        raise reject("schema", "payload is not a JSON object")
    claimed = payload.get("policy_version")
    if type(claimed) is int and 0 <= claimed <= MAX_POLICY_VERSION:
        version_seen = claimed
    if problem := _schema_error(payload):
        raise reject("schema", problem)
    try:
        issued = parse_timestamp(payload["issued_at"])
        expires = parse_timestamp(payload["expires_at"])
    except ValueError:
        raise reject("schema", "issued_at/expires_at is not an RFC 3339 time "
                               "within years 1-9999 in UTC") from None
    if payload["sandbox_id"] != trust.sandbox_id:
        raise reject("wrong_sandbox", "sandbox_id is not this sandbox's")
    new = KeyringVersion(payload["policy_version"], issued)
    if current is not None:
        if new.policy_version < current.policy_version:
            raise reject("rollback", f"policy_version {new.policy_version} is lower than "
                                     f"the current {current.policy_version}")
        if new.policy_version == current.policy_version and issued <= current.issued_at:
            raise reject("replay", f"policy_version {new.policy_version} was already applied")
    if issued > now + CLOCK_SKEW:
        raise reject("future", "issued_at is more than 60 s in the future")
    if expires <= now:
        raise reject("expired", "expires_at is not after now")
    if problem := next(_semantic_problems(payload, limits, issued, expires), None):
        raise reject("invalid", problem)
    return VerifiedKeyring(payload=payload, payload_bytes=env.payload, envelope_bytes=data,
                           version=new, expires_at=expires, sha256=digest)
