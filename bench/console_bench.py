"""How long the console's agents page takes to show its first page with 50,000 agents in the store.

    PYTHONPATH=. python bench/console_bench.py [--agents 50000] [--database-url URL] [--runs 5]

Fills a fresh store (SQLite in a temporary folder by default; a PostgreSQL URL works too) with the
agents and a saved sync state for each, serves the real app (``create_app``) on loopback, and
measures, in headless Chromium (``/usr/bin/chromium``, through Playwright):

- **page**: from navigating to ``/console`` until the first page of the table is on screen;
- beside it, as the baseline, the raw JSON API call the page makes (``/console/api/agents``), and
  the same call sorted by the Teams column and searched, which the database does as well.

Prints one line per figure (median and worst of ``--runs``). Nothing here reaches past 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from aiohttp import web
from cryptography.fernet import Fernet
from sqlalchemy import insert

from console.access import issue_link_ticket
from mapping.model import OOB_PRESENCE_IDS, Agent, AgentSyncState, BasePresence, Seen
from service.app import create_app
from service.runtime import Runtime
from service.settings import load_settings
from service.stack import free_port
from service.store.schema import agent_state
from service.store.state_doc import to_doc

CHROMIUM = "/usr/bin/chromium"
TEAMS = ["Available/Available", "Busy/InACall", "Away/Away", "DoNotDisturb/Presenting", "Busy/InAMeeting"]
BASES = list(BasePresence)


def agent(i: int) -> Agent:
    return Agent(f"{i:08x}-benc-4000-8000-00000000d365", f"{i:08x}-benc-4000-8000-0000000e0a1d", f"Agent {i:05d}")


def state(i: int, now: datetime) -> AgentSyncState:
    p = OOB_PRESENCE_IDS[BASES[i % len(BASES)]]
    s = AgentSyncState(agent(i).dynamics_user_id, own_dynamics=p, own_dynamics_by="SYSTEM", own_dynamics_at=now)
    s.own_teams, s.own_teams_since = TEAMS[i % len(TEAMS)], now - timedelta(seconds=i % 600)
    s.dynamics_seen = Seen(p, 1000 + i, now, now)
    s.teams_seen = Seen(s.own_teams, None, now, s.own_teams_since)
    return s


async def fill(rt: Runtime, n: int) -> None:
    store = rt.store
    agents = [agent(i) for i in range(n)]
    for start in range(0, n, 2000):
        await store.upsert_agents(agents[start : start + 2000])
    now = datetime.now(UTC)
    engine = store.engine  # type: ignore[attr-defined]
    async with engine.begin() as conn:
        for start in range(0, n, 2000):
            rows = [
                {"agent_id": agent(i).dynamics_user_id, "saved": True, "doc": to_doc(state(i, now)), "updated_at": now}
                for i in range(start, min(n, start + 2000))
            ]
            await conn.execute(insert(agent_state), rows)


def line(name: str, seconds: list[float]) -> str:
    return f"{name:<44} median {statistics.median(seconds) * 1000:8.1f} ms   worst {max(seconds) * 1000:8.1f} ms"


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--database-url", default="")
    args = ap.parse_args()
    from playwright.async_api import async_playwright

    with tempfile.TemporaryDirectory(prefix="console-bench-") as tmp:
        url = args.database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
        port = free_port()
        settings = load_settings(
            database_url=url,
            port=port,
            public_url=f"http://127.0.0.1:{port}",
            reconcile_interval_seconds=0,
            secret_key=Fernet.generate_key().decode(),
            spool_dir=str(Path(tmp) / "spool"),
            log_level="WARNING",
        )
        rt = await Runtime.open(settings)
        started = time.monotonic()
        await fill(rt, args.agents)
        print(f"store: {args.agents:,} agents with a saved state ({time.monotonic() - started:.1f} s to fill)")
        runner = web.AppRunner(create_app(settings, runtime=rt, background=False), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        base = f"http://127.0.0.1:{port}"
        try:
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
                context = await browser.new_context(viewport={"width": 1440, "height": 900})
                page = await context.new_page()
                await page.goto(f"{base}/console/link?ticket={await issue_link_ticket(rt.store)}")
                await page.wait_for_selector("#agents[data-loaded='1']")
                cookies = {c["name"]: c["value"] for c in await context.cookies()}
                shown: list[float] = []
                for _ in range(args.runs):
                    t0 = time.perf_counter()
                    await page.goto(f"{base}/console")
                    await page.wait_for_selector("#agents[data-loaded='1'] tbody tr")
                    shown.append(time.perf_counter() - t0)
                total = await page.locator("#count").inner_text()
                await browser.close()
            figures: dict[str, list[float]] = {}
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(base_url=base, cookie_jar=jar, cookies=cookies) as http:
                for name, query in (
                    ("API first page (name order)", "limit=50"),
                    ("API first page sorted by Teams, descending", "limit=50&sort=teams&desc=1"),
                    ("API search 'agent 4999'", "limit=50&q=agent%204999"),
                    ("API page 900 (offset 45,000)", "limit=50&offset=45000"),
                ):
                    times = []
                    for _ in range(args.runs):
                        t0 = time.perf_counter()
                        async with http.get(f"/console/api/agents?{query}") as resp:
                            assert resp.status == 200, await resp.text()
                            await resp.read()
                        times.append(time.perf_counter() - t0)
                    figures[name] = times
            print(f"table shows: {total}")
            print(line("agents page: /console until the first page shows", shown))
            for name, times in figures.items():
                print(line(name, times))
        finally:
            await runner.cleanup()
            await rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
