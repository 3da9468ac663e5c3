"""kill -9 during delivery (rule 7): ``presence-sync serve`` in a subprocess, killed with SIGKILL while
its rows are in flight to Graph, then restarted. With the same owner (host and port) the restarted
process takes its rows back at once; an instance with another owner takes them over once the dead
one's heartbeat is three intervals old. Either way every row lands long before the 30 s lease would
have let anyone claim it: each wait below is bounded well under it (a condition, not a timing)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from emulators.dataverse import AVAILABLE, DataverseEmulator
from emulators.graph import GraphEmulator
from mapping.model import Agent, SetPresence, System
from service.stack import TOKEN, agent_ids, free_port
from service.store.sql import open_store

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
AGENTS = 12
LEASE = 30.0
WAIT = 20.0
"""Bounded waits, below the lease: a row that waited out its lease would fail them."""


def agents() -> list[Agent]:
    return [Agent(*agent_ids(i), f"Agent {i:02d}") for i in range(1, AGENTS + 1)]


class Emulators:
    def __init__(self) -> None:
        self.graph = GraphEmulator(token=TOKEN)
        self.dataverse = DataverseEmulator(token=TOKEN)

    async def start(self) -> None:
        await self.dataverse.start()
        await self.graph.start()
        for a in agents():
            self.dataverse.add_agent(a.dynamics_user_id, a.entra_object_id, a.display_name, AVAILABLE, logged_in=True)
            self.graph.add_user(a.entra_object_id)

    async def stop(self) -> None:
        await self.graph.stop()
        await self.dataverse.stop()


@pytest.fixture
async def emulators() -> AsyncIterator[Emulators]:
    e = Emulators()
    await e.start()
    yield e
    await e.stop()


def env_for(tmp_path: Path, e: Emulators, port: int) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_SYNC_")}
    return base | {
        "PYTHONPATH": os.pathsep.join([str(REPO), base.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "PRESENCE_SYNC_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'store.db'}",
        "PRESENCE_SYNC_PORT": str(port),
        "PRESENCE_SYNC_AUTH_MODE": "static",
        "PRESENCE_SYNC_STATIC_TOKEN": TOKEN,
        "PRESENCE_SYNC_GRAPH_URL": e.graph.url,
        "PRESENCE_SYNC_DATAVERSE_URL": e.dataverse.url,
        "PRESENCE_SYNC_RECONCILE_INTERVAL_SECONDS": "0",
        "PRESENCE_SYNC_SECRET_KEY": Fernet.generate_key().decode(),
        "PRESENCE_SYNC_LOG_LEVEL": "WARNING",
    }


async def serve(tmp_path: Path, e: Emulators, port: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        env=env_for(tmp_path, e, port),
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def seed(tmp_path: Path) -> None:
    store = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    try:
        await store.upsert_agents(agents())
        async with store.transaction() as tx:
            for a in agents():
                await tx.enqueue(SetPresence(a.dynamics_user_id, System.TEAMS, "Busy/InACall", "test"), _now())
    finally:
        await store.close()


def _now():  # type: ignore[no-untyped-def]
    from mapping.clock import utcnow

    return utcnow()


async def counts(tmp_path: Path) -> dict[str, int]:
    store = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}", migrate=False)
    try:
        return await store.outbox_counts()
    finally:
        await store.close()


async def until(check, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.1)
    return False


def sessions(e: Emulators) -> int:
    return sum(1 for a in agents() if e.graph.sessions_of(a.entra_object_id))


async def kill_during_delivery(tmp_path: Path, e: Emulators, port: int) -> None:
    """Serves on ``port`` until all rows are in flight (Graph answers nothing for 12 s, below the
    writer's own time-out of half a lease), then SIGKILL."""
    await seed(tmp_path)
    e.graph.latency(12)
    first = await serve(tmp_path, e, port)
    try:

        async def in_flight() -> bool:
            return (await counts(tmp_path))["in_flight"] == AGENTS

        assert await until(in_flight, WAIT), await counts(tmp_path)
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
    e.graph.latency(0)


async def converged(tmp_path: Path, e: Emulators, started: float) -> float:
    async def delivered() -> bool:
        return (await counts(tmp_path))["delivered"] == AGENTS and sessions(e) == AGENTS

    assert await until(delivered, WAIT), (await counts(tmp_path), sessions(e))
    return time.monotonic() - started


@pytest.mark.parametrize("same_owner", [True, False], ids=["restart-same-owner", "takeover-other-owner"])
async def test_kill9_during_delivery_rows_are_delivered_after_the_restart(tmp_path, emulators, same_owner):
    port = free_port()
    await kill_during_delivery(tmp_path, emulators, port)
    if not same_owner:
        port = free_port()  # another owner (owner = host and port)
    started = time.monotonic()
    second = await serve(tmp_path, emulators, port)
    try:
        seconds = await converged(tmp_path, emulators, started)
        print(f"kill -9, {'same' if same_owner else 'other'} owner: converged {seconds:.1f} s after the restart")
        assert (await counts(tmp_path))["dead"] == 0
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(second.wait(), 10)
        except TimeoutError:
            second.kill()
            await second.wait()
