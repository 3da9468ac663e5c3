"""The console's routes on the service's aiohttp app: ``add_routes(app, RUNTIME)``.

The page (``GET /console``) and its assets come from ``console/static`` (shipped in the package,
nothing from the internet; a Content-Security-Policy of ``'self'`` says so to the browser too). The
data comes from ``/console/api/...``, the live updates from ``/console/api/events``. Everything but
the sign-in routes needs a session (``console.access``); actions also need the CSRF token.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from console import views
from console.access import (
    CALLBACK_PATH,
    LINK_PATH,
    LOGIN_PATH,
    SCOPES,
    SIGNIN_PATH,
    Access,
    Session,
)
from console.live import Hub
from console.reads import MAX_PAGE, SORTS, ConsoleReads, reads_for
from edge.intake import json_error
from graph_sync.notifications import NOTIFIED_KIND
from graph_sync.subscriptions import KIND as SUBSCRIPTION_KIND
from graph_sync.web_login import WebLogin
from mapping.model import OutboxStatus, System

if TYPE_CHECKING:
    from service.runtime import Runtime

log = logging.getLogger("presence_sync.console")

STATIC = Path(__file__).parent / "static"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
SECURITY = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Console:
    """What the routes share, built on the first request (the runtime exists once the app started)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        s = rt.settings
        entra = None
        if rt.web_login is not None:
            wl = rt.web_login
            entra = WebLogin(
                rt.store,
                tenant_id=wl.tenant_id,
                client_id=wl.client_id,
                client_credential=wl.client_credential,
                redirect_uri=s.public(CALLBACK_PATH) if s.public_url else None,
                authority_host=wl.authority_host,
                http_client=wl.http_client,
                scopes=SCOPES,
                telemetry=rt.telemetry,
            )
        self.access = Access(
            rt.store,
            entra=entra,
            allowed_group=s.console_allowed_group_id,
            allowed_role=s.console_allowed_role,
            secure_cookie=s.public_url.lower().startswith("https://"),
        )
        self.reads: ConsoleReads = reads_for(rt.store)
        self.hub = Hub(self.reads, rt.store.outbox_counts)


Handler = Callable[[web.Request, Console, Session], Awaitable[web.StreamResponse]]


def add_routes(app: web.Application, runtime_key: web.AppKey[Runtime]) -> None:
    built: list[Console] = []  # one per app; the app's own state is frozen once it runs

    def console_of(request: web.Request) -> Console:
        if not built:
            built.append(Console(request.app[runtime_key]))
        return built[0]

    async def shutdown(app: web.Application) -> None:
        for c in built:
            await c.hub.close()

    app.on_shutdown.append(shutdown)

    def page_route(fn: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def run(request: web.Request) -> web.StreamResponse:
            c = console_of(request)
            session = await c.access.session(request)
            if session is None:
                return web.Response(status=302, headers={"Location": SIGNIN_PATH, "Cache-Control": "no-store"})
            return await fn(request, c, session)

        return run

    def api_route(fn: Handler, *, action: bool = False) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def run(request: web.Request) -> web.StreamResponse:
            c = console_of(request)
            session = await c.access.session(request)
            if session is None:
                return json_error(401, f"sign in first: {SIGNIN_PATH}")
            if action and not await c.access.csrf_ok(request, session):
                return json_error(403, "missing or wrong X-CSRF-Token; reload the console page")
            return await fn(request, c, session)

        return run

    async def signin(request: web.Request) -> web.StreamResponse:
        return await _signin_page(console_of(request))

    async def link(request: web.Request) -> web.StreamResponse:
        return await console_of(request).access.take_ticket(request)

    async def login(request: web.Request) -> web.StreamResponse:
        return await console_of(request).access.login(request)

    async def callback(request: web.Request) -> web.StreamResponse:
        return await console_of(request).access.callback(request)

    r = app.router
    r.add_get("/console", page_route(_index))
    r.add_get("/console/static/{name}", page_route(_asset))
    r.add_get(SIGNIN_PATH, signin)
    r.add_get(LINK_PATH, link)
    r.add_get(LOGIN_PATH, login)
    r.add_get(CALLBACK_PATH, callback)
    r.add_post("/console/signout", api_route(_signout, action=True))
    r.add_get("/console/api/session", api_route(_session))
    r.add_get("/console/api/agents", api_route(_agents))
    r.add_get("/console/api/agents/{agent_id}", api_route(_agent))
    r.add_get("/console/api/ops", api_route(_ops))
    r.add_get("/console/api/quarantine/{item_id}", api_route(_quarantine_item))
    r.add_post("/console/api/outbox/{row_id}/retry", api_route(_retry, action=True))
    r.add_post("/console/api/quarantine/{item_id}/drop", api_route(_drop, action=True))
    r.add_get("/console/api/events", api_route(_events))


# ---------------------------------------------------------------------------------------- pages


async def _index(request: web.Request, c: Console, session: Session) -> web.StreamResponse:
    return web.Response(body=(STATIC / "index.html").read_bytes(), content_type="text/html", headers=SECURITY)


async def _asset(request: web.Request, c: Console, session: Session) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in ASSETS:
        return json_error(404, f"no console asset {name!r}")
    return web.Response(body=(STATIC / name).read_bytes(), content_type=ASSETS[name], headers=SECURITY)


async def _signin_page(c: Console) -> web.StreamResponse:
    problem = c.access.entra_problem
    entra = (
        f"<p class='note'>Sign-in with Microsoft Entra is not available here: {_h(problem)}.</p>"
        if problem
        else f"<p><a class='button' href='{LOGIN_PATH}'>Sign in with Microsoft</a></p>"
    )
    body = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<title>presence-sync console: sign in</title></head><body>"
        "<main id='signin'><h1>presence-sync console</h1>"
        "<p>Sign in to see every agent's presence in Dynamics 365 and Teams.</p>"
        f"{entra}<p>On the service's own machine, <code>presence-sync console link</code> prints a one-time "
        "link.</p></main></body></html>"
    )
    return web.Response(text=body, status=401, content_type="text/html", headers=SECURITY)


