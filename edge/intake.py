"""How every intake route answers: a refusal it can explain (``Rejected``) with its status and a JSON
error, counted under its reason; anything that slipped through as 503 (nothing was acknowledged, so
the sender's retry is what keeps the change), logged with its traceback; the answer's latency, always.
One path for the bot, the Graph and the Dataverse routes, and the app's middleware."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from mapping.telemetry import Telemetry

log = logging.getLogger("presence_sync.intake")


class Rejected(Exception):
    """An intake refuses a request: answered with ``status``, counted under ``reason`` (a metric
    label from a fixed set), explained by ``message`` (safe to return and log: no secrets)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def answer(
    route: str,
    telemetry: Telemetry,
    handle: Callable[[], Awaitable[web.StreamResponse]],
    *,
    unavailable: str,
    remote: str | None = None,
) -> web.StreamResponse:
    """Runs ``handle`` for ``route`` and answers as described above. ``unavailable``: the 503's words,
    telling the sender what to do ("send it again")."""
    started = time.monotonic()
    try:
        return await handle()
    except Rejected as r:
        telemetry.rejected(route, r.reason)
        log.info(
            "request rejected",
            extra={
                "fields": {
                    "route": route,
                    "status": r.status,
                    "reason": r.reason,
                    "detail": r.message,
                    "remote": remote,
                }
            },
        )
        return json_error(r.status, r.message)
    except Exception:
        log.exception("request failed", extra={"fields": {"route": route, "remote": remote}})
        telemetry.rejected(route, "internal")
        return json_error(503, unavailable)
    finally:
        telemetry.latency(f"ack.{route}", time.monotonic() - started)
