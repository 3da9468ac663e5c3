"""Upstream health (rule 7): one circuit breaker per upstream system, so that trouble slows the whole
upstream instead of each row retrying on its own.

Why a breaker and not per-row backoff alone: during an outage every row fails, and rows times tries is
what the upstream (and the bridge's own budget) pays; a new value for a row, or a new row, would be
tried again at once. With the breaker, once several rows failed in a short window no row of that
system is claimed; one probe (a real delivery of one due row) tests the upstream at growing
intervals with jitter, and the first success closes the breaker and re-drives every waiting row.

States: ``closed`` (normal), ``open`` (nothing is claimed until the next probe is due) and
``probing`` (one delivery is under way to test the upstream). A ``Throttled`` with ``Retry-After``
opens the breaker at once (the upstream asked the whole client to wait) and the probe waits at
least that long.

Pure state with a datetime clock passed in, no I/O: the outbox worker asks and reports.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from mapping.errors import Throttled, UpstreamError


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    PROBING = "probing"


BREAKER_STATES = tuple(BreakerState)
"""The fixed label set of the breaker-state metric."""


@dataclass(frozen=True)
class BreakerPolicy:
    """``threshold`` retryable failures of distinct rows within ``window_seconds`` open the breaker.
    Probes follow ``base_seconds`` * 2^n, capped at ``max_probe_seconds``, each scaled by a jitter
    factor drawn from [``min_jitter``, 1] so that several instances do not probe in step. The cap is
    also the longest a recovered upstream waits to be noticed (rule 7's "re-driven at once"), which is
    why it is seconds, not minutes."""

    threshold: int = 3
    window_seconds: float = 10.0
    base_seconds: float = 1.0
    max_probe_seconds: float = 5.0
    min_jitter: float = 0.8

    def probe_interval(self, opened: int, rng: Callable[[float, float], float] = random.uniform) -> float:
        """Seconds before probe number ``opened`` (0-based: the first probe after opening)."""
        step = min(self.max_probe_seconds, self.base_seconds * 2.0 ** max(0, opened))
        return step * rng(self.min_jitter, 1.0)

    def max_probes(self, seconds: float) -> int:
        """The most probes a breaker can start within ``seconds`` of opening: each interval is at
        least ``min_jitter`` times its step. Tests and the chaos bench bound the upstream calls of an
        outage with it."""
        count, elapsed = 0, 0.0
        while True:
            elapsed += min(self.max_probe_seconds, self.base_seconds * 2.0**count) * self.min_jitter
            if elapsed > seconds:
                return count
            count += 1


@dataclass
class _Health:
    state: BreakerState = BreakerState.CLOSED
    failures: dict[str, datetime] = field(default_factory=dict)
    """Row key -> its latest retryable failure, while closed (distinct rows, not tries)."""
    probes_failed: int = 0
    next_probe_at: datetime | None = None
    probe_key: str | None = None


class UpstreamHealth:
    """One breaker per system name. ``on_change(system, state)`` is told every state change (the
    telemetry gauge); ``on_probe(system, result)`` every probe's outcome."""

    def __init__(
        self,
        policy: BreakerPolicy | None = None,
        *,
        on_change: Callable[[str, BreakerState], None] | None = None,
        on_probe: Callable[[str, str], None] | None = None,
        rng: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.policy = policy or BreakerPolicy()
        self._on_change = on_change
        self._on_probe = on_probe
        self._rng = rng
        self._health: dict[str, _Health] = {}

    def _get(self, system: str) -> _Health:
        h = self._health.get(system)
        if h is None:
            h = self._health[system] = _Health()
        return h

    def state(self, system: str) -> BreakerState:
        return self._get(system).state

    def is_open(self, system: str) -> bool:
        """True while the upstream is taken as down (open or probing): a row failing then is not to
        blame, and its own give-up clock does not run out."""
        return self._get(system).state is not BreakerState.CLOSED

    def claim_limit(self, system: str, now: datetime, limit: int) -> int:
        """How many rows of ``system`` may be claimed now: ``limit`` when closed, 1 when a probe is due
        (the breaker moves to probing), else 0."""
        h = self._get(system)
        if h.state is BreakerState.CLOSED:
            return limit
        if h.state is BreakerState.OPEN and h.next_probe_at is not None and h.next_probe_at <= now:
            self._set(system, h, BreakerState.PROBING)
            return 1
        return 0

    def probing(self, system: str, key: str) -> None:
        """The row claimed as the probe (its outcome decides the breaker)."""
        h = self._get(system)
        if h.state is BreakerState.PROBING and h.probe_key is None:
            h.probe_key = key

    def probe_unused(self, system: str, now: datetime) -> None:
        """A probe was allowed but no row was due: wait for the next turn, counting nothing."""
        h = self._get(system)
        if h.state is BreakerState.PROBING and h.probe_key is None:
            h.next_probe_at = now + timedelta(seconds=self.policy.probe_interval(h.probes_failed, self._rng))
            self._set(system, h, BreakerState.OPEN)

    def succeeded(self, system: str, key: str) -> bool:
        """A delivery landed. Returns True when this closed the breaker: the caller re-drives every
        waiting row of ``system`` at once."""
        h = self._get(system)
        h.failures.clear()
        if h.state is BreakerState.CLOSED:
            return False
        if self._on_probe is not None and key == h.probe_key:
            self._on_probe(system, "success")
        h.probes_failed, h.next_probe_at, h.probe_key = 0, None, None
        self._set(system, h, BreakerState.CLOSED)
        return True

    def failed(self, system: str, key: str, error: UpstreamError, now: datetime) -> None:
        """A delivery failed. Only retryable failures count: a permanent one is the row's own fault
        (a probe that failed so tested nothing, and the next probe is due at once)."""
        h = self._get(system)
        if not error.retryable:
            if h.state is BreakerState.PROBING and key == h.probe_key:
                h.next_probe_at, h.probe_key = now, None
                self._set(system, h, BreakerState.OPEN)
            return
        retry_after = error.retry_after if isinstance(error, Throttled) else None
        if h.state is BreakerState.CLOSED:
            h.failures[key] = now
            window = timedelta(seconds=self.policy.window_seconds)
            h.failures = {k: at for k, at in h.failures.items() if now - at <= window}
            if len(h.failures) >= self.policy.threshold or retry_after:
                h.failures.clear()
                h.probes_failed = 0
                self._open(system, h, now, retry_after)
            return
        if key != h.probe_key:
            if retry_after:  # a later Retry-After still holds the next probe back
                floor = now + timedelta(seconds=retry_after)
                if h.next_probe_at is None or h.next_probe_at < floor:
                    h.next_probe_at = floor
            return  # a row that was in flight when the breaker opened: already accounted for
        if self._on_probe is not None:
            self._on_probe(system, "failure")
        h.probes_failed += 1
        self._open(system, h, now, retry_after)

    def _open(self, system: str, h: _Health, now: datetime, retry_after: float | None) -> None:
        wait = self.policy.probe_interval(h.probes_failed, self._rng)
        if retry_after:
            wait = max(wait, float(retry_after))
        h.next_probe_at, h.probe_key = now + timedelta(seconds=wait), None
        self._set(system, h, BreakerState.OPEN)

    def _set(self, system: str, h: _Health, state: BreakerState) -> None:
        changed = h.state is not state
        h.state = state
        if changed and self._on_change is not None:
            self._on_change(system, state)

    def next_probe_at(self, system: str) -> datetime | None:
        return self._get(system).next_probe_at
