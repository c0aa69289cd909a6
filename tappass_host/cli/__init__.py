"""The `tappass-host` command line: parses arguments and prints results.

Subcommands live in sibling modules and are imported only when invoked, so
`tappass-host status` never pays for httpx, jsonschema or cryptography. The
hot commands' common forms are read without click (tappass_host.cli.plain);
everything else goes to the click group, built when it is needed.
"""

import errno
import json
import os
import sys
from functools import cached_property
from pathlib import Path

from tappass_host.cli.plain import Option, click_options, echo, parse, parse_options
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


# The options every command takes, before or after its name (`inspect NAME --json`);
# each sets an attribute of the one Host of the invocation.
COMMON = (
    Option(("--state-dir",), "state_dir", metavar="DIR",
           help="State root (default /var/lib/tappass-host, or XDG state when rootless)."),
    Option(("--config",), "config_file", kind=Path, metavar="FILE",
           help="Config file (default /etc/tappass-host/config.toml)."),
    Option(("--json",), "json", kind=None, help="Print machine-readable JSON."),
    Option(("-v", "--verbose"), "verbose", kind=None, help="Show tracebacks and debug output."),
)
STATE_DIR_ENV = "TAPPASS_HOST_STATE_DIR"  # --state-dir before the command's name


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

        # its parse kept in the state directory once the command has resolved it (start)
        paths = self.paths if "paths" in vars(self) else None
        if self.config_file is not None:
            return config.load(self.config_file, required=True, paths=paths)
        return config.load(default_config_file(), paths=paths)

    def emit(self, data, text: str | None = None) -> None:
        """Print `data` as JSON under --json, else `text` (or nothing)."""
        if self.json:
            echo(json.dumps(data, indent=2, sort_keys=True))
        elif text is not None:
            echo(text)


def __getattr__(name: str):  # the click side, built for what goes through click
    if name == "pass_host":
        import click

        globals()[name] = click.make_pass_decorator(Host)
    elif name == "cli":
        globals()[name] = _click_group()
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return globals()[name]


def _set_host(ctx, param, value):
    if value is not None and value is not False:  # given (a flag left off is False)
        setattr(ctx.ensure_object(Host), param.name, value)


def _common_options(envvar: bool) -> list:
    options = click_options(COMMON, expose_value=False, callback=_set_host)
    if envvar:
        next(o for o in options if o.name == "state_dir").envvar = STATE_DIR_ENV
    return options


def _with_common_options(command):
    if not getattr(command, "_tappass_common", False):
        command.params.extend(_common_options(envvar=False))
        command._tappass_common = True
        for sub in getattr(command, "commands", {}).values():
            _with_common_options(sub)
    return command


def _click_group():
    import click

    class LazyGroup(click.Group):
        def list_commands(self, ctx):
            return sorted(set(_COMMANDS) | set(self.commands))

        def get_command(self, ctx, name):
            if name in self.commands:
                return self.commands[name]
            if name not in _COMMANDS:
                return None
            import importlib  # not on the hot commands' plain path (issue 13)

            module, attr, _ = _COMMANDS[name]
            return _with_common_options(getattr(importlib.import_module(module), attr))

        def format_commands(self, ctx, formatter):
            rows = [(name, _COMMANDS[name][2]) for name in sorted(_COMMANDS) if _COMMANDS[name][2]]
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    @click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]},
                 params=_common_options(envvar=True))
    @click.version_option(package_name="tappass-host")
    @click.pass_context
    def cli(ctx):
        """tappass-host runs AI agents in locked-down sandboxes under signed policy.

        It enrolls sandboxes with the TapPass control plane, starts agents under
        crun or runc, and swaps their keyring (policy) atomically while they run.
        """
        ctx.ensure_object(Host)

    return cli


_FULL = (errno.ENOSPC, errno.EDQUOT)


def run(group, prog: str, argv=None, host: Host | None = None) -> None:
    """Run a click group the way every tappass command line behaves: errors
    are one line on stderr with a non-zero exit; -v shows the traceback."""
    guarded(lambda: group.main(args=argv, prog_name=prog, standalone_mode=False, obj=host),
            prog, sys.argv[1:] if argv is None else argv, host)


def guarded(call, prog: str, args: list[str], host: Host | None) -> None:
    """call(), its errors shown as one line with an exit code (click's own
    errors, when it ran, as click shows them)."""

    def verbose() -> bool:  # the host's own -v, wherever it was given; else any -v
        return host.verbose if host else "-v" in args or "--verbose" in args

    try:
        call()
    except TappassError as exc:
        if verbose():
            raise
        echo(f"{prog}: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        click = sys.modules.get("click")
        if click is not None and isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if click is not None and isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if click is not None and isinstance(exc, click.exceptions.Abort):
            aborted(prog)
        if verbose():
            raise
        if isinstance(exc, OSError) and exc.errno in _FULL:
            where = exc.filename or (host and host.__dict__.get("paths") and host.paths.state)
            echo(f"{prog}: error: no space left on the device"
                 + (f" of {where}" if where else "") + ": free some space and try again",
                 err=True)
            sys.exit(1)
        echo(f"{prog}: internal error: {type(exc).__name__}: {exc} "
             "(run with -v for details)", err=True)
        sys.exit(70)


def aborted(prog: str) -> None:
    echo(f"{prog}: aborted", err=True)
    sys.exit(130)


def _plain_call(args: list[str], host: Host):
    """The call that runs `args` without click (setting `host`'s common
    options), if they are a hot command's common form; else None."""
    if "_TAPPASS_HOST_COMPLETE" in os.environ:  # click's shell completion
        return None
    before = {}
    rest = parse_options(args, COMMON, before, up_to_name=True)
    if not rest or _COMMANDS.get(rest[0], ("",))[0] != "tappass_host.cli.sandbox":
        return None
    from tappass_host.cli import lifecycle

    command = lifecycle.COMMANDS.get(rest[0])
    values = command and parse(command, rest[1:], COMMON)
    if values is None:
        return None
    if os.environ.get(STATE_DIR_ENV):
        host.state_dir = os.environ[STATE_DIR_ENV]
    for option in COMMON:  # given after the name wins over before, as in click
        value = values.pop(option.dest, before.get(option.dest))
        if value is not None and value is not False:
            setattr(host, option.dest, value)

    def call():
        try:
            command.run(host, **values)
        except (EOFError, KeyboardInterrupt):  # as click: a blank line closes the ^C
            echo("", err=True)
            aborted("tappass-host")
        except OSError as exc:  # as click: a reader gone (`| head`) ends it quietly, exit 1
            if exc.errno != errno.EPIPE:
                raise
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
    return call


def main(argv=None) -> None:
    host = Host()
    args = sys.argv[1:] if argv is None else list(argv)
    call = _plain_call(args, host)
    if call is not None:
        guarded(call, "tappass-host", args, host)
    else:
        run(__getattr__("cli"), "tappass-host", argv, host)
