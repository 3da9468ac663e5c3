"""What only the SQL store promises: errors an admin can act on, secrets encrypted at rest, UTC
datetimes, and the locking that makes several writers safe."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select, text

from mapping.errors import ConfigError
from mapping.model import AgentSyncState, SetPresence, System, Write
from service.store import SqlStore, open_store
from service.store.schema import secrets
from service.store.secrets import KEY_MISSING
from tests.conftest import SECRET_KEY
from tests.support import ALICE, BUSY, T0

OpenSql = Callable[..., Awaitable[SqlStore]]


# Configuration errors: one line, naming the setting, never the password ---------------------------


async def test_unreachable_postgres_is_one_clear_line() -> None:
    with pytest.raises(ConfigError) as caught:
        await open_store("postgresql+asyncpg://postgres:s3cret@127.0.0.1:5999/test")
    message = str(caught.value)
    assert message == (
        "PRESENCE_SYNC_DATABASE_URL: cannot connect to postgresql+asyncpg://postgres@127.0.0.1:5999/test: "
        "connection refused"
    )


async def test_plain_postgres_scheme_is_accepted_and_password_hidden() -> None:
    with pytest.raises(ConfigError) as caught:
        await open_store("postgresql://u:hunter2@127.0.0.1:5999/db", migrate=False)
    assert "postgresql+asyncpg://u@127.0.0.1:5999/db" in str(caught.value)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql+aiomysql://root:pw@localhost/db", "unsupported database 'mysql+aiomysql'"),
        ("not a url at all", "cannot parse"),
        ("sqlite+aiosqlite://", "names no database file"),
        ("sqlite+aiosqlite:///:memory:", "an in-memory SQLite database is not supported"),
        ("sqlite+aiosqlite:///x.db?schema=s1", "schema= is for PostgreSQL only"),
        ("postgresql+asyncpg://u@h/db?schema=bad;drop", "is not a plain identifier"),
    ],
)
async def test_bad_urls_are_refused_before_connecting(url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        await open_store(url)
    assert str(caught.value).startswith("PRESENCE_SYNC_DATABASE_URL: ")
    assert expected in str(caught.value)
    assert "pw@" not in str(caught.value)


@pytest.mark.postgres
async def test_schema_argument_creates_and_uses_the_schema(
    pg_server: str, make_pg_url: Callable[[], Awaitable[str]], open_sql: OpenSql
) -> None:
    """``open_store(url, schema=...)`` is the same as ``?schema=`` and creates the schema when missing."""
    name = (await make_pg_url()).rpartition("schema=")[2]  # a name the fixture drops afterwards
    admin = await asyncpg.connect(pg_server.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await admin.execute(f'DROP SCHEMA "{name}"')
    finally:
        await admin.close()
    store = await open_sql(pg_server, schema=name)
    assert store.target.shown.endswith(f"?schema={name}")
    async with store.engine.connect() as conn:
        tables = (
            await conn.execute(
                text("SELECT count(*) FROM information_schema.tables WHERE table_schema = :s"), {"s": name}
            )
        ).scalar_one()
        assert (await conn.execute(text("SELECT current_schema()"))).scalar_one() == name
    assert tables == 10  # nine tables and alembic_version


async def test_sqlite_file_in_a_missing_directory(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/no/such/dir/x.db"
    with pytest.raises(ConfigError) as caught:
        await open_store(url)
    assert str(caught.value) == (
        f"PRESENCE_SYNC_DATABASE_URL: cannot connect to {url}: directory {tmp_path}/no/such/dir does not exist"
    )


async def test_schema_newer_than_the_code_is_refused(sql_url: str, open_sql: OpenSql) -> None:
    store = await open_sql(sql_url)
    async with store.engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    for migrate in (True, False):
        with pytest.raises(ConfigError, match=r"schema revision 9999, which this version of presence-sync does not"):
            await open_store(sql_url, migrate=migrate)
    with pytest.raises(ConfigError, match=r"revision 9999, this presence-sync needs \d+; a newer presence-sync"):
        await store.ping()


async def test_unmigrated_database_fails_ping_with_the_fix(sql_url: str, open_sql: OpenSql) -> None:
    store = await open_sql(sql_url, migrate=False)
    with pytest.raises(ConfigError, match=r"schema revision none, .*run: presence-sync db upgrade"):
        await store.ping()


# Secrets ----------------------------------------------------------------------------------------


async def test_secrets_are_encrypted_at_rest(sql_url: str, open_sql: OpenSql) -> None:
    store = await open_sql(sql_url)
    plaintext = b'{"refresh_token": "0.AAAA-very-secret"}'
    await store.put_secret("graph.token_cache", plaintext)
    async with store.engine.connect() as conn:
        raw = (await conn.execute(select(secrets.c.ciphertext))).scalar_one()
    assert b"very-secret" not in bytes(raw) and b"refresh_token" not in bytes(raw)
    assert Fernet(SECRET_KEY).decrypt(bytes(raw)) == plaintext
    assert await store.get_secret("graph.token_cache") == plaintext


async def test_secrets_need_a_key(sql_url: str, open_sql: OpenSql) -> None:
    store = await open_sql(sql_url, secret_key="")
    with pytest.raises(ConfigError) as caught:
        await store.put_secret("graph.token_cache", b"x")
    assert str(caught.value) == KEY_MISSING
    assert str(caught.value).startswith("PRESENCE_SYNC_SECRET_KEY is not set: it encrypts token caches at rest")
    with pytest.raises(ConfigError, match="PRESENCE_SYNC_SECRET_KEY is not set"):
        await store.get_secret("graph.token_cache")


async def test_a_different_key_is_reported_as_such(sql_url: str, open_sql: OpenSql) -> None:
    first = await open_sql(sql_url)
    await first.put_secret("graph.token_cache", b"x")
    other = await open_sql(sql_url, secret_key=Fernet.generate_key().decode())
    with pytest.raises(ConfigError, match="PRESENCE_SYNC_SECRET_KEY does not match the stored secrets"):
        await other.get_secret("graph.token_cache")


async def test_a_malformed_key_is_refused_at_open(sqlite_url: str) -> None:
    with pytest.raises(ConfigError, match="PRESENCE_SYNC_SECRET_KEY is not a valid key"):
        await open_store(sqlite_url, secret_key="too-short")


# Datetimes --------------------------------------------------------------------------------------


async def test_datetimes_come_back_aware_utc(sql_url: str, open_sql: OpenSql) -> None:
    store = await open_sql(sql_url)
    eastern = timezone(timedelta(hours=-5))
    at = T0.astimezone(eastern)
    async with store.transaction() as tx:
        await tx.enqueue(SetPresence(ALICE.dynamics_user_id, System.TEAMS, "Away/Away"), at)
        state = AgentSyncState(ALICE.dynamics_user_id)
        state.teams_seen.at = at
        state.dynamics_unconfirmed = [Write(BUSY, at)]
        await tx.save_state(state)
    row = await store.outbox_row(ALICE.dynamics_user_id, System.TEAMS)
    assert row is not None and row.updated_at == T0 and row.updated_at.tzinfo is UTC
    assert row.next_attempt_at is not None and row.next_attempt_at.tzinfo is UTC
    loaded = (await store.load_states([ALICE.dynamics_user_id]))[ALICE.dynamics_user_id]
    assert loaded.teams_seen.at == T0 and loaded.teams_seen.at.tzinfo is UTC
    assert loaded.dynamics_unconfirmed == [Write(BUSY, T0)] and loaded.dynamics_unconfirmed[0].at.tzinfo is UTC
    # Compared in UTC inside SQL too: due at 09:00Z, so not claimable at 08:59:59Z written as 03:59:59-05:00.
    assert await store.claim([System.TEAMS], 10, 30, "w", (T0 - timedelta(seconds=1)).astimezone(eastern)) == []
    assert len(await store.claim([System.TEAMS], 10, 30, "w", T0.astimezone(eastern))) == 1


def test_the_raw_sqlite_driver_writes_datetimes_as_sqlalchemy_does() -> None:
    """Both layers write the same columns and compare their texts in SQL: the raw driver's text must
    be SQLAlchemy's SQLite DATETIME text of the same instant (naive UTC, microseconds always)."""
    from sqlalchemy.dialects import sqlite

    from service.store.raw import SqliteDriver

    bind = sqlite.DATETIME().bind_processor(sqlite.dialect())
    assert bind is not None
    eastern = timezone(timedelta(hours=-5, minutes=-30))
    for at in (T0, T0.replace(microsecond=7), T0.astimezone(eastern), datetime(2026, 1, 2, 3, 4, 5, 999999, UTC)):
        assert SqliteDriver(None).time(at) == bind(at.astimezone(UTC).replace(tzinfo=None))


