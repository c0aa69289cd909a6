"""The host's identity: bootstrap tokens, enrollment, and the mTLS certificate.

- `bootstrap`: the one-time token — its encoding, verification, and the
  host's list of bootstraps already used;
- `enrollment`: the six steps of DESIGN §5 that turn a bootstrap URL into an
  enrolled sandbox;
- `certs`: the machine key, CSRs, proof of possession, and renewal;
- `tls`: the TLS contexts pinned to the control plane's CA.
"""
