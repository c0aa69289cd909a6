"""Certificate renewal on schedule: at about half of each certificate's
lifetime (tappass_host.identity.certs.renewal_delay), retried on failure."""

import time
from collections.abc import Callable

from tappass_host.errors import TappassError
from tappass_host.identity.certs import renew_certificate, renewal_delay
from tappass_host.identity.errors import IdentityError
from tappass_host.paths import HostPaths

RETRY_S = 60.0


class RenewalSchedule:
    def __init__(self, paths: HostPaths, log: Callable[[str], None], *,
                 retry_s: float = RETRY_S, clock: Callable[[], float] = time.monotonic):
        self.paths = paths
        self.log = log
        self.retry_s = retry_s
        self.clock = clock
        self._due: dict[str, float] = {}

    def _delay(self, name: str) -> float:
        from cryptography import x509

        try:
            cert = x509.load_pem_x509_certificate(self.paths.sandbox(name).cert.read_bytes())
        except (OSError, ValueError):
            return self.retry_s
        return renewal_delay(cert)

    def forget(self, name: str) -> None:
        self._due.pop(name, None)

    def next_due_in(self) -> float | None:
        """Seconds until the next renewal, for the daemon's sleep."""
        if not self._due:
            return None
        return max(0.0, min(self._due.values()) - self.clock())

    def tick(self, names: list[str], progress: Callable[[], None] = lambda: None) -> None:
        """Renew every certificate among `names` that is due; `progress()` after each."""
        now = self.clock()
        for name in names:
            progress()
            if name not in self._due:
                self._due[name] = now + self._delay(name)
            if self._due[name] > now:
                continue
            try:
                cert = renew_certificate(self.paths, name, timeout=5.0)
            except IdentityError as exc:
                self.log(f"{name}: certificate renewal failed ({exc.reason}); "
                         f"retrying in {self.retry_s:g} s")
                self._due[name] = self.clock() + self.retry_s
            except Exception as exc:  # a full disk, a bad file: retried on schedule, never fatal
                detail = exc if isinstance(exc, TappassError) else f"{type(exc).__name__}: {exc}"
                self.log(f"{name}: certificate renewal failed ({detail}); "
                         f"retrying in {self.retry_s:g} s")
                self._due[name] = self.clock() + self.retry_s
            else:
                self.log(f"{name}: certificate renewed (serial {cert.serial_number:x})")
                self._due[name] = self.clock() + self._delay(name)
