"""`tappass-host init`: enroll a sandbox from a one-time bootstrap URL."""

import sys
from pathlib import Path

import click

from tappass_host.cli import Host, pass_host
from tappass_host.errors import TappassError


class UnreadableURL(TappassError):
    pass


def read_enroll_url(value: str) -> str:
    """`-` reads the URL from stdin, `@FILE` from a file, so it stays out of `ps`."""
    if value == "-":
        text, where = sys.stdin.read(), "standard input"
    elif value.startswith("@"):
        try:
            text, where = Path(value[1:]).read_text("utf-8"), value[1:]
        except (OSError, UnicodeError) as exc:
            raise UnreadableURL(f"cannot read the bootstrap URL from {value[1:]}: "
                                f"{getattr(exc, 'strerror', None) or exc}") from None
    else:
        return value
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise UnreadableURL(f"expected exactly one bootstrap URL in {where}, found {len(lines)}")
    return lines[0]


@click.command("init")
@click.argument("name")
@click.option("--enroll-url", required=True, metavar="URL",
              help="The bootstrap URL; '-' reads it from stdin, '@FILE' from a file.")
@click.option("--trust-key", "trust_keys", multiple=True, metavar="KEY",
              help="Pin this control-plane key (ed25519:<base64>) for this enrollment.")
@click.option("--trust-on-first-use", is_flag=True,
              help="Trust and pin the bootstrap's signing key if none is pinned (warns).")
@pass_host
def init(host: Host, name, enroll_url, trust_keys, trust_on_first_use):
    """Enroll sandbox NAME from a one-time bootstrap URL."""
    from tappass_host.identity.enrollment import TrustPolicy, enroll
    from tappass_host.paths import check_sandbox_name

    check_sandbox_name(name)
    if trust_keys and trust_on_first_use:
        raise click.UsageError("use either --trust-key or --trust-on-first-use, not both")
    url = read_enroll_url(enroll_url)
    trust = TrustPolicy(pinned=tuple(host.config["trust.keys"]) + tuple(trust_keys),
                        trust_on_first_use=trust_on_first_use)
    record = enroll(host.paths, name, url, trust,
                    warn=lambda message: click.echo(f"tappass-host: warning: {message}", err=True))
    host.emit({"name": record.name, "sandbox_id": record.sandbox_id, "org_id": record.org_id,
               "spiffe_id": record.spiffe_id, "sync_url": record.sync_url},
              f"enrolled sandbox {record.name} as {record.sandbox_id} ({record.spiffe_id})")