async def test_naive_datetimes_are_refused(sql_url: str, open_sql: OpenSql) -> None:
    store = await open_sql(sql_url)
    with pytest.raises(Exception, match="naive datetime"):
        async with store.transaction() as tx:
            await tx.enqueue(SetPresence(ALICE.dynamics_user_id, System.TEAMS, "x"), datetime(2026, 1, 1))
    assert await store.list_outbox() == []


# Concurrency ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("known", [False, True], ids=["new-agent", "saved-agent"])
@pytest.mark.parametrize("read", ["load_state", "agents_with_states"])
async def test_load_state_locks_the_agent_until_commit(pg_url: str, open_sql: OpenSql, known: bool, read: str) -> None:
    """Two instances observing the same agent: the second waits for the first's decision and sees it,
    instead of deciding on the same old state and overwriting it. A new agent has no row to lock
    yet (the placeholder insert is what waits); a saved one relies on the conflict arm's row lock.
    ``agents_with_states`` (the engine's first read) locks as ``load_state`` does."""
    one, two = await open_sql(pg_url), await open_sql(pg_url)
    await one.upsert_agents([ALICE])
    agent = ALICE.dynamics_user_id
    if known:
        async with one.transaction() as tx:
            await tx.save_state(AgentSyncState(agent))
    second_saw: list[str | None] = []

    async def load(tx: Any) -> AgentSyncState:
        if read == "load_state":
            return cast(AgentSyncState, await tx.load_state(agent))
        _, states = await tx.agents_with_states([agent])
        return cast(AgentSyncState, states[agent])

    async def second() -> None:
        async with two.transaction() as tx:
            second_saw.append((await load(tx)).own_dynamics)

    async with one.transaction() as tx:
        state = await load(tx)
        waiting = asyncio.create_task(second())
        await asyncio.sleep(0.3)
        assert not waiting.done(), "the second transaction read the agent while the first held it"
        state.own_dynamics = BUSY
        await tx.save_state(state)
    await asyncio.wait_for(waiting, 5)
    assert second_saw == [BUSY]


