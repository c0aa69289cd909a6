"""Strict JSON parsing and the canonical JSON encoding.

Strict: duplicate object keys, NaN/Infinity (also as a number too large for
a double, `1e999`) and invalid UTF-8 are errors, because two parsers that
disagree on such input could disagree on what was signed.
"""

import json


class StrictJSONError(ValueError):
    pass


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise StrictJSONError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _reject_constant(name: str):
    raise StrictJSONError(f"non-finite number {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    import math

    if not math.isfinite(value):
        raise StrictJSONError("number out of range")
    return value


def loads(data: bytes | str):
    """Parse strict JSON; raises StrictJSONError on anything not strict."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StrictJSONError("not valid UTF-8") from exc
    try:
        return json.loads(
            data, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except StrictJSONError:
        raise
    except (ValueError, RecursionError) as exc:
        raise StrictJSONError("not valid JSON") from exc


def canonical(value) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the encoding hashes and signatures cover."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
