"""The retry policy: which failures retry, how often, after how long."""

from __future__ import annotations

import random
from dataclasses import dataclass

from schemas import FailureReason

#: Failures that say nothing about the run itself: its host or its container went away.
DEFAULT_RETRY_ON = (FailureReason.AGENT_LOST, FailureReason.UNEXPECTED_TERMINATION)
DEFAULT_MAX_RETRIES = 2


@dataclass(frozen=True)
class RetryPolicy:
    """A run's policy; ``None`` fields of a submission take the defaults."""

    max_retries: int = DEFAULT_MAX_RETRIES
    retry_on: tuple[FailureReason, ...] = DEFAULT_RETRY_ON

    def retries(self, reason: FailureReason, attempt: int) -> bool:
        """Whether a failure of ``attempt`` (1-based) for ``reason`` gets another attempt."""
        return reason in self.retry_on and attempt <= self.max_retries


def backoff_s(attempt: int, base_s: float, cap_s: float = 60.0) -> float:
    """Delay before attempt ``attempt + 1``: exponential, with jitter so retries spread out."""
    ceiling = min(cap_s, base_s * 2 ** (attempt - 1))
    return float(ceiling * random.uniform(0.5, 1.0))
