"""`tappass-host sync …`: keyring updates from files (air-gapped hosts)."""

from pathlib import Path

import click

from tappass_host.cli import pass_host


@click.group()
def sync():
    """Apply signed keyrings without the daemon."""


@sync.command("apply")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path, allow_dash=True))
@pass_host
def apply(host, name, file):
    """Verify FILE (a DSSE keyring envelope, or - for stdin) and make it NAME's keyring.

    The envelope goes through exactly the acceptance rules the daemon uses.
    Prints the new policy_version, or the reason code of the rejection (and
    exits 1). Both outcomes are written to the audit log.
    """
    from tappass_host.keyring.verify import Limits
    from tappass_host.sync.receive import REJECTED, receive

    host.paths.sandbox(name)  # a bad name fails before any file is read
    data = click.get_binary_stream("stdin").read() if str(file) == "-" else _read(file)
    outcome = receive(host.paths, name, data, limits=Limits(**host.config["limits"]))
    if outcome.status == REJECTED:
        host.emit({"status": "rejected", "reason": outcome.reason,
                   "policy_version": outcome.policy_version})
        raise outcome.rejection
    live = (f"; process limits updated live (pids {outcome.resources['pids']['limit']})"
            if outcome.resources else "")
    report = {"status": "applied", "policy_version": outcome.policy_version,
              "previous": outcome.previous}
    if outcome.resources:
        report["live_limits"] = outcome.resources
    if outcome.live_error:
        report["live_error"] = outcome.live_error
    host.emit(report, f"{name}: keyring policy_version {outcome.policy_version} applied{live}")
    if outcome.live_error:
        click.echo(f"tappass-host: warning: {name}: the keyring is applied but its process "
                   f"limits are not: {outcome.live_error}", err=True)


def _read(path: Path) -> bytes:
    from tappass_host.errors import NotFound

    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"no such file: {path}") from None
    except IsADirectoryError:
        raise NotFound(f"{path} is a directory, not an envelope file") from None
