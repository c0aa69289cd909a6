"""Building a sandbox's OCI bundle: appliers → render → invariants → schema
→ `<runtime>/<name>/bundle/`. A config that fails a check is never written
where a runtime could pick it up."""

import json

from tappass_host import landlock, layers, shipped, systemd
from tappass_host.errors import TappassError
from tappass_host.layers import files as layer_files
from tappass_host.oci import bundle_cache, field_path, invariants, parent_field
from tappass_host.oci.render import render
from tappass_host.paths import HostPaths
from tappass_host.statefile import prune_oldest


def layer_inputs(paths: HostPaths, name: str, record, keyring: dict, manifest, config,
                 host: layers.Host) -> layers.LayerInputs:
    sandbox = paths.sandbox(name)
    return layers.LayerInputs(
        name=name, record=record, keyring=keyring, manifest=manifest, host=host,
        keyring_dir=sandbox.keyring, workspace_dir=sandbox.workspace,
        rootfs_dir=sandbox.rootfs, config=config,
    )


def build(paths: HostPaths, inputs: layers.LayerInputs,
          rootless: bool) -> bundle_cache.Prepared:
    """Render and check the bundle, and install it; what a later start of the
    same inputs reuses."""
    rendered = render(layers.run(inputs, inputs.config["appliers"]))
    sandbox = paths.sandbox(inputs.name)
    facts = bundle_cache.facts_of(rendered.config, inputs.keyring, paths.state, sandbox.keyring,
                                  sandbox.workspace)  # what the invariants look at, first
    try:
        agent_env = _separate_env(rendered.config, rendered.provenance)
        invariants.check(rendered.config, state_dir=paths.state, keyring_dir=sandbox.keyring,
                         workspace_dir=sandbox.workspace, rootless=rootless,
                         provenance=rendered.provenance, host=inputs.host, rootfs=inputs.rootfs_dir,
                         landlock=landlock.missing(inputs.host.landlock_abi) is None)
    except invariants.InvariantViolation as violation:
        raise _blame(violation, rendered.provenance) from None
    if systemd.manages_cgroups():  # tappass-host's own placement; a layer's is refused above
        rendered.config.setdefault("linux", {})["cgroupsPath"] = systemd.cgroups_path(inputs.name)
    config_bytes = json.dumps(rendered.config, indent=2).encode()
    schema_dir = inputs.config["oci_schema_dir"]
    if schema_dir:
        _validate_schema(paths, rendered.config, config_bytes, schema_dir, rendered.provenance)
    prepared = bundle_cache.Prepared(
        config=config_bytes,
        layers=json.dumps({
            "provenance": rendered.provenance, "warnings": list(rendered.warnings),
            "hot_reload": sorted(rendered.hot_reload), "restart": sorted(rendered.restart),
            **({"agent_env": agent_env} if agent_env is not None else {}),
        }, indent=2).encode(),
        inputs=layer_files.record_inputs(inputs, inputs.config["appliers"]),
        agent_env=agent_env, mounts=[m["destination"] for m in rendered.config["mounts"]],
        files=rendered.files, warnings=rendered.warnings, restart=rendered.restart,
        unavailable=rendered.unavailable, facts=facts)
    layer_files.complete_at_start(paths, inputs, inputs.config["appliers"], rendered.files)
    bundle_cache.install(paths, inputs.name, inputs.record, prepared)
    return prepared


def _separate_env(config: dict, provenance: dict[str, str]) -> list[str] | None:
    """With the launcher in process.args, take the agent's environment out of
    process.env (leaving LAUNCHER_ENV) and return it, for AGENT_ENV; its
    provenance moves from `process.env[i]` to `agent_env[i]`. None: no
    launcher (no ruleset to get ahead of), process.env is the agent's."""
    process = config.get("process")
    if not isinstance(process, dict) or not landlock.launch_prefix(process.get("args") or []):
        return None
    env = process.get("env") or []
    for i, entry in enumerate(env):
        if not _well_formed_env_entry(entry):
            where = field_path(("process", "env", i))
            raise invariants.InvariantViolation(where, provenance.get(where, "template"),
                                                "must be NAME=VALUE in UTF-8 without NUL bytes")
    process["env"] = list(landlock.LAUNCHER_ENV)
    for i in range(len(env)):
        layer = provenance.pop(field_path(("process", "env", i)), None)
        if layer is not None:
            provenance[f"agent_env[{i}]"] = layer
    return list(env)


def _well_formed_env_entry(entry) -> bool:
    if not isinstance(entry, str) or "\0" in entry or "=" not in entry[1:]:
        return False
    try:
        entry.encode()
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def _blame(violation: "invariants.InvariantViolation", provenance: dict[str, str]):
    """A violation in a list the template left empty (a capability set...) is the
    doing of the layer that put items there, though no layer set the list itself."""
    if violation.layer != "template" or "[" in violation.field or not violation.field:
        return violation
    node = shipped.load_json(shipped.template())
    for part in violation.field.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node not in (None, []):
        return violation
    culprit = next((layer for path, layer in provenance.items()
                    if path.startswith(violation.field + "[")
                    or path.startswith(violation.field + ".")), None)
    if culprit is None:
        return violation
    rule = str(violation).split(f"invariant: {violation.field} ", 1)[-1]
    return invariants.InvariantViolation(violation.field, culprit, rule)


# The schema check costs ~80 ms a start (importing jsonschema and walking the
# spec's files) and its verdict depends only on the config's bytes and the
# schema's files: a config that passed once is remembered by its digest (in
# the runtime dir, root's, cleared at boot). The invariants are checked in
# code on every start regardless.
SCHEMA_CACHE_ENTRIES = 256


class LayerSchemaError(TappassError):
    """The rendered config fails the OCI runtime-spec schema; names the layer."""

    def __init__(self, field: str, layer: str, message: str):
        self.field, self.layer = field, layer
        super().__init__(f"layer {layer!r}: {message}")


def _layer_of(field: str, provenance: dict[str, str]) -> str:
    while field:
        if field in provenance:
            return provenance[field]
        field = parent_field(field)
    return "template"


def _validate_schema(paths: HostPaths, config: dict, config_bytes: bytes, schema_dir: str,
                     provenance: dict[str, str]) -> None:
    import hashlib

    from tappass_host import __version__

    key = hashlib.sha256(b"\0".join([__version__.encode(),
                                     bundle_cache.schema_fingerprint(schema_dir).encode(),
                                     config_bytes])).hexdigest()
    cache = paths.schema_ok
    if (cache / key).is_file():
        return
    from tappass_host.oci import schema

    try:
        schema.validate(config, schema_dir)
    except schema.BundleSchemaError as error:
        raise LayerSchemaError(error.field, _layer_of(error.field, provenance), str(error)) from None
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        (cache / key).touch()
        prune_oldest(cache, SCHEMA_CACHE_ENTRIES)
    except OSError:
        pass  # a cache, nothing more