def _h(text: str) -> str:
    import html

    return html.escape(text)


# ---------------------------------------------------------------------------------------- API


async def _session(request: web.Request, c: Console, session: Session) -> web.StreamResponse:
    return web.json_response({"user": session.user, "via": session.via, "csrf": session.csrf(await c.access.key())})


async def _signout(request: web.Request, c: Console, session: Session) -> web.StreamResponse:
    response = web.json_response({"signed_out": True})
    response.del_cookie("presence_sync_console", path="/console")
    return response


def _int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(
            text=f'{{"error": "{name} must be a whole number"}}', content_type="application/json"
        ) from None
    return max(low, min(high, value))


async def _agents(request: web.Request, c: Console, session: Session) -> web.StreamResponse:
    sort = request.query.get("sort", "name")
    if sort not in SORTS:
        return json_error(400, f"sort must be one of {', '.join(SORTS)}")
    offset = _int(request, "offset", 0, 0, 10**9)
    limit = _int(request, "limit", 50, 1, MAX_PAGE)
    page = await c.reads.console_agents(
        search=request.query.get("q", "")[:200],
        sort=sort,
        descending=request.query.get("desc", "") in ("1", "true"),
        offset=offset,
        limit=limit,
    )
    outbox = await c.reads.console_outbox_for([r.agent.dynamics_user_id for r in page.rows])
    bridge = c.rt.bridge
    return web.json_response(
        views.agents_json(page, outbox, bridge.catalogue, bridge.rules, offset=offset, limit=limit)
    )


async def _agent(request: web.Request, c: Console, session: Session) -> web.StreamResponse:
    agent_id = request.match_info["agent_id"].strip().lower()
    agent = await c.rt.store.get_agent(agent_id)
    if agent is None:
        return json_error(404, f"no agent {agent_id} in the directory (see `presence-sync agents list`)")
    states = await c.rt.store.load_states([agent_id])
    outbox = await c.reads.console_outbox_for([agent_id])
    bridge = c.rt.bridge
    state = states.get(agent_id)
    row = views.AgentRow(agent, state, None)
    out: dict[str, Any] = {"agent": views.agent_row_json(row, outbox, bridge.catalogue, bridge.rules)}
    if state is None:
        out["explanation"] = None
        out["timeline"] = []
    else:
        out["explanation"] = views.explanation_json(state, bridge.catalogue, bridge.rules)
        out["timeline"] = views.timeline(state, list(outbox.values()), bridge.catalogue)
    out["outbox"] = [views.outbox_json(r, bridge.catalogue) for r in outbox.values()]
    return web.json_response(out)


