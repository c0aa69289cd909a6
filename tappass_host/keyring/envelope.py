"""DSSE envelopes: parsing, the pre-authentication encoding, and signing.

Parsing only decodes; it never interprets the payload. Signatures are over
PAE(payloadType, payload), never over the envelope's JSON text.
"""

import base64
import binascii
import json
from dataclasses import dataclass

from tappass_host import signing, strictjson
from tappass_host.keyring import PAYLOAD_TYPE


class EnvelopeError(ValueError):
    """The envelope is not a well-formed DSSE envelope."""


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]


def pae(payload_type: str, payload: bytes) -> bytes:
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


def _b64decode(text: object, what: str) -> bytes:
    """DSSE allows the standard or the URL-safe alphabet, padded or not."""
    if not isinstance(text, str):
        raise EnvelopeError(f"{what} must be a base64 string")
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError(f"{what} is not valid base64") from None


def parse(data: bytes) -> Envelope:
    try:
        doc = strictjson.loads(data)
    except strictjson.StrictJSONError as exc:
        raise EnvelopeError(f"envelope is {exc}") from None
    if not isinstance(doc, dict):
        raise EnvelopeError("envelope must be a JSON object")
    payload_type = doc.get("payloadType")
    if not isinstance(payload_type, str):
        raise EnvelopeError("envelope has no payloadType string")
    payload = _b64decode(doc.get("payload"), "payload")
    raw_sigs = doc.get("signatures")
    if not isinstance(raw_sigs, list):
        raise EnvelopeError("envelope has no signatures list")
    signatures = []
    for entry in raw_sigs:
        if not isinstance(entry, dict):
            raise EnvelopeError("each signature must be an object")
        keyid = entry.get("keyid", "")
        if not isinstance(keyid, str):
            raise EnvelopeError("signature keyid must be a string")
        signatures.append(Signature(keyid=keyid, sig=_b64decode(entry.get("sig"), "signature")))
    return Envelope(payload_type=payload_type, payload=payload, signatures=tuple(signatures))


def sign(payload: bytes, private_keys, payload_type: str | None = None) -> bytes:
    """Return the JSON envelope for `payload`, signed by each Ed25519 key."""
    payload_type = payload_type or PAYLOAD_TYPE
    message = pae(payload_type, payload)
    doc = {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [
            {
                "keyid": signing.key_id(key.public_key()),
                "sig": base64.b64encode(key.sign(message)).decode("ascii"),
            }
            for key in private_keys
        ],
    }
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")
