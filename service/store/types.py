"""Column types that make both dialects hand back the same Python values.

SQLite has no timezone-aware timestamp type: SQLAlchemy stores a datetime as text and drops its
tzinfo. ``UTCDateTime`` stores UTC (naive on SQLite, ``timestamptz`` on PostgreSQL) and re-attaches
UTC on the way out, so callers always get aware UTC datetimes whatever the dialect.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from service.store.raw import utc


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every dialect. Naive input is refused: the core only works
    with aware UTC (``mapping.clock``), so a naive value is a bug the store should surface, not guess."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = utc(value)  # the one refusal of a naive datetime, shared with the drivers' statements
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):  # pragma: no cover - the impl type always yields datetimes
            raise TypeError(f"expected a datetime from the database, got {type(value).__name__}")
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
