"""``presence-sync console link`` and ``demo --keep-running``: the one-time link an admin opens on
the service's machine signs in to the running console, once."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from service.demo import run_demo
from service.runtime import Runtime
from tests.service.test_cli import run_cli

ROOT = str(Path(__file__).resolve().parents[2])  # this checkout's code, whatever the subprocess's cwd
LINK = re.compile(r"(http://127\.0\.0\.1:\d+/console/link\?ticket=[\w-]+)")


@pytest.mark.slow
async def test_console_link_signs_in_to_the_running_service_once(tmp_path):
    from service.app import create_app
    from service.settings import load_settings
    from tests.service.test_web_login import free_port

    port = free_port()
    env = {
        "PRESENCE_SYNC_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'store.db'}",
        "PRESENCE_SYNC_PORT": str(port),
        "PYTHONPATH": ROOT,
    }
    r = await asyncio.to_thread(run_cli, "console", "link", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    [link] = LINK.findall(r.stdout)
    assert f":{port}/" in link
    settings = load_settings(database_url=env["PRESENCE_SYNC_DATABASE_URL"], port=port, reconcile_interval_seconds=0)
    rt = await Runtime.open(settings)
    runner = web.AppRunner(create_app(settings, runtime=rt, background=False), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.get(link) as resp:
                assert resp.status == 200
                assert "presence-sync console" in await resp.text()
            async with http.get(link) as resp:
                assert resp.status == 403  # used already
    finally:
        await runner.cleanup()
        await rt.close()


def test_console_link_refuses_a_service_listening_off_loopback_only(tmp_path):
    env = {
        "PRESENCE_SYNC_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'store.db'}",
        "PRESENCE_SYNC_HOST": "10.1.2.3",
        "PYTHONPATH": ROOT,
    }
    r = run_cli("console", "link", env=env, cwd=tmp_path)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "loopback only" in r.stderr


@pytest.mark.slow
async def test_demo_keep_running_prints_a_console_link_that_works(tmp_path):
    lines: list[str] = []
    seen: dict[str, int] = {}

    async def look_around() -> None:
        [link] = [m for line in lines for m in LINK.findall(line)]
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.get(link) as resp:
                seen["page"] = resp.status
            base = link.split("/console/")[0]
            async with http.get(f"{base}/console/api/agents") as resp:
                seen["agents"] = (await resp.json())["total"]

    async with asyncio.timeout(120):
        code = await run_demo(lines.append, agents=3, speed=0, workdir=tmp_path, keep_running=look_around)
    assert code == 0, "\n".join(lines)
    assert seen == {"page": 200, "agents": 3}
