"""Per-upstream limits (sync rule 7, ``docs/DESIGN.md``): token buckets and a per-key concurrency cap.

Limits are per process. Graph presence: 1,500 requests / 30 s per tenant (reads and writes share it);
Dataverse: 6,000 requests / 5 min and 52 concurrent, per impersonated user.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


class TokenBucket:
    """``capacity`` tokens refilled evenly over ``period`` seconds; ``acquire`` waits for a token."""

    def __init__(self, capacity: int, period: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / period
        self.tokens = float(capacity)
        self.clock = clock
        self.updated = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def try_acquire(self) -> float:
        """Takes a token and returns 0, or returns the seconds until one is due (taking nothing)."""
        self._refill()
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    async def acquire(self) -> None:
        async with self._lock:
            while (wait := self.try_acquire()) > 0:
                await asyncio.sleep(wait)


@dataclass
class Limit:
    requests: int
    period_seconds: float
    concurrent: int | None = None
    per_key: bool = False


@dataclass
class UpstreamLimiter:
    """One upstream's limit; ``per_key`` gives each key (an impersonated user) its own bucket."""

    limit: Limit
    _buckets: dict[str, TokenBucket] = field(default_factory=dict)
    _sems: dict[str, asyncio.Semaphore] = field(default_factory=dict)

    @asynccontextmanager
    async def slot(self, key: str = "") -> AsyncIterator[None]:
        k = key if self.limit.per_key else ""
        bucket = self._buckets.get(k)
        if bucket is None:
            bucket = self._buckets[k] = TokenBucket(self.limit.requests, self.limit.period_seconds)
        await bucket.acquire()
        if self.limit.concurrent is None:
            yield
            return
        sem = self._sems.get(k)
        if sem is None:
            sem = self._sems[k] = asyncio.Semaphore(self.limit.concurrent)
        async with sem:
            yield


GRAPH_PRESENCE = Limit(1500, 30.0)
DATAVERSE_PER_USER = Limit(6000, 300.0, concurrent=52, per_key=True)
