"""The TOML documents `start` reads (the agent's manifest, the host's config
file), parsed once (issue 13): importing tomllib (its regular expressions) and
parsing were ~40M instructions, a sixth of a `start --foreground --rm`.

A document's parse is kept in a private cache (tappass_host.private_cache)
under the SHA-256 of its bytes and the Python version: the same bytes are
never parsed twice, and other bytes, one byte changed, have another name, so
nothing goes stale and no timestamp is trusted. Only a document whose values
JSON holds exactly (strings, integers, finite floats, booleans, tables,
arrays) is kept; one with a date or a time is parsed every time. What a
document means is checked by its reader on every load, kept or not.

Errors are tomllib's: UnicodeDecodeError for bytes that are not UTF-8, else
ValueError (tomllib.TOMLDecodeError) for text that is not TOML, so that a
caller catches them without importing tomllib.
"""

import hashlib
import json
import sys

from tappass_host.paths import HostPaths
from tappass_host.private_cache import PrivateCache

MAX_ENTRIES = 64
_SALT = b"toml %d.%d\0" % sys.version_info[:2]


def parse(data: bytes, paths: HostPaths | None = None) -> dict:
    """The document `data`; `paths`: whose cache its parse is kept in."""
    text = data.decode("utf-8")
    if paths is None:
        return _parse(text)
    store = PrivateCache(paths.toml_cache, MAX_ENTRIES)
    name = paths.toml_cache_entry(hashlib.sha256(_SALT + data).hexdigest()).name
    kept = store.read(name)
    if kept is not None:
        try:
            doc = json.loads(kept)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            return doc
    doc = _parse(text)
    if (encoded := _json_of(doc)) is not None:
        store.write(name, encoded)
    return doc


def _parse(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


def _json_of(doc: dict) -> bytes | None:
    """`doc` as JSON, if JSON gives it back exactly; else None."""
    try:
        encoded = json.dumps(doc, allow_nan=False, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):  # a date or time; nan or inf
        return None
    return encoded.encode() if json.loads(encoded) == doc else None
