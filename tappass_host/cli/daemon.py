"""`tappass-host daemon`: receive signed keyring updates for every enrolled sandbox."""

import os
import signal
import sys
import time

import click

from tappass_host.cli import pass_host


def _stderr_logger():
    # journald stamps each line itself; elsewhere the line carries its time.
    under_systemd = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))

    def log(line: str) -> None:
        if not under_systemd:
            line = time.strftime("%Y-%m-%dT%H:%M:%S ", time.gmtime()) + line
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return log


@click.command()
@pass_host
def daemon(host):
    """Hold one stream per enrolled sandbox and apply each signed keyring it brings.

    Every update goes through the same acceptance rules as `sync apply`; each
    is logged on stderr as applied or rejected (with the reason), and
    acknowledged to the control plane. Runs until SIGTERM or SIGINT.
    """
    from tappass_host.sync.daemon import Daemon, SyncSettings

    runner = Daemon(host.paths, SyncSettings.from_config(host.config), _stderr_logger())

    def stop(signum, frame):
        runner.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    runner.run()
