"""Outbox statements (rule 7), each one atomic by itself.

Semantics are those of ``mapping.memory.MemoryStore``, the reference: one row per (agent, system);
a new value bumps ``generation``; a row in flight keeps its lease and goes back to pending when its
attempt ends with an older generation; every transition checks the lease token, so a worker whose
lease was taken over can neither ack nor fail the row.

Every state change is one ``UPDATE`` with ``CASE`` arms rather than read-then-write, so it needs no
row lock held across a round trip and is correct under READ COMMITTED on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from mapping.model import Delivery, OutboxRow, OutboxStatus, System
from service.store.raw import Driver, Sql
from service.store.schema import outbox

PENDING, IN_FLIGHT = OutboxStatus.PENDING.value, OutboxStatus.IN_FLIGHT.value
DEAD = OutboxStatus.DEAD.value


def to_row(r: Any) -> OutboxRow:
    return OutboxRow(
        r.id,
        r.agent_id,
        System(r.system),
        r.value,
        OutboxStatus(r.status),
        r.generation,
        r.attempts,
        r.next_attempt_at,
        r.last_error,
        r.updated_at,
        r.reason,
    )


async def redrive(conn: AsyncConnection, system: System, now: datetime) -> int:
    """``Store.redrive``: every row of ``system`` waiting out a retry backoff is due now."""
    result = await conn.execute(
        update(outbox)
        .where(
            outbox.c.system == system.value,
            outbox.c.status == PENDING,
            outbox.c.failing_since.is_not(None),
            outbox.c.next_attempt_at > now,
        )
        .values(next_attempt_at=now)
    )
    return int(result.rowcount or 0)


async def release_leases(conn: AsyncConnection, owner: str, now: datetime) -> int:
    """``Store.release_leases``: the owner's in-flight rows become claimable now (the lease token
    stays, so a late ack of the dead process's attempt, if any, is still refused once reclaimed)."""
    result = await conn.execute(
        update(outbox)
        .where(outbox.c.status == IN_FLIGHT, outbox.c.lease_owner == owner)
        .values(lease_until=now, updated_at=now)
    )
    return int(result.rowcount or 0)


_DUE = (
    # The first term is the claim index's own condition (ix_outbox_claim, live rows only), written out
    # so that SQLite's planner can use that partial index: it does not infer the term from the OR
    # below, and scanned every row instead, delivered ones included (one per agent and system: at
    # 50,000 agents a claim took 11 ms, with the write lock held, instead of 0.12 ms).
    "status IN ('pending', 'in_flight') AND system {in:1} "
    "AND ((status = 'pending' AND (next_attempt_at IS NULL OR next_attempt_at <= $2)) "
    "OR (status = 'in_flight' AND lease_until IS NOT NULL AND lease_until <= $2))"
)
_LEASE = "SET status = 'in_flight', lease_owner = $4, lease_until = $5, lease_token = "
_CLAIMED = (
    "RETURNING {t}id, {t}agent_id, {t}system, {t}value, {t}generation, {t}attempts, {t}lease_token, {t}reason, "
    "{t}failing_since"
)
_CLAIM = Sql(
    # FOR UPDATE SKIP LOCKED: concurrent claimers pass over each other's rows instead of waiting.
    Sql.of(
        f"WITH picked AS (SELECT id FROM outbox WHERE {_DUE} ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) "
        f"UPDATE outbox {_LEASE}replace(gen_random_uuid()::text, '-', '') "
        f"FROM picked WHERE outbox.id = picked.id {_CLAIMED.format(t='outbox.')}"
    ).pg,
    # SQLite: the claimer holds the database's only write lock.
    Sql.of(
        f"UPDATE outbox {_LEASE}lower(hex(randomblob(16))) "
        f"WHERE id IN (SELECT id FROM outbox WHERE {_DUE} ORDER BY id LIMIT $3) {_CLAIMED.format(t='')}"
    ).sqlite,
)
_HELD = "WHERE agent_id = $1 AND system = $2 AND status = 'in_flight' AND lease_token = $3"
_MOVED = "generation != $4"  # a newer value was enqueued during the attempt
_RELEASE = "lease_owner = NULL, lease_token = NULL, lease_until = NULL, updated_at = $5::timestamptz"
_ACK = Sql.of(
    f"UPDATE outbox SET {_RELEASE}, delivered_generation = $4, failing_since = NULL, "
    f"status = CASE WHEN {_MOVED} THEN 'pending' ELSE 'delivered' END, "
    f"attempts = CASE WHEN {_MOVED} THEN 0 ELSE attempts END, "
    f"next_attempt_at = CASE WHEN {_MOVED} THEN $5 ELSE next_attempt_at END, "
    f"last_error = CASE WHEN {_MOVED} THEN last_error ELSE NULL END "
    f"{_HELD} RETURNING id"
)
_DIE = Sql.of(
    # Dead, unless a newer value came: that one starts a new run.
    f"UPDATE outbox SET {_RELEASE}, last_error = $6, "
    f"status = CASE WHEN {_MOVED} THEN 'pending' ELSE 'dead' END, "
    f"attempts = CASE WHEN {_MOVED} THEN 0 ELSE $7 END, "
    f"next_attempt_at = CASE WHEN {_MOVED} THEN $5 ELSE NULL END, "
    f"failing_since = CASE WHEN {_MOVED} THEN NULL ELSE coalesce(failing_since, $5) END "
    f"{_HELD} RETURNING status"
)
_RETRY = Sql.of(
    # A newer value is due now but inherits the failing run's tries and clock (``mapping.memory``).
    f"UPDATE outbox SET {_RELEASE}, last_error = $6, status = 'pending', attempts = $7, "
    f"next_attempt_at = CASE WHEN {_MOVED} THEN $5 ELSE $8::timestamptz END, "
    "failing_since = coalesce(failing_since, $5) "
    f"{_HELD} RETURNING status"
)


