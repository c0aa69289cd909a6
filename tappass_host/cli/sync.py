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
    from tappass_host.sync.apply import apply_update
    from tappass_host.keyring.verify import KeyringRejected, Limits

    host.paths.sandbox(name)  # a bad name fails before any file is read
    data = click.get_binary_stream("stdin").read() if str(file) == "-" else _read(file)
    try:
        applied = apply_update(host.paths, name, data, limits=Limits(**host.config["limits"]))
    except KeyringRejected as rejection:
        host.emit({"status": "rejected", "reason": rejection.reason,
                   "policy_version": rejection.policy_version})
        raise
    version = applied.keyring.version
    host.emit({"status": "applied", "policy_version": version.policy_version,
               "previous": applied.previous.policy_version if applied.previous else None},
              f"{name}: keyring policy_version {version.policy_version} applied")


def _read(path: Path) -> bytes:
    from tappass_host.errors import NotFound

    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"no such file: {path}") from None
    except IsADirectoryError:
        raise NotFound(f"{path} is a directory, not an envelope file") from None
