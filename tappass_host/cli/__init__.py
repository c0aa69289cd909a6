"""The `tappass-host` command line: parses arguments and prints results.

Subcommands live in sibling modules and are imported only when invoked, so
`tappass-host status` never pays for httpx, jsonschema or cryptography.
"""

import importlib
import json
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import click

from tappass_host.errors import TappassError

# name -> (module, attribute, one-line help shown by --help without importing)
_COMMANDS = {
    "audit": ("tappass_host.cli.audit", "audit", "Verify or print the tamper-evident audit log."),
    "init": ("tappass_host.cli.enroll", "init", "Enroll a sandbox from a one-time bootstrap URL."),
    "daemon": ("tappass_host.cli.daemon", "daemon", "Receive signed keyring updates for every enrolled sandbox."),
    "sync": ("tappass_host.cli.sync", "sync", "Apply signed keyrings (air-gapped hosts)."),
    "egress": ("tappass_host.cli.egress", "egress", "Run the egress proxy (network mode 'proxy') in the foreground."),
    "start": ("tappass_host.cli.sandbox", "start", "Start a sandbox's agent."),
    "stop": ("tappass_host.cli.sandbox", "stop", "Stop a sandbox's agent."),
    "status": ("tappass_host.cli.sandbox", "status", "Show sandboxes and their state."),
    "inspect": ("tappass_host.cli.sandbox", "inspect", "Show a sandbox's OCI config and layers."),
    "logs": ("tappass_host.cli.sandbox", "logs", "Print a sandbox agent's output."),
    "shell": ("tappass_host.cli.sandbox", "shell", "Run a command inside a sandbox, as the agent."),
    "systemd": ("tappass_host.cli.units", "systemd", "Print or install the shipped systemd units."),
    "_exited": ("tappass_host.cli.sandbox", "exited", ""),
}


@dataclass
class Host:
    """What every subcommand gets: where state lives, config, output mode."""

    state_dir: str | None
    config_file: Path | None
    json: bool
    verbose: bool
    _config: object = field(default=None, repr=False)

    @cached_property
    def paths(self):
        from tappass_host.paths import HostPaths

        return HostPaths.resolve(self.state_dir)

    @cached_property
    def config(self):
        from tappass_host import config
        from tappass_host.paths import default_config_file

        if self.config_file is not None:
            return config.load(self.config_file, required=True)
        return config.load(default_config_file())

    def emit(self, data, text: str | None = None) -> None:
        """Print `data` as JSON under --json, else `text` (or nothing)."""
        if self.json:
            click.echo(json.dumps(data, indent=2, sort_keys=True))
        elif text is not None:
            click.echo(text)


pass_host = click.make_pass_decorator(Host)


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(_COMMANDS) | set(self.commands))

    def get_command(self, ctx, name):
        if name in self.commands:
            return self.commands[name]
        if name not in _COMMANDS:
            return None
        module, attr, _ = _COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, _COMMANDS[name][2]) for name in sorted(_COMMANDS) if _COMMANDS[name][2]]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--state-dir", envvar="TAPPASS_HOST_STATE_DIR", metavar="DIR",
              help="State root (default /var/lib/tappass-host, or XDG state when rootless).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE", help="Config file (default /etc/tappass-host/config.toml).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks and debug output.")
@click.version_option(package_name="tappass-host")
@click.pass_context
def cli(ctx, state_dir, config_file, as_json, verbose):
    """tappass-host runs AI agents in locked-down sandboxes under signed policy.

    It enrolls sandboxes with the TapPass control plane, starts agents under
    crun or runc, and swaps their keyring (policy) atomically while they run.
    """
    ctx.obj = Host(state_dir=state_dir, config_file=config_file, json=as_json, verbose=verbose)


def run(group: click.Group, prog: str, argv=None) -> None:
    """Run a click group the way every tappass command line behaves: errors
    are one line on stderr with a non-zero exit; -v shows the traceback."""
    args = sys.argv[1:] if argv is None else argv
    verbose = "-v" in args or "--verbose" in args
    try:
        group.main(args=argv, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo(f"{prog}: aborted", err=True)
        sys.exit(130)
    except TappassError as exc:
        if verbose:
            raise
        click.echo(f"{prog}: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if verbose:
            raise
        click.echo(f"{prog}: internal error: {type(exc).__name__}: {exc} "
                   "(run with -v for details)", err=True)
        sys.exit(70)


def main(argv=None) -> None:
    run(cli, "tappass-host", argv)
