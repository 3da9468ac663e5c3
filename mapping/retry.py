"""The one retry policy: exponential backoff with full jitter, ``Retry-After`` honoured, bounded tries.

The outbox uses it for deliveries; adapters use ``RetryPolicy.run`` for reads (paging, reconcile), so
every upstream call in the project backs off the same way. A read gives up after ``max_attempts``
(someone is waiting for it); a delivery only once it has also been failing for
``dead_letter_after_seconds`` (rule 7: hours of trying, not seconds, because a dead letter is work a
person must look at, and an upstream outage of minutes must not make any).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from mapping.errors import Throttled, UpstreamError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    base_seconds: float = 0.5
    factor: float = 2.0
    max_delay_seconds: float = 300.0
    max_attempts: int = 8
    jitter: bool = True
    dead_letter_after_seconds: float = 24 * 3600.0
    """A delivery's retryable failures become a dead letter only this long after the first failed
    attempt of its run (``PRESENCE_SYNC_DEAD_LETTER_AFTER_HOURS``)."""

    def delay(self, attempt: int, error: BaseException | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based).

        Full jitter (uniform between half and the whole exponential step) spreads many agents' retries
        so a recovering upstream is not hit by a synchronized wave; a ``Retry-After`` is a floor.
        """
        step = min(self.max_delay_seconds, self.base_seconds * self.factor ** max(0, attempt - 1))
        if self.jitter:
            step = (rng or random).uniform(step / 2, step)
        if isinstance(error, Throttled) and error.retry_after is not None:
            step = max(step, float(error.retry_after))
        return step

    def gives_up(self, attempt: int, error: BaseException, failing_seconds: float | None = None) -> bool:
        """A permanent error gives up at once. Otherwise after ``max_attempts`` tries; for a delivery
        (``failing_seconds``: how long its run has been failing) only once the dead-letter budget is
        spent as well, so a burst of quick failures never kills a command."""
        if isinstance(error, UpstreamError) and not error.retryable:
            return True
        if attempt < self.max_attempts:
            return False
        return failing_seconds is None or failing_seconds >= self.dead_letter_after_seconds

    async def run(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_attempts: int | None = None,
    ) -> T:
        """Calls ``fn`` until it succeeds, or raises its last error once retrying cannot help."""
        attempt = 0
        limit = max_attempts or self.max_attempts
        while True:
            attempt += 1
            try:
                return await fn()
            except UpstreamError as e:
                if not e.retryable or attempt >= limit:
                    raise
                await sleep(self.delay(attempt, e))
