"""The webhook when the store does not commit in time: the change is spooled (fsync'd) and answered
202, requests within a commit timeout of that go straight to it, the spool is replayed in order once
the store answers, a new intake on the same spool file replays what an earlier process left, a
spooled body that is junk ends in the quarantine, and only an unwritable spool answers 503."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dataverse.webhook import DataverseIntake
from edge.spool import Spool, inspect
from mapping.bridge import Bridge
from mapping.memory import MemoryStore
from mapping.model import Agent, PresenceObserved
from tests.dataverse.conftest import Served, serve_intake
from tests.dataverse.test_webhook import post, update
from tests.support import ALICE, AVAILABLE, AWAY, BOB, BUSY, RecordingTelemetry, make_bridge

TIMEOUT = 0.2


class Gate:
    """Once ``close()``d, holds every store transaction until opened again: a store that cannot
    commit (a lock, a failover)."""

    def __init__(self, store: MemoryStore) -> None:
        self.opened = asyncio.Event()
        self.opened.set()
        self._real = store.transaction

    def close(self) -> None:
        self.opened.clear()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        await self.opened.wait()
        async with self._real() as tx:
            yield tx


@pytest.fixture
def gated(bridge: Bridge, monkeypatch: pytest.MonkeyPatch) -> Gate:
    assert isinstance(bridge.store, MemoryStore)
    gate = Gate(bridge.store)
    monkeypatch.setattr(bridge.store, "transaction", gate.transaction)
    return gate


@pytest.fixture
def observed(bridge: Bridge, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int | None]]:
    """(agent, RowVersion) of every observation handed to the core, in call order."""
    seen: list[tuple[str, int | None]] = []
    real = bridge.observe

    async def spy(event: PresenceObserved, *, intake: str | None = None) -> Any:
        seen.append((event.agent_id, event.version))
        return await real(event, intake=intake)

    monkeypatch.setattr(bridge, "observe", spy)
    return seen


async def spooled_intake(bridge: Bridge, path: Path, **kw: Any) -> Served:
    return await serve_intake(bridge, spool=Spool(path), commit_timeout=TIMEOUT, **kw)


async def test_a_store_that_does_not_commit_gets_the_change_spooled_then_replayed_in_order(
    bridge: Bridge,
    gated: Gate,
    observed: list[tuple[str, int | None]],
    http: aiohttp.ClientSession,
    telemetry: RecordingTelemetry,
    tmp_path: Path,
) -> None:
    await bridge.store.upsert_agents([ALICE, BOB])
    gated.close()
    served = await spooled_intake(bridge, tmp_path / "spool.bin")
    try:
        answers = []
        for body in (update(BUSY, row_version=10), update(AWAY, agent=BOB, row_version=11), b"junk"):
            answers.append(await post(http, served, body))
        answers.append(await post(http, served, update(AVAILABLE, row_version=12)))
        assert [status for status, _ in answers] == [202] * 4
        assert all(body["status"] == "spooled" for _, body in answers), answers
        assert "did not commit within 0.2 s" in answers[0][1]["detail"]
        # Within a commit timeout of the store failing, the next ones go straight to the spool; a
        # slower client's later request tries the store again and is spooled after its own timeout.
        assert all(
            "did not answer the last request in time" in b["detail"] or "did not commit within" in b["detail"]
            for _, b in answers[1:]
        )
        assert inspect(tmp_path / "spool.bin").records == 4  # on disk before the answers
        assert await bridge.store.load_states([ALICE.dynamics_user_id]) == {}
        gated.opened.set()  # the store answers again
        await served.intake.wait_idle()
    finally:
        await served.close()
    firsts = list(dict.fromkeys(observed))  # the first request's own attempt also commits: a duplicate
    assert [v for a, v in firsts if a == ALICE.dynamics_user_id] == [10, 12]
    assert [v for a, v in firsts if a == BOB.dynamics_user_id] == [11]
    states = await bridge.store.load_states([ALICE.dynamics_user_id, BOB.dynamics_user_id])
    assert (
        states[ALICE.dynamics_user_id].dynamics_seen.value,
        states[ALICE.dynamics_user_id].dynamics_seen.version,
    ) == (
        AVAILABLE,
        12,
    )
    assert states[BOB.dynamics_user_id].dynamics_seen.value == AWAY
    (junk,) = await bridge.quarantine.list_quarantined()
    assert (junk.reason, junk.body) == ("invalid_json", b"junk")
    assert telemetry.events[("dataverse_webhook", "spooled")] == 4
    assert telemetry.events[("dataverse_webhook", "replayed")] == 4
    assert inspect(tmp_path / "spool.bin").records == 0


async def test_a_failing_store_is_spooled_too(
    bridge: Bridge, http: aiohttp.ClientSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await bridge.store.upsert_agents([ALICE])
    real = bridge.store.transaction

    def broken(*_: Any, **__: Any) -> Any:
        raise ConnectionResetError("database connection lost")

    monkeypatch.setattr(bridge.store, "transaction", broken)
    served = await spooled_intake(bridge, tmp_path / "spool.bin")
    try:
        status, body = await post(http, served, update(BUSY, row_version=20))
        assert (status, body["status"]) == (202, "spooled")
        assert "database connection lost" in body["detail"]
        monkeypatch.setattr(bridge.store, "transaction", real)
        await served.intake.wait_idle()
    finally:
        await served.close()
    state = (await bridge.store.load_states([ALICE.dynamics_user_id]))[ALICE.dynamics_user_id]
    assert (state.dynamics_seen.value, state.dynamics_seen.version) == (BUSY, 20)


async def test_an_unwritable_spool_is_the_only_503(
    bridge: Bridge, gated: Gate, http: aiohttp.ClientSession, tmp_path: Path, telemetry: RecordingTelemetry
) -> None:
    await bridge.store.upsert_agents([ALICE])
    gated.close()
    (tmp_path / "file").write_text("a file where the spool folder should be")
    served = await spooled_intake(bridge, tmp_path / "file" / "spool.bin")
    try:
        status, body = await post(http, served, update(BUSY))
    finally:
        gated.opened.set()
        await served.close()
    assert status == 503
    assert "spool cannot be written" in body["error"] and "send it again" in body["error"]
    assert telemetry.rejections[("dataverse_webhook", "unavailable")] == 1


async def test_a_restarted_intake_replays_the_spool_it_finds_first(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    path = tmp_path / "spool.bin"
    before = make_bridge()
    await before.store.upsert_agents([ALICE])
    assert isinstance(before.store, MemoryStore)
    gate = Gate(before.store)
    before.store.transaction = gate.transaction  # type: ignore[method-assign]
    gate.close()
    served = await spooled_intake(before, path)
    try:
        for version in (30, 31):
            assert (await post(http, served, update(BUSY if version == 30 else AWAY, row_version=version)))[0] == 202
    finally:
        await served.close()  # the store never answered: as after kill -9, the records stay on disk
    assert inspect(path).records == 2

    after = make_bridge()  # a new process (and here, a store that answers)
    await after.store.upsert_agents([ALICE])
    intake = DataverseIntake(after, webhook_key="k" * 16, client=None, spool=Spool(path), commit_timeout=TIMEOUT)
    await intake.start()
    try:
        await intake.wait_idle()
    finally:
        await intake.stop()
    state = (await after.store.load_states([ALICE.dynamics_user_id]))[ALICE.dynamics_user_id]
    assert (state.dynamics_seen.value, state.dynamics_seen.version) == (AWAY, 31)
    assert inspect(path).records == 0


async def test_a_record_the_store_keeps_refusing_while_it_works_is_quarantined(
    bridge: Bridge, http: aiohttp.ClientSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poison record (a bug, not an outage) must not hold the spool up forever."""
    await bridge.store.upsert_agents(
        [ALICE, Agent("b0b0b0b0-0000-4000-8000-0000000000b0", "e0e0e0e0-0000-4000-8000-0000000000e0")]
    )
    path = tmp_path / "spool.bin"
    served = await spooled_intake(bridge, path)
    real_observe = bridge.observe

    async def poison(event: PresenceObserved, *, intake: str | None = None) -> Any:
        if event.version == 40:
            raise KeyError("a bug in the core")
        return await real_observe(event, intake=intake)

    monkeypatch.setattr(bridge, "observe", poison)
    try:
        status, body = await post(http, served, update(BUSY, row_version=40))
        assert (status, body["status"]) == (202, "spooled")
        status, body = await post(http, served, update(AWAY, row_version=41))
        assert (status, body["status"]) == (202, "spooled")
        await served.intake.wait_idle(timeout=15)
    finally:
        await served.close()
    (item,) = await bridge.quarantine.list_quarantined()
    assert item.reason == "replay_failed" and "KeyError" in item.detail
    assert json.loads(item.body)["MessageName"] == "Update"
    state = (await bridge.store.load_states([ALICE.dynamics_user_id]))[ALICE.dynamics_user_id]
    assert (state.dynamics_seen.value, state.dynamics_seen.version) == (AWAY, 41)


