"""`tappass-host egress`: the egress proxy of network mode `proxy`, in the foreground."""

import click

from tappass_host.cli import pass_host


@click.command()
@click.option("--no-idle-exit", is_flag=True,
              help="Keep running when no sandbox is attached (as a service: systemd unit "
                   "tappass-host-egress.service).")
@pass_host
def egress(host, no_idle_exit):
    """Run the egress proxy for every proxy-mode sandbox of this host, in the foreground.

    Without it, `start` spawns one on demand that ends after a minute without
    sandboxes. Settings come from config `network.*`. A proxy already running
    for this host hands over: its sandboxes keep their namespaces and are
    served by this one. Runs until SIGTERM or SIGINT; under systemd it reports
    READY=1 once it accepts requests. Needs root.
    """
    import os

    from tappass_host.errors import TappassError
    from tappass_host.network import control, service
    from tappass_host.network.settings import Settings

    if os.geteuid() != 0:
        raise TappassError("the egress proxy needs root (it creates network namespaces)")
    settings = Settings.from_config(host.config, idle_exit=not no_idle_exit)
    previous = control.take_over(host.paths)
    if previous is not None:
        click.echo(f"egress: took over from the proxy with pid {previous}", err=True)
    service.main(host.paths, settings)
