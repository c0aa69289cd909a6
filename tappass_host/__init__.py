"""tappass-host: the host runtime of TapPass.

Enrolls sandboxes with the control plane, runs agents in locked-down OCI
sandboxes, and swaps their signed policy (the keyring) atomically.
"""

__version__ = "0.1.0"