@pytest.mark.postgres
async def test_postgres_locked_table_spools_then_replays(
    pg_url: str, open_sql: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """PostgreSQL path: another session holds an exclusive lock on ``agent_state`` (as a long
    migration or a stuck transaction would); the change is spooled, then replayed once it ends."""
    import asyncpg

    store = await open_sql(pg_url)
    bridge = make_bridge(store=store)
    await store.upsert_agents([ALICE])
    server, schema = pg_url.replace("postgresql+asyncpg://", "postgresql://").split("?schema=")
    locker = await asyncpg.connect(server, server_settings={"search_path": schema})
    served = await spooled_intake(bridge, tmp_path / "spool.bin")
    try:
        tx = locker.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE agent_state IN ACCESS EXCLUSIVE MODE")
        status, body = await post(http, served, update(BUSY, row_version=50))
        assert (status, body["status"]) == (202, "spooled"), body
        await tx.rollback()
        await served.intake.wait_idle(timeout=20)
    finally:
        await served.close()
        await locker.close()
    state = (await store.load_states([ALICE.dynamics_user_id]))[ALICE.dynamics_user_id]
    assert (state.dynamics_seen.value, state.dynamics_seen.version) == (BUSY, 50)


async def test_once_the_store_answers_again_new_changes_do_not_wait_behind_the_spool(
    bridge: Bridge,
    gated: Gate,
    observed: list[tuple[str, int | None]],
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A spool replayed one change at a time never catches up with arrivals that all go behind it
    (seen under load: 498 of 500 webhooks spooled after one slow commit). Past one commit timeout, a
    new change tries the store even while older ones wait, and rule 4 keeps the newest version."""
    await bridge.store.upsert_agents([ALICE])
    gated.close()
    served = await spooled_intake(bridge, tmp_path / "spool.bin")
    try:
        status, body = await post(http, served, update(BUSY, row_version=10))
        assert (status, body["status"]) == (202, "spooled")
        await served.intake._replayer.stop()  # a replayer that has not caught up yet
        served.intake._store_suspect_until = 0.0  # one commit timeout has passed
        gated.opened.set()  # the store answers again
        status, body = await post(http, served, update(AVAILABLE, row_version=12))
        assert (status, body["status"]) == (200, "recorded"), body
        assert served.intake.spool is not None and served.intake.spool.records == 1  # still waiting
        served.intake._replayer.start(at_once=True)
        await served.intake.wait_idle()
    finally:
        await served.close()
    state = (await bridge.store.load_states([ALICE.dynamics_user_id]))[ALICE.dynamics_user_id]
    assert (state.dynamics_seen.value, state.dynamics_seen.version) == (AVAILABLE, 12)  # 10, replayed late, is stale
