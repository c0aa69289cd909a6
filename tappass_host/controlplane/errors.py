"""Why a call to the control plane failed: one family for every call.

tappass_host.controlplane.connection turns whatever httpx, ssl and the socket
raise into these; the endpoints add `Refused` and `BadAnswer`. Each carries
a short `reason` code for logs and audit events; its message is one line and
never holds a token, nonce or key. Callers that give an answer of the
control plane its meaning (enrollment's refusals, DESIGN §5) read `status`.
"""

from tappass_host.errors import TappassError


class ControlPlaneError(TappassError):
    reason = "control_plane"


class Unreachable(ControlPlaneError):
    """No answer: the network, a timeout, a deadline, a closed stream."""

    reason = "unreachable"


class Untrusted(Unreachable):
    """The server's TLS certificate is not issued by the pinned CA."""

    reason = "tls"


class NoIdentity(ControlPlaneError):
    """The sandbox's TLS identity (certificate, CA, machine key) cannot be loaded."""

    reason = "missing_identity"


class Refused(ControlPlaneError):
    """An HTTP status the endpoint does not answer with when it accepts."""

    reason = "refused"

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class Stalled(ControlPlaneError):
    """The event stream sent nothing, not even a keepalive, in time."""

    reason = "stalled"


class AnswerTooLarge(ControlPlaneError):
    """An answer over its size limit, not read past it."""

    reason = "too_large"


class BadAnswer(ControlPlaneError):
    """An answer that is not what the endpoint promises (not a JSON object)."""

    reason = "bad_response"
