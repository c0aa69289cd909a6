"""`tappass-devplane`: the reference control plane's command line.

    serve --state DIR [--listen HOST:PORT]     run the HTTPS control plane
    bootstrap NAME --state DIR [--count N]     print one-time enroll URLs
    trust-key --state DIR                      print the key hosts pin
    publish NAME FILE --state DIR              sign and push the next keyring
    sign NAME FILE -o OUT --state DIR          the same, also written to OUT (air gap)
    acks NAME --state DIR                      print the acks sandboxes sent
"""

import json
import sys
from pathlib import Path

import click

from tappass_host import statefile
from tappass_host.cli import run
from tappass_host.devplane import keyrings, server
from tappass_host.devplane.state import DevplaneError, DevplaneState


PROG = "tappass-devplane"


def _state_option(command):
    return click.option("--state", "state_dir", envvar="TAPPASS_DEVPLANE_STATE", required=True,
                        type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
                        help="The devplane's state directory (created on first use).")(command)


def _open(state_dir: Path):
    return DevplaneState.open(state_dir)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """tappass-devplane: the reference TapPass control plane, for demos and tests."""


@cli.command()
@_state_option
@click.option("--listen", default="127.0.0.1:8443", show_default=True, metavar="HOST:PORT",
              help="Where to listen; port 0 picks a free port.")
@click.option("--url", metavar="URL", help="The origin clients use (default from --listen).")
@click.option("--keepalive", type=float, default=15.0, show_default=True, metavar="S",
              help="Seconds between SSE keepalive comments (at most 15).")
@click.option("--cert-ttl", type=float, default=86400.0, show_default=True, metavar="S",
              help="Lifetime of the sandbox certificates issued.")
@click.option("--quiet", is_flag=True, help="Do not log requests on stderr.")
def serve(state_dir, listen, url, keepalive, cert_ttl, quiet):
    """Run the control plane over HTTPS until SIGTERM or Ctrl-C."""
    if not 0 < keepalive <= 15:
        raise click.BadParameter("must be more than 0 and at most 15", param_hint="--keepalive")
    try:
        server.parse_listen(listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None

    def ready(served_url):
        click.echo(f"{PROG}: serving on {served_url}")
        sys.stdout.flush()

    server.serve(_open(state_dir), listen, url=url, keepalive=keepalive, cert_ttl=cert_ttl,
                 verbose=not quiet, on_ready=ready)


@cli.command()
@click.argument("name")
@_state_option
@click.option("--count", type=click.IntRange(1, 1000), default=1, show_default=True)
@click.option("--ttl", type=click.IntRange(1, 900), default=900, show_default=True, metavar="S",
              help="Seconds the bootstrap stays valid (at most 900).")
@click.option("--url", metavar="URL",
              help="The control plane's origin (default: where serve runs).")
def bootstrap(name, state_dir, count, ttl, url):
    """Print one-time enroll URLs for sandbox NAME.

    One URL per line, COUNT of them. The URL is the only place the token
    ever appears: the state directory keeps a hash of its id only.
    """
    state = _open(state_dir)
    url = url or state.url
    if not url:
        raise DevplaneError("the devplane's URL is unknown: start 'serve' first, or pass --url")
    for _ in range(count):
        click.echo(state.issue_bootstrap(name, ttl, url))


@cli.command("trust-key")
@_state_option
def trust_key(state_dir):
    """Print the key hosts pin (tappass-host init --trust-key)."""
    click.echo(_open(state_dir).trust_key)


def _report(done, notified: bool) -> None:
    for record, published in done:
        click.echo(f"published {record['name']} {record['sandbox_id']} "
                   f"policy_version {published.policy_version}")
    if not notified:
        click.echo(f"{PROG}: note: no running devplane answered; the keyring is stored and "
                   "will be served when it starts", err=True)


@cli.command()
@click.argument("name")
@click.argument("policy_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@_state_option
@click.option("--ttl", type=click.IntRange(1), default=3600, show_default=True, metavar="S",
              help="Seconds until the keyring expires.")
@click.option("--raw-envelope", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Test hook: push FILE's bytes as they are, signed or not.")
@click.option("--policy-version", type=int, metavar="N",
              help="With --raw-envelope: the SSE id to send it under.")
def publish(name, policy_file, state_dir, ttl, raw_envelope, policy_version):
    """Sign a policy file as NAME's next keyring and push it.

    POLICY_FILE is JSON, or TOML if it ends in .toml. It goes to every sandbox
    enrolled as NAME (or to the one whose sandbox id is NAME); `schema`,
    `sandbox_id`, `policy_version` (next), `issued_at` and `expires_at` are
    filled in unless the file sets them.
    """
    if (policy_file is None) == (raw_envelope is None):
        raise click.UsageError("give either POLICY_FILE or --raw-envelope FILE")
    state = _open(state_dir)
    if raw_envelope is not None:
        try:
            data = raw_envelope.read_bytes()
        except OSError as exc:
            raise click.FileError(str(raw_envelope), exc.strerror) from None
        done = keyrings.publish_raw(state, name, data, policy_version)
    else:
        done = keyrings.publish(state, name, keyrings.load_policy(policy_file), ttl=ttl)
    _report(done, keyrings.notify(state))


@cli.command()
@click.argument("name")
@click.argument("policy_file", type=click.Path(dir_okay=False, path_type=Path))
@_state_option
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              metavar="OUT", help="Where to write the signed envelope.")
@click.option("--ttl", type=click.IntRange(1), default=3600, show_default=True, metavar="S")
def sign(name, policy_file, state_dir, output, ttl):
    """Publish NAME's next keyring and also write its envelope to OUT.

    For air-gapped hosts: `tappass-host sync apply NAME OUT`. NAME must name
    exactly one enrolled sandbox (or be its sandbox id).
    """
    state = _open(state_dir)
    if len(keyrings.resolve(state, name)) != 1:
        raise DevplaneError(f"{name!r} names several sandboxes: give a sandbox id")
    done = keyrings.publish(state, name, keyrings.load_policy(policy_file), ttl=ttl)
    statefile.write_atomic(output.absolute(), done[0][1].envelope, 0o644)
    _report(done, keyrings.notify(state))


@cli.command()
@click.argument("name")
@_state_option
def acks(name, state_dir):
    """Print the acks sandboxes sent, as JSON lines.

    NAME is the name sandboxes enrolled under, or one sandbox id.
    """
    state = _open(state_dir)
    for record in keyrings.resolve(state, name):
        for ack in state.acks(record["sandbox_id"]):
            click.echo(json.dumps({"sandbox_id": record["sandbox_id"], **ack}, sort_keys=True))


def main(argv=None) -> None:
    run(cli, PROG, argv)
