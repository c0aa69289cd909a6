"""Receiving signed keyrings from the control plane (DESIGN §7): the
transport, what one received envelope does, and the daemon that holds one
stream per enrolled sandbox."""
