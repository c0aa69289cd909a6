"""`inspect`, `shell`, and the click commands of the hot ones
(tappass_host.cli.lifecycle, which declares them)."""

import json
import sys

import click

from tappass_host.cli import lifecycle, pass_host
from tappass_host.cli.plain import click_command

start, stop, status, logs, exited = (click_command(lifecycle.COMMANDS[name], pass_host)
                                     for name in ("start", "stop", "status", "logs", "_exited"))


@click.command()
@click.argument("name")
@pass_host
def inspect(host, name):
    """Print NAME's rendered OCI config, which layer set which field, and its keyring version."""
    from tappass_host.errors import NotFound
    from tappass_host.keyring.store import store_of
    from tappass_host.runtime.runstate import ensure_known, read_json, state_file

    sandbox = ensure_known(host.paths, name)
    config = read_json(sandbox.bundle_config)
    if config is None:
        raise NotFound(f"sandbox {name!r} has no rendered bundle yet: start it first")
    layers = read_json(sandbox.bundle_layers) or {}
    keyring = store_of(sandbox).read_current() or {}
    image = (read_json(state_file(sandbox)) or {}).get("image")
    click.echo(json.dumps({"name": name, "keyring_version": keyring.get("policy_version"),
                           "image": image, "config": config, **layers}, indent=2,
                          sort_keys=True))


@click.command(context_settings={"ignore_unknown_options": True,
                                 "allow_interspersed_args": False})
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@pass_host
def shell(host, name, command):
    """Run CMD (default /bin/sh) inside NAME's sandbox, as the agent, under the same restrictions."""
    from tappass_host.runtime.shell import shell as run_shell

    command = list(command)
    if command[:1] == ["--"]:  # `shell NAME -- CMD …`: everything after the name is CMD's
        command = command[1:]
    sys.exit(run_shell(host.paths, name, command or ["/bin/sh"]))
