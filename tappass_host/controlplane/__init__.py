"""The host's one client of a control plane (DESIGN §5 and §7).

- `client`: every endpoint, enrollment's CA, challenge and complete, and a
  sandbox's keyring pull, event stream, acks and certificate renewal;
- `connection`: the one place that builds an HTTP client (unverified, pinned
  or mTLS, from tappass_host.identity.tls) and maps failures to errors;
- `sse`: the bounded reader of the event stream;
- `errors`: the ControlPlaneError family.

It speaks the protocol and bounds every answer; what an answer means is for
its callers (tappass_host.identity, tappass_host.sync).
"""
