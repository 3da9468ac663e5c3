"""The few places where PostgreSQL and SQLite need different SQL, in one module."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, String, Table, cast, func, literal
from sqlalchemy.dialects import postgresql, sqlite

from service.store.types import UTCDateTime

Upsert = postgresql.Insert | sqlite.Insert


def upsert(dialect: str, table: Table) -> Upsert:
    """``INSERT`` with the dialect's ``ON CONFLICT`` support (both dialects spell it the same way)."""
    return postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)


def random_token(dialect: str) -> ColumnElement[str]:
    """A random 32-hex-digit lease token made by the server, so one ``UPDATE`` can lease many rows."""
    if dialect == "postgresql":
        return func.replace(cast(func.gen_random_uuid(), String), "-", "")
    return func.lower(func.hex(func.randomblob(16)))


def ts(value: datetime | None) -> ColumnElement[datetime]:
    """A datetime bound with the store's UTC type where SQLAlchemy cannot infer it (inside CASE)."""
    return literal(value, UTCDateTime())
