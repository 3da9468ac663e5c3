"""Prometheus metrics: the ``Telemetry`` port implemented on a registry of our own (one per app, so
several apps in one test process do not collide)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mapping.model import System
from mapping.ports import Store
from mapping.upstream_health import BREAKER_STATES, BreakerState

SYSTEMS = tuple(s.value for s in System)


class SpoolGauge(Protocol):
    """What ``render`` reads from a spool (``edge.spool.Spool``) at scrape time."""

    @property
    def records(self) -> int: ...
    @property
    def pending_bytes(self) -> int: ...


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class PrometheusTelemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "presence_sync_events_total", "Inbound events by source and result", ["source", "result"], registry=r
        )
        self.rejections = Counter(
            "presence_sync_rejected_total", "Bad input refused, by route and reason", ["route", "reason"], registry=r
        )
        self.deliveries = Counter(
            "presence_sync_deliveries_total",
            "Outbox delivery attempts by system and result",
            ["system", "result"],
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "presence_sync_delivery_seconds", "Upstream write duration", ["system"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.latencies = Histogram(
            "presence_sync_latency_seconds",
            "Request acks and propagation",
            ["name"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.outbox = Gauge("presence_sync_outbox_rows", "Outbox rows by status", ["status"], registry=r)
        self.breakers = Gauge(
            "presence_sync_upstream_breaker",
            "1 for the state each upstream's breaker is in (closed, open, probing), else 0",
            ["system", "state"],
            registry=r,
        )
        for system in SYSTEMS:
            for state in BREAKER_STATES:
                self.breakers.labels(system, state).set(1 if state is BreakerState.CLOSED else 0)
        self.probes = Counter(
            "presence_sync_upstream_probes_total",
            "Probes of an upstream taken as down, by result",
            ["system", "result"],
            registry=r,
        )
        self.dead_letters = Counter(
            "presence_sync_dead_lettered_total",
            "Commands that became dead letters (alert on any increase)",
            ["system"],
            registry=r,
        )
        self.dead = Gauge(
            "presence_sync_dead_letters", "Outbox rows that gave up (see `presence-sync outbox list`)", registry=r
        )
        self.quarantines = Counter(
            "presence_sync_quarantined_total",
            "Requests kept in the quarantine instead of refused, by route and reason",
            ["route", "reason"],
            registry=r,
        )
        self.quarantine_items = Gauge(
            "presence_sync_quarantine_items",
            "Items held in the quarantine (`presence-sync quarantine list`)",
            registry=r,
        )
        self.quarantine_dropped = Gauge(
            "presence_sync_quarantine_dropped", "Quarantine items dropped for room (oldest first), ever", registry=r
        )
        self.spool_records = Gauge(
            "presence_sync_spool_records", "Webhook changes in the local spool, waiting for the store", registry=r
        )
        self.spool_bytes = Gauge("presence_sync_spool_bytes", "Bytes of the spooled changes waiting", registry=r)
        self.spools: list[Callable[[], SpoolGauge | None]] = []
        """Where ``render`` finds the spools (the runtime registers the webhook's)."""

    # Telemetry port
    def event(self, source: str, result: str) -> None:
        self.events.labels(source, str(result)).inc()

    def rejected(self, route: str, reason: str) -> None:
        self.rejections.labels(route, reason).inc()

    def quarantined(self, route: str, reason: str) -> None:
        self.quarantines.labels(route, reason).inc()

    def delivery(self, system: str, result: str, seconds: float) -> None:
        self.deliveries.labels(str(system), result).inc()
        self.delivery_seconds.labels(str(system)).observe(seconds)

    def latency(self, name: str, seconds: float) -> None:
        self.latencies.labels(name).observe(seconds)

    def breaker(self, system: str, state: str) -> None:
        if str(system) not in SYSTEMS or state not in BREAKER_STATES:
            return  # labels are fixed sets
        for s in BREAKER_STATES:
            self.breakers.labels(str(system), s).set(1 if s == state else 0)

    def probe(self, system: str, result: str) -> None:
        if str(system) in SYSTEMS and result in ("success", "failure"):
            self.probes.labels(str(system), result).inc()

    def dead_lettered(self, system: str) -> None:
        if str(system) in SYSTEMS:
            self.dead_letters.labels(str(system)).inc()

    @property
    def echoes_suppressed(self) -> float:
        return sum(
            s.value
            for m in self.events.collect()
            for s in m.samples
            if s.name.endswith("_total") and s.labels.get("result") == "echo"
        )

    async def render(self, store: Store) -> bytes:
        """Outbox and quarantine gauges are read from the store at scrape time, so every instance
        reports the truth; the spool gauges are this instance's own spool."""
        counts = await store.outbox_counts()
        for status, n in counts.items():
            self.outbox.labels(status).set(n)
        self.dead.set(counts.get("dead", 0))
        self.quarantine_items.set(await store.quarantine_count())
        self.quarantine_dropped.set(await store.quarantine_dropped())
        spools = [s for s in (get() for get in self.spools) if s is not None]
        self.spool_records.set(sum(s.records for s in spools))
        self.spool_bytes.set(sum(s.pending_bytes for s in spools))
        return generate_latest(self.registry)
