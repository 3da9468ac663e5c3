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

from sqlalchemy import and_, case, func, null, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from mapping.model import Delivery, OutboxRow, OutboxStatus, System
from service.store.dialect import random_token, ts
from service.store.schema import outbox

PENDING, IN_FLIGHT = OutboxStatus.PENDING.value, OutboxStatus.IN_FLIGHT.value
DELIVERED, DEAD = OutboxStatus.DELIVERED.value, OutboxStatus.DEAD.value
CANCELLED = "cancelled (already shown)"


def _dialect(conn: AsyncConnection) -> str:
    return conn.dialect.name


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


async def claim(
    conn: AsyncConnection, systems: Sequence[System], limit: int, lease_seconds: float, owner: str, now: datetime
) -> list[Delivery]:
    """Leases due rows in ONE statement. On PostgreSQL ``FOR UPDATE SKIP LOCKED`` in the CTE makes
    concurrent claimers pass over each other's rows instead of waiting or double-claiming; the lease
    itself (status and ``lease_until`` checked in the CTE) keeps a row to one holder afterwards."""
    if not systems or limit <= 0:
        return []
    due = or_(
        and_(outbox.c.status == PENDING, or_(outbox.c.next_attempt_at.is_(None), outbox.c.next_attempt_at <= now)),
        and_(outbox.c.status == IN_FLIGHT, outbox.c.lease_until.is_not(None), outbox.c.lease_until <= now),
    )
    picked = (
        select(outbox.c.id)
        .where(outbox.c.system.in_([s.value for s in systems]), due)
        .order_by(outbox.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("picked")
    )
    stmt = (
        update(outbox)
        .where(outbox.c.id == picked.c.id)
        .values(
            status=IN_FLIGHT,
            lease_owner=owner,
            lease_token=random_token(_dialect(conn)),
            lease_until=now + timedelta(seconds=lease_seconds),
        )
        .returning(
            outbox.c.id,
            outbox.c.agent_id,
            outbox.c.system,
            outbox.c.value,
            outbox.c.generation,
            outbox.c.attempts,
            outbox.c.lease_token,
            outbox.c.reason,
            outbox.c.failing_since,
        )
    )
    rows = (await conn.execute(stmt)).all()
    return sorted(
        (
            Delivery(
                r.id,
                r.agent_id,
                System(r.system),
                r.value,
                r.generation,
                r.attempts,
                r.lease_token,
                r.reason,
                r.failing_since,
            )
            for r in rows
        ),
        key=lambda d: d.id,
    )


def _held(d: Delivery) -> Any:
    return and_(
        outbox.c.agent_id == d.agent_id,
        outbox.c.system == d.system.value,
        outbox.c.status == IN_FLIGHT,
        outbox.c.lease_token == d.lease_token,
    )


async def ack(conn: AsyncConnection, d: Delivery, now: datetime) -> bool:
    moved = outbox.c.generation != d.generation
    stmt = (
        update(outbox)
        .where(_held(d))
        .values(
            lease_owner=None,
            lease_token=None,
            lease_until=None,
            updated_at=now,
            delivered_generation=d.generation,
            failing_since=None,
            status=case((moved, PENDING), else_=DELIVERED),
            attempts=case((moved, 0), else_=outbox.c.attempts),
            next_attempt_at=case((moved, ts(now)), else_=outbox.c.next_attempt_at),
            last_error=case((moved, outbox.c.last_error), else_=null()),
        )
        .returning(outbox.c.id)
    )
    return (await conn.execute(stmt)).first() is not None


async def fail(
    conn: AsyncConnection, d: Delivery, error: str, next_attempt_at: datetime | None, now: datetime
) -> OutboxStatus:
    """Pending again at ``next_attempt_at``, dead when it is None; a generation enqueued meanwhile
    is retried at once with fresh attempts instead. IN_FLIGHT when the lease was not ours."""
    moved = outbox.c.generation != d.generation
    if next_attempt_at is None:  # dead, unless a newer value came: that one starts a new run
        values: dict[str, Any] = {
            "status": case((moved, PENDING), else_=DEAD),
            "attempts": case((moved, 0), else_=d.attempts + 1),
            "next_attempt_at": case((moved, ts(now)), else_=null()),
            "failing_since": case((moved, null()), else_=func.coalesce(outbox.c.failing_since, ts(now))),
        }
    else:  # a newer value is due now but inherits the failing run's tries and clock (``mapping.memory``)
        values = {
            "status": PENDING,
            "attempts": d.attempts + 1,
            "next_attempt_at": case((moved, ts(now)), else_=ts(next_attempt_at)),
            "failing_since": func.coalesce(outbox.c.failing_since, ts(now)),
        }
    stmt = (
        update(outbox)
        .where(_held(d))
        .values(lease_owner=None, lease_token=None, lease_until=None, updated_at=now, last_error=error, **values)
        .returning(outbox.c.status)
    )
    status = (await conn.execute(stmt)).scalar_one_or_none()
    return OutboxStatus.IN_FLIGHT if status is None else OutboxStatus(status)


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
