"""Telemetry port: the core and the adapters count what happens; ``service.metrics`` turns it into Prometheus."""

from __future__ import annotations

from typing import Protocol


class Telemetry(Protocol):
    def event(self, source: str, result: str) -> None:
        """An inbound event (``source``: dataverse_webhook, graph_notification, bot, reconcile...) and
        what the core made of it (``result``: an ``Outcome.result``)."""

    def rejected(self, route: str, reason: str) -> None:
        """Bad input refused at a route (``reason``: unauthenticated, malformed, too_large...)."""

    def quarantined(self, route: str, reason: str) -> None:
        """A request kept in the quarantine instead of refused (``reason``: the route's fixed set,
        never caller text)."""

    def delivery(self, system: str, result: str, seconds: float) -> None:
        """One outbox delivery attempt (``result``: delivered, throttled, retry, dead)."""

    def latency(self, name: str, seconds: float) -> None:
        """A timing: ``ack.<route>`` for how long an inbound request took, ``propagation.<system>`` for
        event observed -> command delivered."""

    def breaker(self, system: str, state: str) -> None:
        """An upstream's breaker changed state (``state``: closed, open, probing; see
        ``mapping.upstream_health``)."""

    def probe(self, system: str, result: str) -> None:
        """A probe of a down upstream ended (``result``: success, failure)."""

    def dead_lettered(self, system: str) -> None:
        """A command became a dead letter (the alert: someone must look at ``outbox list --status dead``)."""


class NullTelemetry:
    """Counts nothing (tests and tools that need no metrics)."""

    def event(self, source: str, result: str) -> None:
        pass

    def rejected(self, route: str, reason: str) -> None:
        pass

    def quarantined(self, route: str, reason: str) -> None:
        pass

    def delivery(self, system: str, result: str, seconds: float) -> None:
        pass

    def latency(self, name: str, seconds: float) -> None:
        pass

    def breaker(self, system: str, state: str) -> None:
        pass

    def probe(self, system: str, result: str) -> None:
        pass

    def dead_lettered(self, system: str) -> None:
        pass
