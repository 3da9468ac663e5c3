"""``presence-sync``: the console script of the interface contract.

Misuse or bad configuration prints one line saying what and where, and exits 2; every command
applies pending migrations itself, so it works on a fresh store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn
from urllib.parse import urlsplit

from mapping.errors import ConfigError, UpstreamError
from mapping.model import OutboxStatus
from mapping.redact import redact
from service import logs
from service.settings import Settings, load_settings

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def say(line: str = "") -> None:
    print(line, flush=True)


def progress(line: str) -> None:
    print(f"  … {line}", file=sys.stderr, flush=True)


def fail(line: str, code: int = EXIT_USAGE) -> int:
    print(f"presence-sync: {line}", file=sys.stderr, flush=True)
    return code


async def _store(settings: Settings) -> Any:
    from service.runtime import open_configured_store

    return await open_configured_store(settings)


async def _runtime(settings: Settings) -> Any:
    from service.runtime import Runtime

    return await Runtime.open(settings)


# --- commands -------------------------------------------------------------------------------------


async def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from aiohttp import web

    from service.app import create_app, freeze_start_up
    from service.runtime import Runtime, serve_owner

    logs.configure(json_lines=True, level=settings.log_level)
    # Fail fast, with one line, before binding the port. The lease owner survives a restart (host
    # and port: two instances on one host cannot share a port), so rows in flight are taken back.
    runtime = await Runtime.open(settings, owner=serve_owner(settings))
    freeze_start_up()  # before the app starts its work: what that work makes stays collectable
    app = create_app(settings, runtime=runtime)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        try:
            await site.start()
        except OSError as e:
            raise ConfigError(
                f"cannot listen on {settings.host}:{settings.port} "
                f"(PRESENCE_SYNC_HOST/PRESENCE_SYNC_PORT): {e.strerror}"
            ) from None
        print(
            f"presence-sync serving on http://{settings.host}:{settings.port} (Ctrl+C stops)",
            file=sys.stderr,
            flush=True,
        )
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await runtime.close()
    return 0


async def cmd_demo(settings: Settings | None, args: argparse.Namespace) -> int:
    from service.demo import MIN_AGENTS, run_demo

    if args.agents < MIN_AGENTS:
        return fail(f"--agents must be at least {MIN_AGENTS} (the scripted day needs Alice, Bob and Carol)")
    if args.speed < 0:
        return fail("--speed must be 0 or more (0: no pauses between steps)")
    return await run_demo(
        say, agents=args.agents, speed=args.speed, keep_running=_forever if args.keep_running else None
    )


async def _forever() -> None:
    """Until Ctrl+C (which cancels the wait; the demo then stops the emulators and the service)."""
    await asyncio.Event().wait()


async def cmd_console_link(settings: Settings, args: argparse.Namespace) -> int:
    from console.access import TICKET_TTL, issue_link_ticket
    from edge.upstream import is_loopback

    host = settings.host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif not is_loopback(host):
        return fail(
            f"the one-time console link works from loopback only, and `serve` listens on {settings.host} only: "
            "set PRESENCE_SYNC_HOST to 127.0.0.1 or 0.0.0.0, or sign in with Entra "
            "(PRESENCE_SYNC_CONSOLE_ALLOWED_GROUP_ID / PRESENCE_SYNC_CONSOLE_ALLOWED_ROLE)"
        )
    store = await _store(settings)
    try:
        ticket = await issue_link_ticket(store)
    finally:
        await store.close()
    netloc = f"[{host}]" if ":" in host else host
    say(f"http://{netloc}:{settings.port}/console/link?ticket={ticket}")
    progress(
        f"open it on this machine within {int(TICKET_TTL.total_seconds() // 60)} minutes; it signs in once "
        "(the running `serve` must use the same PRESENCE_SYNC_DATABASE_URL)"
    )
    return 0


async def cmd_doctor(settings: Settings, args: argparse.Namespace) -> int:
    from service.doctor import run_doctor

    return await run_doctor(settings, say)


async def cmd_db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    from service.store.sql import upgrade

    applied = await upgrade(settings.database_url)
    say(f"applied {len(applied)} migration(s): {', '.join(applied)}" if applied else "store schema is current")
    return 0


async def cmd_agents_import(settings: Settings, args: argparse.Namespace) -> int:
    from mapping.directory import read_agents_csv

    report = read_agents_csv(args.file)
    if report.errors:
        for e in report.errors:
            print(e, file=sys.stderr)
        return fail(f"{args.file}: {len(report.errors)} problem(s); nothing was imported")
    store = await _store(settings)
    try:
        try:
            results = await store.upsert_agents(report.agents)
        except ValueError as e:
            return fail(f"{args.file}: {e}; nothing was imported")
    finally:
        await store.close()
    counts = {k: sum(1 for v in results.values() if v == k) for k in ("added", "updated", "unchanged")}
    say(
        f"imported {len(results)} agent(s) from {args.file}: {counts['added']} added, "
        f"{counts['updated']} updated, {counts['unchanged']} unchanged"
    )
    return 0


async def cmd_agents_list(settings: Settings, args: argparse.Namespace) -> int:
    store = await _store(settings)
    try:
        if args.unknown:
            rows = await store.list_unknown()
            say(f"{'system':<9} {'id':<37} {'count':>6}  last seen")
            for r in rows:
                # Ids come from callers: one that happens to hold a secret is masked like any upstream text.
                say(f"{r['system']:<9} {redact(str(r['id'])):<37} {r['count']:>6}  {r.get('last_seen')}")
            say(f"{len(rows)} unknown id(s)")
            return 0
        agents = await store.list_agents()
        states = await store.load_states([a.dynamics_user_id for a in agents])
        presences = {p.presence_id: p.name for p in await store.list_presences()}
        say(
            f"{'display name':<24} {'dynamics systemuserid':<37} {'entra object id':<37} {'on':<3} "
            f"{'dynamics':<12} teams"
        )
        for a in agents:
            st = states.get(a.dynamics_user_id)
            dyn = presences.get(st.dynamics_seen.value or "", st.dynamics_seen.value or "-") if st else "-"
            teams = (st.teams_seen.value or "-") if st else "-"
            say(
                f"{a.display_name[:24]:<24} {a.dynamics_user_id:<37} {a.entra_object_id:<37} "
                f"{'yes' if a.enabled else 'no':<3} {dyn[:12]:<12} {teams}"
            )
        say(f"{len(agents)} agent(s)")
    finally:
        await store.close()
    return 0


def _dataverse_client(rt: Any, command: str) -> Any:
    if rt.dataverse is None:
        raise ConfigError(f"{command} needs PRESENCE_SYNC_DATAVERSE_URL (e.g. https://contoso.crm.dynamics.com)")
    return rt.dataverse


async def cmd_agents_discover(settings: Settings, args: argparse.Namespace) -> int:
    from dataverse.discovery import discover_agents

    rt = await _runtime(settings)
    try:
        client = _dataverse_client(rt, "agents discover")
        summary = await discover_agents(client, rt.bridge, progress, agents_only=not args.all_users)
    finally:
        await rt.close()
    say(str(summary))
    return 0


async def cmd_dataverse_register_webhook(settings: Settings, args: argparse.Namespace) -> int:
    from dataverse.registration import register_webhook

    if not settings.public_url:
        return fail("dataverse register-webhook needs PRESENCE_SYNC_PUBLIC_URL: the URL Dataverse calls")
    rt = await _runtime(settings)
    try:
        client = _dataverse_client(rt, "dataverse register-webhook")
        result = await register_webhook(
            client,
            url=settings.public("/api/dataverse/webhook"),
            key=settings.dataverse_webhook_key,
            dry_run=args.dry_run,
            progress=progress,
        )
    finally:
        await rt.close()
    say(str(result))
    return 0


async def cmd_outbox_list(settings: Settings, args: argparse.Namespace) -> int:
    store = await _store(settings)
    try:
        status = OutboxStatus(args.status) if args.status else None
        rows = await store.list_outbox(status, limit=args.limit)
        counts = await store.outbox_counts()
    finally:
        await store.close()
    say(f"{'id':>6} {'status':<10} {'system':<9} {'agent':<37} {'tries':>5} {'next try':<20} value / last error")
    for r in rows:
        nxt = r.next_attempt_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if r.next_attempt_at else "-"
        say(
            f"{r.id:>6} {r.status.value:<10} {r.system.value:<9} {r.agent_id:<37} {r.attempts:>5} {nxt:<20} "
            f"{r.value}{'  ! ' + redact(r.last_error) if r.last_error else ''}"
        )
    say(" ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


async def cmd_outbox_retry(settings: Settings, args: argparse.Namespace) -> int:
    if args.id is None and not args.all_dead:
        return fail("outbox retry needs an ID or --all-dead")
    store = await _store(settings)
    try:
        n = await store.retry_dead(None if args.all_dead else args.id, datetime.now(UTC))
    finally:
        await store.close()
    if n == 0 and args.id is not None:
        return fail(f"outbox row {args.id} is not a dead letter (see `presence-sync outbox list --status dead`)")
    say(f"{n} dead letter(s) queued again; a running `serve` delivers them")
    return 0


async def cmd_quarantine_list(settings: Settings, args: argparse.Namespace) -> int:
    if args.limit < 1:
        return fail("--limit must be at least 1")
    store = await _store(settings)
    try:
        items = await store.list_quarantined(limit=args.limit)
        held = await store.quarantine_count()
        dropped = await store.quarantine_dropped()
    finally:
        await store.close()
    say(f"{'id':>6} {'received (UTC)':<19} {'route':<18} {'reason':<16} {'size':>8}  detail")
    for q in items:
        received = q.received_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        say(f"{q.id:>6} {received:<19} {q.route:<18} {q.reason:<16} {q.size:>8}  {redact(q.detail)[:160]}")
    shown = f"newest {len(items)} of " if held > len(items) else ""
    say(
        f"{shown}{held} item(s) held (at most {settings.quarantine_max_items}), {dropped} dropped for room; "
        "`presence-sync quarantine show ID` shows one"
    )
    return 0


def _shown_body(body: bytes) -> str:
    """The body for a person: pretty-printed when it is JSON, else as text (bad bytes escaped)."""
    try:
        return json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):
        return body.decode("utf-8", "backslashreplace")


async def cmd_quarantine_show(settings: Settings, args: argparse.Namespace) -> int:
    store = await _store(settings)
    try:
        item = await store.get_quarantined(args.id)
    finally:
        await store.close()
    if item is None:
        return fail(f"quarantine item {args.id} does not exist (see `presence-sync quarantine list`)")
    say(f"id:       {item.id}")
    say(f"received: {item.received_at.astimezone(UTC).isoformat()}")
    say(f"route:    {item.route}")
    say(f"reason:   {item.reason}")
    say(f"size:     {item.size} bytes")
    say(f"detail:   {redact(item.detail)}")
    say("body:")
    say(redact(_shown_body(item.body)))
    return 0


async def cmd_quarantine_drop(settings: Settings, args: argparse.Namespace) -> int:
    store = await _store(settings)
    try:
        dropped = await store.drop_quarantined(args.id)
    finally:
        await store.close()
    if not dropped:
        return fail(f"quarantine item {args.id} does not exist (see `presence-sync quarantine list`)")
    say(f"dropped quarantine item {args.id}")
    return 0


async def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    rt = await _runtime(settings)
    try:
        summary = await rt.reconcile(progress)
        progress("delivering repairs")
        await rt.outbox.drain(timeout=args.timeout)
        counts = await rt.store.outbox_counts()
    finally:
        await rt.close()
    say(summary.line())
    for e in summary.errors:
        say(f"  error: {e}")
    if counts.get("pending", 0) or counts.get("in_flight", 0):
        say(
            f"  {counts.get('pending', 0)} repair(s) still queued (upstream slow or throttled); "
            "`serve` will deliver them"
        )
    return 1 if summary.failed else 0


async def cmd_graph_login(settings: Settings, args: argparse.Namespace) -> int:
    from graph_sync.login import device_code_login

    if settings.auth_mode == "static":
        return fail(
            "graph login signs in a real account; with AUTH_MODE=static the subscriber accounts are "
            "PRESENCE_SYNC_STATIC_SUBSCRIBER_TOKENS"
        )
    if args.web:
        return await _graph_login_web(settings)
    if not settings.tenant_id or not settings.client_id:
        return fail("graph login needs PRESENCE_SYNC_TENANT_ID and PRESENCE_SYNC_CLIENT_ID")
    store = await _store(settings)
    try:
        info = await device_code_login(tenant_id=settings.tenant_id, client_id=settings.client_id, store=store, out=say)
    finally:
        await store.close()
    say(f"signed in {info}")
    return 0


WEB_LOGIN_WAIT = 25 * 60.0
"""How long ``graph login --web`` waits: the link's 15 minutes plus the 10 a started sign-in may take."""