async def _ops(request: web.Request, c: Console, session: Session) -> web.StreamResponse:
    rt = c.rt
    store = rt.store
    cat = rt.bridge.catalogue
    rows = {
        status.value: [views.outbox_json(r, cat) for r in await store.list_outbox(status, limit=50)]
        for status in (OutboxStatus.PENDING, OutboxStatus.IN_FLIGHT, OutboxStatus.DEAD)
    }
    health = rt.outbox.health
    upstreams = []
    for system in System:
        at = health.next_probe_at(system.value)
        upstreams.append(
            {"system": system.value, "breaker": health.state(system.value).value, "next_probe_at": views.iso(at)}
        )
    subscriptions: dict[str, Any] = {"configured": rt.subscriptions is not None, "rows": [], "problems": {}}
    if rt.subscriptions is not None:
        try:
            accounts = await rt.subscriptions.status()
            records = await rt.store.list_docs(SUBSCRIPTION_KIND)
            for account in accounts:
                record = records.get(str(account.get("account"))) or {}
                ids = record.get("ids") or []
                last = await c.reads.console_last_teams_report(ids) if ids else None
                account["last_report_at"] = views.iso(last)
                sub_id = record.get("subscription_id")
                notified = await rt.store.get_doc(NOTIFIED_KIND, str(sub_id)) if sub_id else None
                account["last_notification_at"] = (notified or {}).get("at")
            subscriptions["rows"] = accounts
            h = await rt.subscriptions.health()
            subscriptions["problems"] = {**h.problems, **{a: f"delivers to {u}" for a, u in h.misdirected.items()}}
            subscriptions["polled"] = h.polled
        except Exception as e:
            subscriptions["problems"] = {"(all)": f"cannot read subscriptions: {type(e).__name__}"}
    metrics = (await rt.telemetry.render(store)).decode()
    return web.json_response(
        {
            "outbox": {"counts": await store.outbox_counts(), **rows},
            "quarantine": {
                "count": await store.quarantine_count(),
                "dropped": await store.quarantine_dropped(),
                "items": [views.quarantine_json(i) for i in await store.list_quarantined(50)],
            },
            "spool": rt.spool.status().as_json() if rt.spool is not None else None,
            "subscriptions": subscriptions,
            "upstreams": upstreams,
            "metrics": views.metric_figures(metrics),
        }
    )


async def _quarantine_item(request: web.Request, c: Console, session: Session) -> web.StreamResponse:
    item_id = _path_int(request, "item_id")
    item = await c.rt.store.get_quarantined(item_id)
    if item is None:
        return json_error(404, f"no quarantined item {item_id} (it may have been dropped)")
    return web.json_response(views.quarantine_json(item, body=True))


async def _retry(request: web.Request, c: Console, session: Session) -> web.StreamResponse:
    row_id = _path_int(request, "row_id")
    n = await c.rt.store.retry_dead(row_id, c.rt.bridge.clock())
    if n == 0:
        return json_error(409, f"outbox row {row_id} is not a dead letter (any more); reload to see it")
    c.rt.outbox.wake()
    log.info("console action", extra={"fields": {"action": "outbox_retry", "row": row_id, "by": session.user}})
    return web.json_response({"retried": n})


async def _drop(request: web.Request, c: Console, session: Session) -> web.StreamResponse:
    item_id = _path_int(request, "item_id")
    if not await c.rt.store.drop_quarantined(item_id):
        return json_error(404, f"no quarantined item {item_id} (it may have been dropped already)")
    log.info("console action", extra={"fields": {"action": "quarantine_drop", "item": item_id, "by": session.user}})
    return web.json_response({"dropped": item_id})


async def _events(request: web.Request, c: Console, session: Session) -> web.StreamResponse:
    return await c.hub.stream(request)


def _path_int(request: web.Request, name: str) -> int:
    try:
        return int(request.match_info[name])
    except ValueError:
        raise web.HTTPNotFound() from None
