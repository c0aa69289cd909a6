"""`network.denied` audit events, rate-limited per sandbox: at most LIMIT in a
WINDOW; the rest are counted and the count rides on the next event written
(`details.suppressed`), so a looping agent cannot flood the audit log."""

import time
from dataclasses import dataclass

LIMIT = 20
WINDOW_S = 60.0


@dataclass
class _Window:
    started: float
    written: int = 0
    suppressed: int = 0


class DenialLog:
    def __init__(self, append, limit: int = LIMIT, window: float = WINDOW_S,
                 clock=time.monotonic):
        self._append = append        # (event, sandbox, details) -> None
        self._limit = limit
        self._window = window
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def admit(self, sandbox: str, host: str, reason: str, port: int | None = None) -> dict | None:
        """The details to audit for this denial, or None when it is suppressed."""
        now = self._clock()
        window = self._windows.get(sandbox)
        if window is None or now - window.started >= self._window:
            carried = window.suppressed if window else 0
            window = self._windows[sandbox] = _Window(started=now, suppressed=carried)
        if window.written >= self._limit:
            window.suppressed += 1
            return None
        window.written += 1
        details = {"host": host[:255], "reason": reason}
        if port is not None:
            details["port"] = port
        if window.suppressed:
            details["suppressed"] = window.suppressed
            window.suppressed = 0
        return details

    def denied(self, sandbox: str, host: str, reason: str, port: int | None = None) -> None:
        details = self.admit(sandbox, host, reason, port)
        if details is not None:
            self._append("network.denied", sandbox, details)
