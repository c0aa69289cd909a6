"""Why an enrollment or a certificate renewal failed.

Each error carries a short `reason` code (what `enroll.failed` audits) and a
one-line message for the operator. Neither ever holds a token, nonce or key.
A call that fails on its way to the control plane (unreachable, untrusted
TLS, an answer too large or not JSON) fails enrollment with the
tappass_host.controlplane.errors error itself, which carries a `reason` too.
"""

from tappass_host.errors import TappassError


class IdentityError(TappassError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class BadBootstrap(IdentityError):
    """The bootstrap URL or token is unusable; found before any network call."""


class BootstrapConsumed(IdentityError):
    """The bootstrap was already used, on this host or on another."""

    def __init__(self, message: str):
        super().__init__("consumed", message)


class EnrollmentRefused(IdentityError):
    """The control plane refused the enrollment, or an answer of it does not
    hold up (its CA against the pin, the certificate it issued)."""


class AlreadyEnrolled(IdentityError):
    def __init__(self, name: str):
        super().__init__("already_enrolled", f"sandbox {name!r} is already enrolled on this host")


class RenewalError(IdentityError):
    """A certificate renewal failed; the old certificate stays in place."""
