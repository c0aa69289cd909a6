"""The `tappass-host` command line: parses arguments and prints results.

Subcommands live in sibling modules and are imported only when invoked, so
`tappass-host status` never pays for httpx, jsonschema or cryptography.
"""

import errno
import importlib
import json
import sys
from functools import cached_property
from pathlib import Path

import click

from tappass_host.errors import ConfigError, TappassError

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
    "image": ("tappass_host.cli.image", "image", "Import, list and remove agent images."),
    "_exited": ("tappass_host.cli.sandbox", "exited", ""),
}


class Host:
    """What every subcommand gets: where state lives, config, output mode.
    The common options set its attributes as click parses them."""

    def __init__(self, state_dir: str | None = None, config_file: Path | None = None,
                 json: bool = False, verbose: bool = False):
        self.state_dir, self.config_file, self.json, self.verbose = (
            state_dir, config_file, json, verbose)

    @cached_property
    def paths(self):
        from tappass_host.paths import HostPaths

        paths = HostPaths.resolve(self.state_dir)
        existing = paths.state
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"state directory {paths.state} is not a directory "
                              f"({existing} is a file)" if existing != paths.state else
                              f"state directory {paths.state} is not a directory")
        from tappass_host import userns  # rootless: into the user's own namespace

        userns.enter(paths)
        return paths

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


def _set_host(ctx, param, value):
    if value is not None and value is not False:  # given (a flag left off is False)
        setattr(ctx.ensure_object(Host), param.name, value)


def _common_options(envvar: bool) -> list[click.Option]:
    """The options every command takes, before or after its name (`inspect NAME --json`);
    each sets the one Host of the invocation."""
    common = {"expose_value": False, "callback": _set_host}
    return [
        click.Option(["--state-dir", "state_dir"], metavar="DIR", **common,
                     envvar="TAPPASS_HOST_STATE_DIR" if envvar else None,
                     help="State root (default /var/lib/tappass-host, or XDG state when "
                          "rootless)."),
        click.Option(["--config", "config_file"], metavar="FILE", **common,
                     type=click.Path(dir_okay=False, path_type=Path),
                     help="Config file (default /etc/tappass-host/config.toml)."),
        click.Option(["--json", "json"], is_flag=True, **common,
                     help="Print machine-readable JSON."),
        click.Option(["-v", "--verbose", "verbose"], is_flag=True, **common,
                     help="Show tracebacks and debug output."),
    ]


def _with_common_options(command: click.Command) -> click.Command:
    if not getattr(command, "_tappass_common", False):
        command.params.extend(_common_options(envvar=False))
        command._tappass_common = True
        for sub in getattr(command, "commands", {}).values():
            _with_common_options(sub)
    return command


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(_COMMANDS) | set(self.commands))

    def get_command(self, ctx, name):
        if name in self.commands:
            return self.commands[name]
        if name not in _COMMANDS:
            return None
        module, attr, _ = _COMMANDS[name]
        return _with_common_options(getattr(importlib.import_module(module), attr))

    def format_commands(self, ctx, formatter):
        rows = [(name, _COMMANDS[name][2]) for name in sorted(_COMMANDS) if _COMMANDS[name][2]]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]},
             params=_common_options(envvar=True))
@click.version_option(package_name="tappass-host")
@click.pass_context
def cli(ctx):
    """tappass-host runs AI agents in locked-down sandboxes under signed policy.

    It enrolls sandboxes with the TapPass control plane, starts agents under
    crun or runc, and swaps their keyring (policy) atomically while they run.
    """
    ctx.ensure_object(Host)


_FULL = (errno.ENOSPC, errno.EDQUOT)


def run(group: click.Group, prog: str, argv=None, host: Host | None = None) -> None:
    """Run a click group the way every tappass command line behaves: errors
    are one line on stderr with a non-zero exit; -v shows the traceback."""
    args = sys.argv[1:] if argv is None else argv

    def verbose() -> bool:  # the host's own -v, wherever it was given; else any -v
        return host.verbose if host else "-v" in args or "--verbose" in args

    try:
        group.main(args=argv, prog_name=prog, standalone_mode=False, obj=host)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo(f"{prog}: aborted", err=True)
        sys.exit(130)
    except TappassError as exc:
        if verbose():
            raise
        click.echo(f"{prog}: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if verbose():
            raise
        if isinstance(exc, OSError) and exc.errno in _FULL:
            where = exc.filename or (host and host.__dict__.get("paths") and host.paths.state)
            click.echo(f"{prog}: error: no space left on the device"
                       + (f" of {where}" if where else "") + ": free some space and try again",
                       err=True)
            sys.exit(1)
        click.echo(f"{prog}: internal error: {type(exc).__name__}: {exc} "
                   "(run with -v for details)", err=True)
        sys.exit(70)


def main(argv=None) -> None:
    run(cli, "tappass-host", argv, Host())
