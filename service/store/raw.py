"""The drivers' own connections (``sqlite3``, ``asyncpg``) behind one small interface, for the
statements the sync engine runs on every observation (``service.store.tx``).

Why not SQLAlchemy there: its per-statement work (execution context, parameter processing, result
wrapping) cost 50-100 µs a statement, several times what SQLite or asyncpg take to run it, and an
observation runs about five statements (``bench/webhook_bench.py``; the store's other statements,
which are not on that path, stay on SQLAlchemy). The statements are written once, with numbered
parameters (``$1``); ``Sql`` renders them for each dialect (SQLite spells a numbered parameter
``?1``), and a list parameter (``$1`` as a JSON array on SQLite, a ``text[]`` on PostgreSQL) keeps one
prepared statement whatever the list's length.

Values cross as the tables hold them (``service.store.schema``): datetimes as ``UTCDateTime`` does
(aware UTC on PostgreSQL; on SQLite naive UTC text in SQLAlchemy's own format, so both layers read
and compare each other's values), booleans as the dialect's, documents as JSON text. A naive
datetime is refused, as ``UTCDateTime`` refuses it.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import asyncpg
import orjson

_NUMBERED = re.compile(r"\$(\d+)")


@dataclass(frozen=True)
class Sql:
    """One statement in both dialects, rendered once: ``pg`` with numbered parameters ``$1``,
    ``sqlite`` with ``?1`` and without PostgreSQL's casts."""

    pg: str
    sqlite: str

    @classmethod
    def of(cls, text: str) -> Sql:
        """``text`` with numbered parameters; ``{in:N}`` after a column tests it against parameter
        N, a list of strings (``= ANY($N::text[])``; on SQLite ``IN`` the elements of a JSON array)."""
        pg = re.sub(r"\{in:(\d+)\}", r"= ANY($\1::text[])", text)
        lite = re.sub(r"\{in:(\d+)\}", r"IN (SELECT value FROM json_each($\1))", text)
        lite = re.sub(r"::\w+", "", lite)  # PostgreSQL's casts (::json): SQLite's columns take the text as is
        return cls(pg, _NUMBERED.sub(r"?\1", lite))


def dumps(doc: Any) -> str:
    """A JSON document's text as a JSON column holds it: ``orjson`` (a tenth of ``json``'s time),
    ``json`` for what orjson refuses (a string that is not valid Unicode, an integer past 64 bits)."""
    try:
        return orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(doc)


def utc(value: datetime) -> datetime:
    """``value`` in UTC; ``ValueError`` for a naive datetime (the core works in aware UTC only, so a
    naive one is a bug to surface, not a time zone to guess)."""
    if value.tzinfo is UTC:  # the core's own datetimes: nothing to convert (most of this call's cost)
        return value
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()} given to the store; use an aware UTC datetime")
    return value.astimezone(UTC)


class Driver(Protocol):
    """One connection inside one open transaction (the caller begins and ends it)."""

    dialect: str

    async def fetch(self, sql: Sql, *args: Any) -> list[Sequence[Any]]: ...
    async def execute(self, sql: Sql, *args: Any) -> int:
        """Runs one statement; returns the rows it changed."""
        ...

    async def executemany(self, sql: Sql, rows: Sequence[Sequence[Any]]) -> None: ...
    def time(self, value: datetime | None) -> Any:
        """A datetime as the dialect's column holds it."""
        ...

    def read_time(self, value: Any) -> datetime | None:
        """A datetime column's value as read: aware UTC, as ``UTCDateTime`` hands it back."""
        ...

    def ids(self, values: Sequence[str]) -> Any:
        """A list parameter (``{in:N}``)."""
        ...


class SqliteDriver:
    """The inline SQLite connection (``service.store.inline``): it holds the write lock already, so
    these calls never wait on another writer and run on the loop thread."""

    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    async def fetch(self, sql: Sql, *args: Any) -> list[Sequence[Any]]:
        return self.conn.execute(sql.sqlite, args).fetchall()

    async def execute(self, sql: Sql, *args: Any) -> int:
        return self.conn.execute(sql.sqlite, args).rowcount

    async def executemany(self, sql: Sql, rows: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(sql.sqlite, rows)

    def time(self, value: datetime | None) -> Any:
        if value is None:
            return None
        # SQLAlchemy's SQLite DATETIME format (naive UTC, microseconds): text comparisons in SQL
        # order these values in time, and SQLAlchemy's reads parse them. The first 26 characters
        # of the UTC text are exactly that (the "+00:00" cut off instead of a naive copy made).
        return utc(value).isoformat(" ", "microseconds")[:26]

    def read_time(self, value: Any) -> datetime | None:
        return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)

    def ids(self, values: Sequence[str]) -> Any:
        flat = "".join(values)
        if '"' in flat or "\\" in flat or not flat.isprintable():
            return json.dumps(list(values))
        # Ids are GUIDs, the usual case: nothing to escape, and json.dumps cost more than the query.
        return '["' + '","'.join(values) + '"]' if values else "[]"


class PgDriver:
    """An asyncpg connection (taken from the SQLAlchemy engine's pool) in a transaction."""

    dialect = "postgresql"

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def fetch(self, sql: Sql, *args: Any) -> list[Sequence[Any]]:
        return list(await self.conn.fetch(sql.pg, *args))

    async def execute(self, sql: Sql, *args: Any) -> int:
        status = await self.conn.execute(sql.pg, *args)
        # "UPDATE 3", "INSERT 0 1", "DELETE 0": the count is the last word.
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def executemany(self, sql: Sql, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            await self.conn.executemany(sql.pg, rows)

    def time(self, value: datetime | None) -> Any:
        return None if value is None else utc(value)

    def read_time(self, value: Any) -> datetime | None:
        return None if value is None else value.astimezone(UTC)

    def ids(self, values: Sequence[str]) -> Any:
        return list(values)
