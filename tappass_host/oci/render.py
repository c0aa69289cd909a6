"""Rendering: layer results merged over the template into one OCI config.

Merge rules: objects merge key by key; `process.args` is replaced; every
other list is appended to (mounts, env, namespaces, masked paths…); any
other value is replaced. Each field a layer sets is recorded in the
provenance map (field path -> layer), which `inspect` shows and the
invariants use to name the layer that broke one. Environment entries are
deduplicated by name and namespaces by type, the last layer winning.
"""

import copy
from typing import NamedTuple

from tappass_host import shipped
from tappass_host.layers import LayerResult
from tappass_host.layers.files import version_files
from tappass_host.oci import field_path

REPLACED_LISTS = {"process.args"}


class Rendered(NamedTuple):
    config: dict
    provenance: dict[str, str]
    files: dict[str, bytes]   # every layer's, by path in the keyring version directory
    warnings: tuple[str, ...]
    hot_reload: frozenset[str]
    restart: frozenset[str]
    unavailable: tuple[tuple[str, str], ...] = ()   # (layer, feature) missing on this host


def _merge(base: dict, fragment: dict, layer: str, path: tuple, provenance: dict) -> None:
    for key, value in fragment.items():
        here = (*path, key)
        name = field_path(here)
        current = base.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            _merge(current, value, layer, here, provenance)
        elif isinstance(value, list) and isinstance(current, list) and name not in REPLACED_LISTS:
            start = len(current)
            current.extend(copy.deepcopy(value))
            for i in range(start, len(current)):
                provenance[field_path((*here, i))] = layer
        else:
            base[key] = copy.deepcopy(value)
            provenance[name] = layer


def _dedupe_env(config: dict, provenance: dict[str, str]) -> None:
    """One entry per name, in first-seen order, holding the last value; the
    provenance of each kept entry is the layer that set that value."""
    env = config.get("process", {}).get("env", [])
    last: dict[str, tuple[str, str | None]] = {}
    for i, entry in enumerate(env):
        last[entry.split("=", 1)[0]] = (entry, provenance.pop(field_path(("process", "env", i)),
                                                              None))
    config["process"]["env"] = [entry for entry, _ in last.values()]
    for i, (_, layer) in enumerate(last.values()):
        if layer is not None:
            provenance[field_path(("process", "env", i))] = layer


def _dedupe_namespaces(config: dict, provenance: dict[str, str]) -> None:
    """One namespace entry per type, the last layer's winning: a layer that joins
    a namespace by path (network mode proxy) replaces the template's new one."""
    namespaces = config.get("linux", {}).get("namespaces")
    if not isinstance(namespaces, list):
        return
    last: dict[object, tuple[object, str | None]] = {}
    for i, entry in enumerate(namespaces):
        kind = entry.get("type") if isinstance(entry, dict) else id(entry)
        last.pop(kind, None)
        last[kind] = (entry, provenance.pop(field_path(("linux", "namespaces", i)), None))
    config["linux"]["namespaces"] = [entry for entry, _ in last.values()]
    for i, (_, layer) in enumerate(last.values()):
        if layer is not None:
            provenance[field_path(("linux", "namespaces", i))] = layer


def render(results: list[tuple[str, LayerResult]], template: str = "base.json") -> Rendered:
    config = shipped.load_json(shipped.template(template))
    provenance: dict[str, str] = {}
    for layer, result in results:
        _merge(config, result.oci, layer, (), provenance)
    _dedupe_env(config, provenance)
    _dedupe_namespaces(config, provenance)
    return Rendered(
        config=config,
        provenance=provenance,
        files=version_files(results),
        warnings=tuple(w for _, r in results for w in r.warnings),
        hot_reload=frozenset().union(*(r.hot_reload for _, r in results)),
        restart=frozenset().union(*(r.restart for _, r in results)),
        unavailable=tuple((layer, f) for layer, r in results for f in r.unavailable),
    )
