"""The aiohttp application: routes of the interface contract, health, readiness and metrics.

``create_app(settings)`` is the importable factory of the contract. The runtime (store, core,
adapters) is built when the app starts and closed when it stops, so the factory itself does no I/O.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

import console.routes
from edge.intake import json_error
from graph_sync.web_login import CALLBACK_PATH, LOGIN_PATH, WebLogin
from service.runtime import Runtime, describe
from service.settings import Settings, load_settings

log = logging.getLogger("presence_sync.service")

RUNTIME = web.AppKey("runtime", Runtime)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = 1024 * 1024


async def bot_messages(request: web.Request) -> web.StreamResponse:
    return await request.app[RUNTIME].bot.handle(request)


async def graph_notifications(request: web.Request) -> web.StreamResponse:
    return await request.app[RUNTIME].graph_intake.notifications(request)


async def graph_lifecycle(request: web.Request) -> web.StreamResponse:
    return await request.app[RUNTIME].graph_intake.lifecycle(request)


async def dataverse_webhook(request: web.Request) -> web.StreamResponse:
    return await request.app[RUNTIME].dataverse_intake.handle(request)


async def graph_web_login(request: web.Request) -> web.StreamResponse:
    return await _web_login(request).login(request)


async def graph_web_callback(request: web.Request) -> web.StreamResponse:
    return await _web_login(request).callback(request)


def _web_login(request: web.Request) -> WebLogin:
    rt = request.app[RUNTIME]
    return rt.web_login or WebLogin(rt.store, tenant_id="", client_id="", client_credential=None, redirect_uri=None)


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Adapters answer bad input themselves (``edge.intake``); this turns what aiohttp refuses before
    them (unknown path, wrong method, a body over the limit) into JSON, never HTML. Counted under the
    route template, never the raw path: a path is caller-chosen (and may carry a key)."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status >= 400 and e.content_type != "application/json":
            reason = "too_large" if e.status == 413 else f"http_{e.status}"
            rt = request.app.get(RUNTIME)
            if rt is not None:
                rt.telemetry.rejected(_route_label(request), reason)
            return json_error(e.status, e.reason)
        raise
    except Exception:
        log.exception("unhandled error", extra={"fields": {"route": _route_label(request)}})
        return json_error(503, "internal error; the request was not processed, send it again")


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    from service.store.sql import migration_status

    rt = request.app[RUNTIME]
    problems = []
    try:
        await rt.store.ping()
        current, head = await migration_status(rt.store)  # type: ignore[arg-type]
        if current != head:
            problems.append(f"store schema at {current}, code expects {head}: run `presence-sync db upgrade`")
    except Exception as e:
        problems.append(f"store unreachable: {e}")
    if len(rt.bridge.catalogue) == 0:
        problems.append("presence catalogue not loaded")
    unconfigured = getattr(rt.tokens, "problem", None)
    if unconfigured:
        problems.append(unconfigured)
    # The webhook's spool: ready while it works (records waiting are fine, they are replayed); not
    # ready when it cannot be written, since a store outage would then fail agents' changes.
    spool = rt.spool.status().as_json() if rt.spool is not None else None
    if rt.spool is not None and rt.spool.problem:
        problems.append(f"webhook spool unwritable: {rt.spool.problem} (check PRESENCE_SYNC_SPOOL_DIR)")
    if problems:
        return web.json_response({"status": "not ready", "problems": problems, "spool": spool}, status=503)
    agents = await rt.store.count_agents(enabled_only=True)  # counted, not read: 50,000 agents per poll
    return web.json_response({"status": "ready", "agents": agents, "spool": spool})


async def metrics(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    body = await rt.telemetry.render(rt.store)
    return web.Response(
        body=body, content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"}
    )


def freeze_start_up() -> None:
    """Moves every object alive after start-up (modules, classes, msgraph-sdk's generated models:
    about 150,000 objects) out of the cyclic garbage collector's reach, for a long-running process
    (``serve``), before the service starts working. Each full collection walked them all: about 50 ms
    twice per 3,000 webhooks, 50 µs a request (``bench/webhook_bench.py``). What start-up made lives
    as long as the process; what the work makes later stays collectable. Not for tests, which start
    many apps in one process: what a stopped app left in reference cycles would never be collected."""
    gc.collect()
    gc.freeze()


def create_app(
    settings: Settings | None = None, *, runtime: Runtime | None = None, background: bool = True
) -> web.Application:
    """The service as an aiohttp app. Pass ``runtime`` to serve one built already (demo, tests)."""
    settings = settings or load_settings()
    app = web.Application(middlewares=[errors_as_json], client_max_size=MAX_BODY + 64 * 1024)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        started = time.monotonic()
        rt = runtime or await Runtime.open(settings)
        app[RUNTIME] = rt
        await rt.start_intakes()
        if background:
            await rt.take_back_own_rows()
            rt.start_background()
        log.info(
            "service started",
            extra={"fields": {"detail": describe(settings), "seconds": round(time.monotonic() - started, 3)}},
        )
        yield
        if runtime is None:
            await rt.close()

    app.cleanup_ctx.append(lifecycle)
    # The adapters exist once the runtime has started (``lifecycle``), so each route finds its own.
    app.router.add_post("/api/messages", bot_messages)
    app.router.add_post("/api/graph/notifications", graph_notifications)
    app.router.add_post("/api/graph/lifecycle", graph_lifecycle)
    app.router.add_post("/api/dataverse/webhook", dataverse_webhook)
    app.router.add_get(LOGIN_PATH, graph_web_login)  # `graph login --web` (graph_sync.web_login)
    app.router.add_get(CALLBACK_PATH, graph_web_callback)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    console.routes.add_routes(app, RUNTIME)  # the operations console (console/)
    return app
