"""Receiving signed keyrings from the control plane (DESIGN §7): what one
received envelope does (receive, apply, hot reload), delivering it (apply,
then ack) and the one-time pull of `start`. The client that talks to the
control plane is tappass_host.controlplane; the daemon that holds one stream
per enrolled sandbox is tappass_host.daemon."""
