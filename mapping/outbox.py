"""Outbox workers (rule 7): claim due commands, deliver through the ports, record every transition.

Every state change is a store write, so a worker that dies anywhere leaves either a pending row or an
in-flight row whose lease runs out and is claimed again: a command is redelivered, never lost. The
store keeps one row per (agent, system) and never hands out a second lease on it, so an older value
cannot be applied after a newer one.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from mapping.clock import Clock, utcnow
from mapping.errors import PermanentError, Throttled, UpstreamError
from mapping.model import Delivery, OutboxRow, OutboxStatus, System
from mapping.ports import DeliveryListener, PresenceWriter, Store
from mapping.ratelimit import UpstreamLimiter
from mapping.retry import RetryPolicy
from mapping.telemetry import NullTelemetry, Telemetry

log = logging.getLogger("presence_sync.outbox")


class OutboxWorker:
    def __init__(
        self,
        store: Store,
        writers: Mapping[System, PresenceWriter],
        *,
        limiters: Mapping[System, UpstreamLimiter] | None = None,
        policy: RetryPolicy | None = None,
        telemetry: Telemetry | None = None,
        listeners: Sequence[DeliveryListener] = (),
        lease_seconds: float = 30.0,
        batch_size: int = 64,
        poll_seconds: float = 0.25,
        clock: Clock = utcnow,
        owner: str | None = None,
        hold_seconds: float = 0.0,
        wakeup: asyncio.Event | None = None,
    ) -> None:
        """``hold_seconds``: the longest time a row can be held for coalescing (``SyncEngine.holds``
        times its cap); ``drain`` waits that long for held rows to fall due. ``wakeup``: set by
        whoever enqueues (the engine), so the worker delivers at once instead of at its next poll."""
        self.store = store
        self.writers = dict(writers)
        self.limiters = dict(limiters or {})
        self.policy = policy or RetryPolicy()
        self.telemetry = telemetry or NullTelemetry()
        self.listeners = list(listeners)
        self.lease_seconds = lease_seconds
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.hold_seconds = hold_seconds
        self.clock = clock
        self.owner = owner or f"worker-{uuid.uuid4().hex[:8]}"
        self._wake = wakeup or asyncio.Event()
        self._paused_until: dict[System, datetime] = {}
        self.settled = asyncio.Condition()
        """Notified after every ack or final failure, for callers waiting on a delivery."""

    def wake(self) -> None:
        self._wake.set()

    def _systems(self, now: datetime) -> list[System]:
        return [s for s in self.writers if self._paused_until.get(s, now) <= now]

    async def run_once(self) -> int:
        """Claims one batch and delivers it; returns how many rows were attempted."""
        now = self.clock()
        systems = self._systems(now)
        if not systems:
            return 0
        batch = await self.store.claim(systems, self.batch_size, self.lease_seconds, self.owner, now)
        if batch:
            await asyncio.gather(*(self.deliver(d) for d in batch))
        return len(batch)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                n = await self.run_once()
            except Exception:  # the store hiccuped: log, wait, go on; nothing is lost
                log.exception("outbox claim failed; retrying")
                n = 0
            if n == 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
                except TimeoutError:
                    pass

    async def drain(self, *, timeout: float = 10.0) -> None:
        """Delivers until nothing is due (tests, demo, ``reconcile``); while rows are pending but not
        due, waits up to ``hold_seconds`` for them, so that rows held for coalescing are delivered too."""
        deadline = time.monotonic() + timeout
        idle_since: float | None = None
        while time.monotonic() < deadline:
            if await self.run_once() > 0:
                idle_since = None
                continue
            if self.hold_seconds <= 0 or not (await self.store.outbox_counts()).get("pending", 0):
                return
            now = time.monotonic()
            if idle_since is None:
                idle_since = now
            elif now - idle_since > self.hold_seconds:
                return
            await asyncio.sleep(min(self.poll_seconds, max(0.0, deadline - now)))

    async def deliver(self, d: Delivery) -> None:
        started = time.monotonic()
        writer = self.writers[d.system]
        agent = await self.store.get_agent(d.agent_id)
        error: UpstreamError
        try:
            if agent is None or not agent.enabled:
                raise PermanentError(f"agent {d.agent_id} is not an enabled agent in the directory")
            limiter = self.limiters.get(d.system)
            if limiter is not None:
                async with limiter.slot(agent.dynamics_user_id):
                    await asyncio.wait_for(writer.apply(agent, d.value), self.lease_seconds / 2)
            else:
                await asyncio.wait_for(writer.apply(agent, d.value), self.lease_seconds / 2)
        except UpstreamError as e:
            error = e
        except TimeoutError:
            error = UpstreamError(f"{d.system} did not answer within {self.lease_seconds / 2:.0f} s")
        except Exception as e:  # an adapter bug must not kill the worker; retry and say what it was
            log.exception("writer raised an untyped error", extra={"fields": {"agent": d.agent_id}})
            error = UpstreamError(f"{type(e).__name__}: {e}")
        else:
            now = self.clock()
            kept = await self.store.ack(d, now)
            secs = time.monotonic() - started
            self.telemetry.delivery(d.system, "delivered" if kept else "lease_lost", secs)
            log.info(
                "delivered",
                extra={
                    "fields": {
                        "agent": d.agent_id,
                        "system": str(d.system),
                        "value": d.value,
                        "attempt": d.attempts + 1,
                        "seconds": round(secs, 4),
                    }
                },
            )
            await self._settle(d, "delivered", None)
            return
        await self._failed(d, error, time.monotonic() - started)

    async def _failed(self, d: Delivery, error: UpstreamError, secs: float) -> None:
        now = self.clock()
        attempt = d.attempts + 1
        if self.policy.gives_up(attempt, error):
            next_at = None
        else:
            next_at = now + timedelta(seconds=self.policy.delay(attempt, error))
        if isinstance(error, Throttled) and error.retry_after:
            # The whole upstream asked us to wait: stop claiming for it, not just this row.
            self._paused_until[d.system] = now + timedelta(seconds=error.retry_after)
        status = await self.store.fail(d, error.message, next_at, now)
        result = "dead" if status is OutboxStatus.DEAD else ("throttled" if isinstance(error, Throttled) else "retry")
        self.telemetry.delivery(d.system, result, secs)
        fields = {
            "agent": d.agent_id,
            "system": str(d.system),
            "value": d.value,
            "attempt": attempt,
            "error": error.message,
            "result": result,
            "retry_at": next_at.isoformat() if next_at else None,
        }
        if status is OutboxStatus.DEAD:
            log.error("dead letter", extra={"fields": fields})
            await self._settle(d, "dead", error.message)
        else:
            log.warning("delivery failed", extra={"fields": fields})
            async with self.settled:
                self.settled.notify_all()

    async def _settle(self, d: Delivery, outcome: str, error: str | None) -> None:
        async with self.settled:
            self.settled.notify_all()
        for listener in self.listeners:
            try:
                await listener.on_outcome(d, outcome, error)
            except Exception:
                log.exception("delivery listener failed", extra={"fields": {"agent": d.agent_id}})

    async def wait_settled(
        self, agent_id: str, system: System, *, after_generation: int = 0, timeout: float
    ) -> OutboxRow | None:
        """Waits until the (agent, system) row is delivered or dead (and past ``after_generation``),
        or ``timeout`` passes; returns the row as last seen. Polls the store, so it also sees
        deliveries made by another instance."""
        deadline = time.monotonic() + timeout
        row = await self.store.outbox_row(agent_id, system)
        while True:
            if (
                row is not None
                and row.generation >= after_generation
                and row.status in (OutboxStatus.DELIVERED, OutboxStatus.DEAD)
            ):
                return row
            left = deadline - time.monotonic()
            if left <= 0:
                return row
            async with self.settled:
                try:
                    await asyncio.wait_for(self.settled.wait(), min(left, 0.25))
                except TimeoutError:
                    pass
            row = await self.store.outbox_row(agent_id, system)
