"""Building a sandbox's OCI bundle: appliers → render → invariants → schema
→ `<runtime>/<name>/bundle/`. A config that fails a check is never written
where a runtime could pick it up."""

import json
import platform
from dataclasses import dataclass
from pathlib import Path

from tappass_host import layers, statefile
from tappass_host.oci import invariants, rootfs
from tappass_host.oci.render import Rendered, render
from tappass_host.paths import HostPaths


@dataclass(frozen=True)
class Bundle:
    directory: Path
    rendered: Rendered

    @property
    def config(self) -> dict:
        return self.rendered.config


def layer_inputs(paths: HostPaths, name: str, record, keyring: dict, manifest, config,
                 host: layers.Host) -> layers.LayerInputs:
    sandbox = paths.sandbox(name)
    return layers.LayerInputs(
        name=name, record=record, keyring=keyring, manifest=manifest, host=host,
        keyring_dir=sandbox.keyring, workspace_dir=sandbox.workspace,
        rootfs_dir=sandbox.bundle / "rootfs", config=config,
    )


def host_capabilities(record, rootless: bool) -> layers.Host:
    return layers.Host(rootless=rootless, agent_uid=record.agent_uid, agent_gid=record.agent_gid,
                       machine=platform.machine())


def build(paths: HostPaths, inputs: layers.LayerInputs, rootless: bool) -> Bundle:
    rendered = render(layers.run(inputs, inputs.config["appliers"]))
    sandbox = paths.sandbox(inputs.name)
    invariants.check(rendered.config, state_dir=paths.state, keyring_dir=sandbox.keyring,
                     workspace_dir=sandbox.workspace, rootless=rootless,
                     provenance=rendered.provenance)
    schema_dir = inputs.config["oci_schema_dir"]
    if schema_dir:
        from tappass_host.oci import schema

        schema.validate(rendered.config, schema_dir)
    directory = sandbox.bundle
    directory.mkdir(parents=True, exist_ok=True)
    rootfs.prepare(inputs.rootfs_dir, [m["destination"] for m in rendered.config["mounts"]])
    statefile.write_atomic(directory / "config.json",
                           json.dumps(rendered.config, indent=2).encode(), 0o600)
    statefile.write_atomic(directory / "layers.json", json.dumps({
        "provenance": rendered.provenance, "warnings": list(rendered.warnings),
        "hot_reload": sorted(rendered.hot_reload), "restart": sorted(rendered.restart),
    }, indent=2).encode(), 0o600)
    return Bundle(directory=directory, rendered=rendered)
