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


class NullTelemetry:
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