async def _graph_login_web(settings: Settings) -> int:
    """Prints the one-time link to the running service's ``/auth/graph/login`` and waits (bounded,
    Ctrl+C stops waiting) until the service reports the sign-in's outcome through the shared store."""
    from graph_sync.web_login import LOGIN_PATH, TICKET_TTL, issue_ticket, wait_for_sign_in

    missing = [
        name
        for name, value in (
            ("PRESENCE_SYNC_PUBLIC_URL (the service's URL; Entra redirects the browser to it)", settings.public_url),
            ("PRESENCE_SYNC_TENANT_ID", settings.tenant_id),
            ("PRESENCE_SYNC_CLIENT_ID", settings.client_id),
            (
                "PRESENCE_SYNC_CLIENT_CERT_PATH or PRESENCE_SYNC_CLIENT_SECRET",
                settings.client_cert_path or settings.client_secret,
            ),
        )
        if not value
    ]
    if missing:
        return fail(f"graph login --web needs {', '.join(missing)}")
    store = await _store(settings)
    try:
        ticket = await issue_ticket(store)
        say(
            "Open this link in a browser and sign in with the subscriber account (it works once, for "
            f"{TICKET_TTL.seconds // 60} minutes; `presence-sync serve` must be running at PRESENCE_SYNC_PUBLIC_URL):"
        )
        say(f"  {settings.public(LOGIN_PATH)}?ticket={ticket}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WEB_LOGIN_WAIT
        result = None
        while result is None and loop.time() < deadline:
            left = deadline - loop.time()
            progress(
                f"waiting for the sign-in to complete in the browser ({left / 60:.0f} min left; Ctrl+C stops waiting)"
            )
            result = await wait_for_sign_in(store, ticket, timeout=min(60.0, left))
    finally:
        await store.close()
    if result is None:
        return fail("no sign-in completed in time; run `presence-sync graph login --web` again for a new link", 1)
    if result.get("error"):
        return fail(f"graph login --web: {result['error']}", 1)
    tenant = f" (tenant {result['tenant_id']})" if result.get("tenant_id") else ""
    say(f"signed in {result.get('username')}{tenant}; `presence-sync graph subscriptions` lists its subscriptions")
    return 0


async def cmd_graph_subscriptions(settings: Settings, args: argparse.Namespace) -> int:
    rt = await _runtime(settings)
    try:
        if rt.subscriptions is None:
            return fail("no subscriptions: PRESENCE_SYNC_PUBLIC_URL is not set, so Graph cannot reach the service")
        if args.sync:
            report = await rt.subscriptions.sync()
            say(str(report))
        rows = await rt.subscriptions.status()
    finally:
        await rt.close()
    if not rows:
        say("no subscriptions yet (a running `serve` creates them; or run with --sync)")
    for r in rows:
        say("  ".join(f"{k}={v}" for k, v in r.items()))
    return 0


async def cmd_teams_package(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from bot.package import build_teams_package

    domains = [urlsplit(settings.public_url).hostname or ""] if settings.public_url else []
    website = settings.public_url if settings.public_url.startswith("https://") else None
    path = build_teams_package(
        app_id=settings.bot_app_id,
        output=Path(args.output),
        valid_domains=[d for d in domains if d],
        website_url=website,
    )
    say(f"wrote {path}: upload it in Teams admin center (Manage apps > Upload) or Teams (Apps > Manage your apps)")
    return 0


# --- parser ---------------------------------------------------------------------------------------

Command = Callable[[Settings, argparse.Namespace], Awaitable[int]]


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="presence-sync",
        description="Keep agents' presence identical in Dynamics 365 "
        "Contact Center and Microsoft Teams. Settings come from PRESENCE_SYNC_* variables or .env.",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    def add(name: str, fn: Command, help: str, parent: Any = sub) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    add("serve", cmd_serve, "run the service (webhooks, notifications, bot, workers)")
    demo = add("demo", cmd_demo, "play a contact-center day against local emulators (no account, no network)")
    demo.add_argument("--agents", type=int, default=3, help="agents in the day (at least 3; default 3)")
    demo.add_argument(
        "--speed", type=float, default=1.0, help="pause scale between steps: 2 = twice as fast, 0 = no pauses"
    )
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="after the day, keep the emulators and the service up and print the console link (Ctrl+C stops)",
    )

    agents = add("agents", None, "the agent directory")  # type: ignore[arg-type]
    asub = agents.add_subparsers(dest="agents_command", required=True, parser_class=OneLineParser)
    imp = add("import", cmd_agents_import, "import FILE.csv (dynamics_user_id,entra_object_id,display_name)", asub)
    imp.add_argument("file")
    ls = add("list", cmd_agents_list, "list agents and their last known presence", asub)
    ls.add_argument("--unknown", action="store_true", help="list ids seen in events but not in the directory")

    disc = add("discover", cmd_agents_discover, "add agents from Dataverse systemusers (msdyn_agentstatus rows)", asub)
    disc.add_argument(
        "--all-users", action="store_true", help="take every user with an Entra object id, not only agents"
    )

    dv = add("dataverse", None, "the Dataverse side")  # type: ignore[arg-type]
    dvsub = dv.add_subparsers(dest="dataverse_command", required=True, parser_class=OneLineParser)
    reg = add(
        "register-webhook",
        cmd_dataverse_register_webhook,
        "create or update the webhook and its Create/Update steps on msdyn_agentstatus",
        dvsub,
    )
    reg.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")

    add("doctor", cmd_doctor, "check settings, store, tokens, permissions, webhook, subscriptions before going live")

    add("reconcile", cmd_reconcile, "read both systems now and repair drift").add_argument(
        "--timeout", type=float, default=60.0, help="seconds to spend delivering repairs (default 60)"
    )

    graph = add("graph", None, "Microsoft Graph subscriber accounts and subscriptions")  # type: ignore[arg-type]
    gsub = graph.add_subparsers(dest="graph_command", required=True, parser_class=OneLineParser)
    gl = add("login", cmd_graph_login, "sign in a subscriber account (device code; --web: through the service)", gsub)
    gl.add_argument(
        "--web",
        action="store_true",
        help="print a one-time link to the running service's sign-in page (authorization code with the app's "
        "own certificate or secret; no public client flow, no device code)",
    )
    gs = add("subscriptions", cmd_graph_subscriptions, "list accounts, subscriptions and expiry", gsub)
    gs.add_argument("--sync", action="store_true", help="create/renew subscriptions now")

    tp = add("teams-package", cmd_teams_package, "build the Teams app package (zip)")
    tp.add_argument(
        "--output", default="presence-sync-teams.zip", help="zip to write (default presence-sync-teams.zip)"
    )

    ob = add("outbox", None, "commands waiting for delivery, and dead letters")  # type: ignore[arg-type]
    osub = ob.add_subparsers(dest="outbox_command", required=True, parser_class=OneLineParser)
    ol = add("list", cmd_outbox_list, "list outbox rows", osub)
    ol.add_argument("--status", choices=[s.value for s in OutboxStatus])
    ol.add_argument("--limit", type=int, default=100)
    orr = add("retry", cmd_outbox_retry, "queue a dead letter again (ID, or --all-dead)", osub)
    orr.add_argument("id", nargs="?", type=int)
    orr.add_argument("--all-dead", action="store_true")

    qa = add("quarantine", None, "webhook bodies the bridge could not use, kept instead of refused")  # type: ignore[arg-type]
    qsub = qa.add_subparsers(dest="quarantine_command", required=True, parser_class=OneLineParser)
    ql = add("list", cmd_quarantine_list, "list quarantined items, newest first", qsub)
    ql.add_argument("--limit", type=int, default=100, help="items to show (default 100)")
    add("show", cmd_quarantine_show, "one item with its body (secrets masked)", qsub).add_argument("id", type=int)
    add("drop", cmd_quarantine_drop, "drop one item", qsub).add_argument("id", type=int)

    con = add("console", None, "the operations console (GET /console on the running service)")  # type: ignore[arg-type]
    consub = con.add_subparsers(dest="console_command", required=True, parser_class=OneLineParser)
    add("link", cmd_console_link, "print a one-time sign-in link to the console (open it on this machine)", consub)

    db = add("db", None, "the store")  # type: ignore[arg-type]
    dbsub = db.add_subparsers(dest="db_command", required=True, parser_class=OneLineParser)
    add("upgrade", cmd_db_upgrade, "apply pending migrations", dbsub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("serve",):
        logs.configure(json_lines=False, level="WARNING")
    try:
        # demo builds its own settings from the emulators: the environment must not point it elsewhere
        settings = None if args.command == "demo" else load_settings()
        return asyncio.run(args.fn(settings, args))
    except ConfigError as e:
        return fail(str(e))
    except UpstreamError as e:
        return fail(f"upstream error: {e.message}", 1)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
