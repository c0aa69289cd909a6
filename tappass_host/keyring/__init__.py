"""The keyring: a sandbox's signed Compiled Policy (DESIGN §6)."""

PAYLOAD_TYPE = "application/vnd.tappass.keyring+json"
MAX_ENVELOPE_BYTES = 1024 * 1024
