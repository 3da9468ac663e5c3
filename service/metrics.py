"""Prometheus metrics: the ``Telemetry`` port implemented on a registry of our own (one per app, so
several apps in one test process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mapping.ports import Store

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
        self.dead = Gauge(
            "presence_sync_dead_letters", "Outbox rows that gave up (see `presence-sync outbox list`)", registry=r
        )

    # Telemetry port
    def event(self, source: str, result: str) -> None:
        self.events.labels(source, str(result)).inc()

    def rejected(self, route: str, reason: str) -> None:
        self.rejections.labels(route, reason).inc()

    def delivery(self, system: str, result: str, seconds: float) -> None:
        self.deliveries.labels(str(system), result).inc()
        self.delivery_seconds.labels(str(system)).observe(seconds)

    def latency(self, name: str, seconds: float) -> None:
        self.latencies.labels(name).observe(seconds)

    @property
    def echoes_suppressed(self) -> float:
        return sum(
            s.value
            for m in self.events.collect()
            for s in m.samples
            if s.name.endswith("_total") and s.labels.get("result") == "echo"
        )

    async def render(self, store: Store) -> bytes:
        """Outbox gauges are read from the store at scrape time, so every instance reports the truth."""
        counts = await store.outbox_counts()
        for status, n in counts.items():
            self.outbox.labels(status).set(n)
        self.dead.set(counts.get("dead", 0))
        return generate_latest(self.registry)
