"""Receiving signed keyrings from the control plane (DESIGN §7): the
transport, the SSE reader, and what one received envelope does. The daemon
that holds one stream per enrolled sandbox is tappass_host.daemon."""