@pytest.mark.postgres
async def test_concurrent_claims_never_share_a_row(pg_url: str, open_sql: OpenSql) -> None:
    stores = [await open_sql(pg_url) for _ in range(3)]
    async with stores[0].transaction() as tx:
        for i in range(300):
            await tx.enqueue(SetPresence(f"agent-{i:04d}", System.TEAMS, "Busy/InACall"), T0)

    async def drain(store: SqlStore, owner: str) -> list[int]:
        got: list[int] = []
        while batch := await store.claim([System.TEAMS], 7, 30, owner, T0):
            got += [d.id for d in batch]
        return got

    claimed = await asyncio.gather(*(drain(s, f"w{i}") for i, s in enumerate(stores * 2)))
    flat = [row_id for ids in claimed for row_id in ids]
    assert len(flat) == len(set(flat)) == 300


async def test_sqlite_writers_in_two_stores_wait_instead_of_failing(sqlite_url: str, open_sql: OpenSql) -> None:
    """Two stores on one file stand for two processes (``serve`` and a CLI command): read-then-write
    transactions interleave and would hit SQLITE_BUSY without ``BEGIN IMMEDIATE``."""
    one, two = await open_sql(sqlite_url), await open_sql(sqlite_url)

    async def bump(store: SqlStore, i: int) -> None:
        async with store.transaction() as tx:
            state = await tx.load_state(ALICE.dynamics_user_id)
            await asyncio.sleep(0)  # let the other store's transaction in between read and write
            state.dynamics_seen.version = (state.dynamics_seen.version or 0) + 1
            await tx.save_state(state)
            await tx.enqueue(SetPresence(ALICE.dynamics_user_id, System.TEAMS, f"v{i}"), T0)

    await asyncio.gather(*(bump(one if i % 2 else two, i) for i in range(40)))
    states = await one.load_states([ALICE.dynamics_user_id])
    assert states[ALICE.dynamics_user_id].dynamics_seen.version == 40  # no lost update
    row = await two.outbox_row(ALICE.dynamics_user_id, System.TEAMS)
    assert row is not None and row.generation == 40


async def test_sqlite_runs_in_wal_mode_with_foreign_keys(sqlite_url: str, open_sql: OpenSql) -> None:
    store = await open_sql(sqlite_url)
    async with store.engine.connect() as conn:
        assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
        assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1
        assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar_one() >= 1000


@pytest.mark.postgres
async def test_a_transaction_after_the_server_dropped_the_pools_connections_still_commits(
    pg_server: str, pg_url: str, open_sql: OpenSql
) -> None:
    """The pool does not ping what it hands out (three round trips a transaction); a connection the
    server dropped (a restart, a failover) fails its BEGIN, and the engine's transaction goes on on a
    new one instead of failing the observation behind it."""
    store = await open_sql(pg_url)
    async with store.transaction() as tx:
        await tx.save_state(AgentSyncState(ALICE.dynamics_user_id, own_dynamics="before"))
        pid = tx.db.conn.get_server_pid()  # type: ignore[attr-defined]
    admin = await asyncpg.connect(pg_server.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    async with store.transaction() as tx:
        assert tx.db.conn.get_server_pid() != pid  # type: ignore[attr-defined]
        await tx.save_state(AgentSyncState(ALICE.dynamics_user_id, own_dynamics="after"))
    states = await store.load_states([ALICE.dynamics_user_id])
    assert states[ALICE.dynamics_user_id].own_dynamics == "after"


async def test_a_claim_searches_the_live_rows_index_not_the_whole_outbox(sqlite_url: str, open_sql: OpenSql) -> None:
    """Delivered rows stay (one per agent and system): a claim that scanned them all took 11 ms at
    50,000 agents, with the write lock held, on every wake-up of the outbox workers. SQLite's planner
    uses the partial claim index only when the statement names the index's condition itself."""
    from service.store.outbox_sql import _CLAIM

    store = await open_sql(sqlite_url)
    async with store.engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        plan = await driver.execute_fetchall(
            "EXPLAIN QUERY PLAN " + _CLAIM.sqlite, ('["teams"]', "2026-12-06 00:00:00.000000", 16, "me", "x")
        )
    steps = [str(step[-1]) for step in plan]
    assert any("USING INDEX ix_outbox_claim" in step for step in steps), steps
    assert not any(step == "SCAN outbox" for step in steps), steps
