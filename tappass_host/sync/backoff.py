"""Capped exponential backoff with jitter, for reconnecting to the control plane."""

import random


class Backoff:
    """Delays of initial·2ⁿ capped at `maximum`, each drawn from its upper half
    so that many hosts cut off together do not come back in lockstep."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None):
        self.initial = initial
        self.maximum = max(initial, maximum)
        self.rng = rng or random.Random()
        self.failures = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * 2 ** min(self.failures, 32))
        self.failures += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0
