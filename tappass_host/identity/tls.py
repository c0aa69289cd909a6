"""TLS contexts that trust the control plane's pinned CA and nothing else."""

import ssl

from tappass_host.paths import HostPaths


def pinned_context(ca_pem: bytes) -> ssl.SSLContext:
    """Verify servers against `ca_pem` only (no system roots), hostname included."""
    context = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def mtls_context(paths: HostPaths, name: str) -> ssl.SSLContext:
    """The sandbox's client identity: its certificate for the machine key.

    Build a new context for each connection so that a renewed certificate is
    used from the next request on.
    """
    sandbox = paths.sandbox(name)
    context = pinned_context(sandbox.ca.read_bytes())
    context.load_cert_chain(certfile=sandbox.cert, keyfile=paths.machine_key)
    return context
