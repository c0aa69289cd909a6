"""`tappass-host daemon`: receive signed keyring updates for every enrolled sandbox."""

import os
import signal
import sys

import click

from tappass_host import clock
from tappass_host.cli import pass_host


def _stderr_logger():
    # journald stamps each line itself; elsewhere the line carries its time.
    under_systemd = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))

    def log(line: str) -> None:
        if not under_systemd:
            line = f"{clock.now_text().removesuffix('Z')} {line}"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return log


@click.command()
@pass_host
def daemon(host):
    """Hold one stream per enrolled sandbox and apply each signed keyring it brings.

    Every update goes through the same acceptance rules as `sync apply`; each
    is logged on stderr as applied or rejected (with the reason), and
    acknowledged to the control plane. The daemon also supervises the
    sandboxes: it restarts an agent that exits per its manifest's `restart`
    policy (never one stopped with `tappass-host stop`), follows config
    `on_expiry` when a keyring expires, and restarts on a policy change when
    `restart_on_policy_change = true`. Runs until SIGTERM or SIGINT; under
    systemd it reports READY=1 once every stream is open and pings the
    watchdog.
    """
    from tappass_host.daemon.loop import Daemon
    from tappass_host.daemon.supervision import SupervisionSettings, Supervisor
    from tappass_host.daemon.worker import SyncSettings

    log = _stderr_logger()
    supervisor = Supervisor(host.paths, host.config, SupervisionSettings.from_config(host.config),
                            log)
    runner = Daemon(host.paths, SyncSettings.from_config(host.config), log,
                    supervisor=supervisor)

    def stop(signum, frame):
        runner.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    runner.run()
