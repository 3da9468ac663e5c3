"""The quarantine (``mapping.ports.Quarantine``) in SQL: ``quarantine`` rows, newest kept.

Bounded in the same transaction as the insert: past ``max_items`` the oldest rows (lowest ids) are
deleted and counted in ``counters`` (``quarantine_dropped``) with an increment done by the database,
so instances quarantining at once never lose a count. Body and detail are scrubbed before they are
written (``mapping.redact``)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Row, delete, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from mapping.model import QuarantinedItem
from mapping.redact import redact, redact_bytes
from service.store.dialect import upsert
from service.store.schema import counters, quarantine

DROPPED = "quarantine_dropped"


def _item(row: Row[tuple[int, str, str, str, datetime, int, bytes]]) -> QuarantinedItem:
    return QuarantinedItem(row.id, row.route, row.reason, row.detail, row.received_at, row.size, bytes(row.body))


async def add(
    conn: AsyncConnection, route: str, reason: str, body: bytes, detail: str, at: datetime, max_items: int
) -> int:
    values = {
        "route": route[:64],
        "reason": reason[:64],
        "detail": redact(detail),
        "received_at": at,
        "size": len(body),
        "body": redact_bytes(body),
    }
    item_id = int((await conn.execute(quarantine.insert().values(**values).returning(quarantine.c.id))).scalar_one())
    held = int((await conn.execute(select(func.count()).select_from(quarantine))).scalar_one())
    if held > max_items:
        cutoff = (
            await conn.execute(select(quarantine.c.id).order_by(quarantine.c.id.desc()).offset(max_items).limit(1))
        ).scalar()
        if cutoff is not None:
            dropped = (await conn.execute(delete(quarantine).where(quarantine.c.id <= cutoff))).rowcount or 0
            stmt = upsert(conn.dialect.name, counters).values(name=DROPPED, value=dropped)
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[counters.c.name], set_={"value": counters.c.value + stmt.excluded.value}
                )
            )
    return item_id


async def newest(conn: AsyncConnection, limit: int) -> list[QuarantinedItem]:
    rows = (await conn.execute(select(quarantine).order_by(quarantine.c.id.desc()).limit(limit))).all()
    return [_item(r) for r in rows]


async def get(conn: AsyncConnection, item_id: int) -> QuarantinedItem | None:
    row = (await conn.execute(select(quarantine).where(quarantine.c.id == item_id))).first()
    return None if row is None else _item(row)


async def drop(conn: AsyncConnection, item_id: int) -> bool:
    return bool((await conn.execute(delete(quarantine).where(quarantine.c.id == item_id))).rowcount)


async def count(conn: AsyncConnection) -> int:
    return int((await conn.execute(select(func.count()).select_from(quarantine))).scalar_one())


async def dropped(conn: AsyncConnection) -> int:
    value = (await conn.execute(select(counters.c.value).where(counters.c.name == DROPPED))).scalar()
    return int(value or 0)
