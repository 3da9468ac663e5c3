"""Outbox workers (rule 7): claim due commands, deliver through the ports, record every transition.

Every state change is a store write, so a worker that dies anywhere leaves either a pending row or an
in-flight row whose lease runs out and is claimed again: a command is redelivered, never lost. The
store keeps one row per (agent, system) and never hands out a second lease on it, so an older value
cannot be applied after a newer one.

Upstream trouble is judged per upstream, not per row (``mapping.upstream_health``): while a system's
breaker is open nothing of it is claimed but one probe, a row failing then is due again as soon as
the breaker lets it (its own backoff and give-up do not apply: the upstream is to blame), and the
probe that succeeds re-drives every waiting row of that system at once. A row dies only of a
permanent error, or once it has been failing past the dead-letter budget while its upstream answers.
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
from mapping.upstream_health import BreakerPolicy, UpstreamHealth

log = logging.getLogger("presence_sync.outbox")

HEARTBEAT_KIND = "outbox.heartbeat"
HEARTBEAT_MISSES = 3
"""Heartbeats an owner may miss before its rows in flight are taken over."""


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
        breaker: BreakerPolicy | None = None,
    ) -> None:
        """``hold_seconds``: the longest time a row can be held for coalescing (``SyncEngine.holds``
        times its cap); ``drain`` waits that long for held rows to fall due. ``wakeup``: set by
        whoever enqueues (the engine), so the worker delivers at once instead of at its next poll.
        ``breaker``: when an upstream counts as down and how it is probed (``UpstreamHealth``)."""
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
        self.health = UpstreamHealth(
            breaker, on_change=lambda system, state: self._breaker_changed(system, state), on_probe=self._probed
        )
        self.settled = asyncio.Condition()
        """Notified after every ack or final failure, for callers waiting on a delivery."""

    def wake(self) -> None:
        self._wake.set()

    def _breaker_changed(self, system: str, state: str) -> None:
        self.telemetry.breaker(system, state)
        fields = {"system": system, "state": state}
        at = self.health.next_probe_at(system)
        if at is not None and state == "open":
            fields["next_probe_at"] = at.isoformat()
        log.warning("upstream breaker", extra={"fields": fields})

    def _probed(self, system: str, result: str) -> None:
        self.telemetry.probe(system, result)

    async def run_once(self) -> int:
        """Claims one batch and delivers it; returns how many rows were attempted. Systems whose
        breaker is closed share one claim of ``batch_size``; a system taken as down gets one row when
        its probe is due, and none otherwise."""
        now = self.clock()
        allowed = [s for s in self.writers if self.health.claim_limit(s, now, self.batch_size) > 0]
        closed = [s for s in allowed if not self.health.is_open(s)]
        batch = await self.store.claim(closed, self.batch_size, self.lease_seconds, self.owner, now) if closed else []
        for system in allowed:
            if system in closed:
                continue
            probe = await self.store.claim([system], 1, self.lease_seconds, self.owner, now)
            if probe:
                self.health.probing(system, probe[0].agent_id)
                log.info("probing upstream", extra={"fields": {"system": str(system), "agent": probe[0].agent_id}})
            else:
                self.health.probe_unused(system, now)
            batch.extend(probe)
        if batch:
            await asyncio.gather(*(self.deliver(d) for d in batch))
        return len(batch)

    async def heartbeat(self, interval: float) -> int:
        """Records that this worker is alive, and takes over the rows in flight under any owner whose
        heartbeat is older than ``HEARTBEAT_MISSES`` intervals (it died: kill -9, a lost host), so
        they are delivered within seconds instead of after their lease. Returns how many rows.

        The heartbeats are records of the store (kind ``outbox.heartbeat``), shared by every
        instance. Taking over a live but stalled owner's rows costs at most a duplicate delivery
        (idempotent): its late ack or failure is refused, the lease token having changed."""
        now = self.clock()
        await self.store.put_doc(HEARTBEAT_KIND, self.owner, {"at": now.isoformat()})
        limit = now - timedelta(seconds=interval * HEARTBEAT_MISSES)
        taken = 0
        for owner, doc in (await self.store.list_docs(HEARTBEAT_KIND)).items():
            if owner == self.owner:
                continue
            try:
                seen = datetime.fromisoformat(str(doc.get("at")))
            except ValueError:
                seen = None
            if seen is not None and seen > limit:
                continue
            rows = await self.store.release_leases(owner, now)
            await self.store.delete_doc(HEARTBEAT_KIND, owner)
            taken += rows
            log.warning(
                "outbox rows of a silent instance taken over",
                extra={"fields": {"owner": owner, "rows": rows, "last_heartbeat": seen.isoformat() if seen else None}},
            )
        if taken:
            self.wake()
        return taken

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
            if self.health.succeeded(d.system, d.agent_id):
                await self._redrive(d.system, now)
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

    async def _redrive(self, system: System, now: datetime) -> None:
        """The upstream answered again: every row waiting for it is due now (the limiters still pace
        them), instead of each waiting out its own backoff."""
        try:
            rows = await self.store.redrive(system, now)
        except Exception:  # the store hiccuped: the rows still fall due by their own backoff
            log.exception("re-drive failed", extra={"fields": {"system": str(system)}})
            return
        log.info("upstream back; rows re-driven", extra={"fields": {"system": str(system), "rows": rows}})
        self.wake()

    async def _failed(self, d: Delivery, error: UpstreamError, secs: float) -> None:
        now = self.clock()
        attempt = d.attempts + 1
        self.health.failed(d.system, d.agent_id, error, now)
        failing_seconds = (now - d.failing_since).total_seconds() if d.failing_since else 0.0
        if not error.retryable:
            next_at = None
        elif self.health.is_open(d.system):
            # The upstream is down, not this row: it waits for the breaker (due with the next probe,
            # re-driven once one succeeds), and this failure does not count toward its own give-up.
            next_at = max(now, self.health.next_probe_at(d.system) or now)
        elif self.policy.gives_up(attempt, error, failing_seconds):
            next_at = None
        else:
            next_at = now + timedelta(seconds=self.policy.delay(attempt, error))
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
            self.telemetry.dead_lettered(d.system)
            fields["failing_seconds"] = round(failing_seconds, 1)
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
