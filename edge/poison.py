"""Poison items: a queued item that fails for a reason of its own is taken out of its queue and handed
to one hook, so the rest of the queue goes on.

A queue (Graph's pending reads, a batch of notifications, the bot's follow-ups) must never stop
behind one item that can never succeed: every later round would fail on it again. What an item
"fails for a reason of its own" means is the queue's to decide (a malformed note, an id the store
cannot hold); an upstream or store outage is not that, and leaves the item queued for the next round.

The hook gets ``(route, reason, body, detail)``: ``route`` names the queue (a fixed metric label),
``reason`` a fixed word, ``body`` the item as stored or received, ``detail`` a sentence for an
operator. The default (``log_poison``) logs it (scrubbed) and counts it; the service points every
queue at ``quarantine_poison``, which also keeps the item in the store's quarantine, where
``presence-sync quarantine list|show|drop`` finds it next to the webhook bodies that could not be used.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mapping.api import CoreApi
from mapping.redact import redact
from mapping.telemetry import Telemetry

log = logging.getLogger("presence_sync.poison")

PoisonHook = Callable[[str, str, bytes, str], Awaitable[None]]
SHOWN_BODY = 1024
"""How much of a poison item a log line shows: enough to recognise it, not a copy of a flood."""


def log_poison(telemetry: Telemetry) -> PoisonHook:
    """The default hook: one WARNING line (body excerpt and detail scrubbed) and
    ``telemetry.rejected(route, "poison_item")``."""

    async def hook(route: str, reason: str, body: bytes, detail: str) -> None:
        telemetry.rejected(route, "poison_item")
        excerpt = body[:SHOWN_BODY].decode("utf-8", "backslashreplace")
        log.warning(
            "poison item taken out of its queue",
            extra={
                "fields": {
                    "route": route,
                    "reason": reason,
                    "detail": redact(detail),
                    "body": redact(excerpt),
                    "size": len(body),
                }
            },
        )

    return hook


def quarantine_poison(bridge: CoreApi) -> PoisonHook:
    """The service's hook: logged and counted as ``log_poison`` does, then kept in the quarantine
    (``presence_sync_quarantined_total{route,reason}``). If the store cannot keep it, ``hand_off``
    logs that; the item has been logged in full already, so an operator still has it."""
    logged = log_poison(bridge.telemetry)

    async def hook(route: str, reason: str, body: bytes, detail: str) -> None:
        await logged(route, reason, body, detail)
        await bridge.quarantine.quarantine(route, reason, body, redact(detail), bridge.clock())
        bridge.telemetry.quarantined(route, reason)

    return hook


def encode_item(item: Any) -> bytes:
    """An item as JSON bytes for the hook; ASCII-escaped, so even a lone surrogate survives encoding."""
    try:
        return json.dumps(item, ensure_ascii=True, default=repr).encode("ascii")
    except (TypeError, ValueError, RecursionError):
        return ascii(item).encode("ascii")


async def hand_off(hook: PoisonHook, route: str, reason: str, body: bytes, detail: str) -> None:
    """Calls ``hook``; a failing hook is logged, never raised: the queue goes on either way."""
    try:
        await hook(route, reason, body, detail)
    except Exception as e:
        log.error(
            "poison item could not be handed off; it is dropped",
            extra={"fields": {"route": route, "reason": reason, "error": redact(f"{type(e).__name__}: {e}")}},
        )
