"""tappass-devplane: the reference control plane (DESIGN §5, §7, §11).

Small on purpose: it is what demos and tests run against, and what a
developer of the real control plane can read as the protocol's reference.

- `ca`: the CA behind TLS and the sandbox certificates;
- `state`: the state directory (bootstraps, burns, sandboxes, keyrings, acks);
- `keyrings`: policy file -> signed DSSE keyring -> published;
- `server`: the HTTPS endpoints, mTLS checks, and SSE event streams;
- `cli`: `tappass-devplane serve | bootstrap | trust-key | publish | sign | acks`.
"""
