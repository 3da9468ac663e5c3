"""The few places where PostgreSQL and SQLite need different SQL, in one module."""

from __future__ import annotations

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite

Upsert = postgresql.Insert | sqlite.Insert


def upsert(dialect: str, table: Table) -> Upsert:
    """``INSERT`` with the dialect's ``ON CONFLICT`` support (both dialects spell it the same way)."""
    return postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