async def claim(
    db: Driver, systems: Sequence[System], limit: int, lease_seconds: float, owner: str, now: datetime
) -> list[Delivery]:
    """Leases due rows in ONE statement (the outbox workers claim on every wake-up, so it runs on the
    drivers' own connections: ``service.store.raw``). The lease itself (status and ``lease_until``
    tested) keeps a row to one holder afterwards; each row gets a token of its own, made by the
    server."""
    if not systems or limit <= 0:
        return []
    until = now + timedelta(seconds=lease_seconds)
    rows = await db.fetch(_CLAIM, db.ids([s.value for s in systems]), db.time(now), limit, owner, db.time(until))
    return sorted(
        (Delivery(r[0], r[1], System(r[2]), r[3], r[4], r[5], r[6], r[7], db.read_time(r[8])) for r in rows),
        key=lambda d: d.id,
    )


async def ack(db: Driver, d: Delivery, now: datetime) -> bool:
    rows = await db.fetch(_ACK, d.agent_id, d.system.value, d.lease_token, d.generation, db.time(now))
    return bool(rows)


async def fail(db: Driver, d: Delivery, error: str, next_attempt_at: datetime | None, now: datetime) -> OutboxStatus:
    """Pending again at ``next_attempt_at``, dead when it is None; a generation enqueued meanwhile
    is retried at once with fresh attempts instead. IN_FLIGHT when the lease was not ours."""
    held = (d.agent_id, d.system.value, d.lease_token, d.generation, db.time(now), error, d.attempts + 1)
    if next_attempt_at is None:
        rows = await db.fetch(_DIE, *held)
    else:
        rows = await db.fetch(_RETRY, *held, db.time(next_attempt_at))
    return OutboxStatus.IN_FLIGHT if not rows else OutboxStatus(rows[0][0])


async def list_rows(conn: AsyncConnection, status: OutboxStatus | None, limit: int) -> list[OutboxRow]:
    stmt = select(outbox).order_by(outbox.c.id).limit(max(limit, 0))
    if status is not None:
        stmt = stmt.where(outbox.c.status == status.value)
    return [to_row(r) for r in (await conn.execute(stmt)).all()]


async def counts(conn: AsyncConnection) -> dict[str, int]:
    out = {s.value: 0 for s in OutboxStatus}
    for status, n in (await conn.execute(select(outbox.c.status, func.count()).group_by(outbox.c.status))).all():
        out[status] = int(n)
    return out


async def retry_dead(conn: AsyncConnection, row_id: int | None, now: datetime) -> int:
    stmt = (
        update(outbox)
        .where(outbox.c.status == DEAD)
        .values(status=PENDING, attempts=0, next_attempt_at=now, updated_at=now, failing_since=None)
        .returning(outbox.c.id)
    )
    if row_id is not None:
        stmt = stmt.where(outbox.c.id == row_id)
    return len((await conn.execute(stmt)).all())


async def row_for(conn: AsyncConnection, agent_id: str, system: System) -> OutboxRow | None:
    r = (
        await conn.execute(select(outbox).where(outbox.c.agent_id == agent_id, outbox.c.system == system.value))
    ).first()
    return to_row(r) if r is not None else None
