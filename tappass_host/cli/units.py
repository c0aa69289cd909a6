"""`tappass-host systemd print|install`: the shipped systemd units."""

from pathlib import Path

import click

from tappass_host.cli import pass_host

_EXEC_HELP = ("tappass-host executable for ExecStart (default: the one of this installation; "
              "the shipped units name /usr/bin/tappass-host)")


@click.group()
def systemd():
    """Print or install the systemd units that ship with tappass-host.

    \b
    tappass-host.service    the daemon: keyring sync and sandbox supervision
                            (Type=notify, watchdog, hardened)
    tappass-host@.service   one sandbox in the foreground, supervised by systemd:
                            systemctl start tappass-host@NAME (agent and runtime
                            of NAME's last start)
    tappass-host-egress.service
                            the egress proxy of network mode "proxy" for every
                            sandbox; the other two want it
    """


@systemd.command("print")
@click.argument("unit", required=False, metavar="[UNIT]")
@click.option("--exec", "exec_path", metavar="PATH", help=_EXEC_HELP)
def print_units(unit, exec_path):
    """Print UNIT (default: every unit), rendered for this installation."""
    from tappass_host import systemd as units

    names = [unit] if unit else list(units.UNITS)
    texts = [units.render(name, exec_path) for name in names]
    click.echo("\n".join(f"# --- {name}\n{text}" if not unit else text
                         for name, text in zip(names, texts)), nl=False)


@systemd.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              default="/etc/systemd/system", show_default=True, help="Where to write the units.")
@click.option("--exec", "exec_path", metavar="PATH", help=_EXEC_HELP)
@pass_host
def install(host, directory, exec_path):
    """Write every unit into --dir, rendered for this installation.

    Then: systemctl daemon-reload && systemctl enable --now tappass-host.service
    """
    from tappass_host import systemd as units
    from tappass_host.errors import NotFound

    if not directory.exists():
        raise NotFound(f"--dir {directory} does not exist (create it first)")
    written = units.install(directory, exec_path)
    hidden = units.hidden_by_protect_home(exec_path)
    if hidden:
        click.echo(f"tappass-host: warning: {' and '.join(units.PROTECTED_HOME_UNITS)} cannot "
                   f"start this installation: their ProtectHome=yes hides "
                   f"{', '.join(map(str, hidden))}; install tappass-host outside /root and /home "
                   "(e.g. python3 -m venv /opt/tappass && /opt/tappass/bin/pip install .) and "
                   "run its `tappass-host systemd install`", err=True)
    host.emit({"installed": [str(p) for p in written], "hidden_by_protect_home":
               [str(p) for p in hidden]},
              "\n".join(f"installed {p}" for p in written)
              + "\nnext: systemctl daemon-reload && systemctl enable --now tappass-host.service")
