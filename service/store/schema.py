"""The store's tables as SQLAlchemy Core objects: the one description the queries and the Alembic
migrations are checked against (``tests/store/test_migrations.py`` compares them).

Why these shapes:
- ``outbox`` keeps ONE row per (agent, system) (rule 6, coalescing): a new desired value overwrites
  the row and bumps ``generation`` instead of adding rows, so a burst costs one upstream call.
- ``agent_state`` holds ``mapping.model.AgentSyncState`` as one JSON document per agent (``doc``,
  see ``service.store.state_doc``): the core loads and saves the whole state at once and never
  queries inside it, so one row read is all an event costs, and the rules can grow a field without a
  migration. It is also the row PostgreSQL locks in ``Transaction.load_state``; a lock needs a row,
  so one is inserted blank (``saved`` false) when the agent has none, and ``saved`` tells real
  states from those placeholders.
- No foreign keys to ``agents``: the core may keep state and commands for an agent that was removed
  from the directory (the outbox then dead-letters it with a clear message), exactly like the
  in-memory reference store.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from service.store.types import UTCDateTime

# Stable constraint names, so migrations can refer to them on both dialects.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only auto-increments an ``INTEGER PRIMARY KEY`` (the rowid alias), not a BIGINT one.
RowId = BigInteger().with_variant(Integer(), "sqlite")

agents = Table(
    "agents",
    metadata,
    Column("dynamics_user_id", String(64), primary_key=True),
    Column("entra_object_id", String(64), nullable=False, unique=True),
    Column("display_name", Text, nullable=False, server_default=""),
    Column("enabled", Boolean, nullable=False, server_default=text("true")),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

presences = Table(
    "presences",
    metadata,
    Column("presence_id", String(64), primary_key=True),
    Column("name", Text, nullable=False),
    Column("base", Integer, nullable=False),
    Column("can_user_set", Boolean, nullable=False),
    Column("position", Integer, nullable=False),  # catalogue order, as the upstream listed it
)

agent_state = Table(
    "agent_state",
    metadata,
    Column("agent_id", String(64), primary_key=True),
    Column("saved", Boolean, nullable=False),
    Column("doc", JSON),
    Column("updated_at", UTCDateTime, nullable=False),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("agent_id", String(64), nullable=False),
    Column("system", String(16), nullable=False),
    Column("value", Text, nullable=False),
    Column("reason", Text, nullable=False, server_default=""),
    Column("status", String(16), nullable=False),
    Column("generation", BigInteger, nullable=False),
    Column("delivered_generation", BigInteger, nullable=False, server_default="0"),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UTCDateTime),
    Column("lease_owner", Text),
    Column("lease_token", String(64)),
    Column("lease_until", UTCDateTime),
    Column("last_error", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("held_since", UTCDateTime),  # first change of the run being coalesced (0002)
    Column("failing_since", UTCDateTime),  # first failed attempt of the current run (0005)
    UniqueConstraint("agent_id", "system"),
)

# Claims scan only live rows; delivered rows (one per agent and system, forever) stay out of the index.
_LIVE = text("status IN ('pending', 'in_flight')")
Index(
    "ix_outbox_claim",
    outbox.c.status,
    outbox.c.next_attempt_at,
    outbox.c.id,
    postgresql_where=_LIVE,
    sqlite_where=_LIVE,
)

unknown_ids = Table(
    "unknown_ids",
    metadata,
    Column("system", String(16), primary_key=True),
    Column("external_id", String(128), primary_key=True),
    Column("first_seen", UTCDateTime, nullable=False),
    Column("last_seen", UTCDateTime, nullable=False),
    Column("count", BigInteger, nullable=False),
)

docs = Table(
    "docs",
    metadata,
    Column("kind", String(128), primary_key=True),
    Column("key", String(512), primary_key=True),
    Column("doc", JSON, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

secrets = Table(
    "secrets",
    metadata,
    Column("name", String(256), primary_key=True),
    Column("ciphertext", LargeBinary, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

# Bodies an intake could not use and answered 2xx anyway (0004): newest kept, oldest dropped first.
quarantine = Table(
    "quarantine",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("route", String(64), nullable=False),
    Column("reason", String(64), nullable=False),
    Column("detail", Text, nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
    Column("size", Integer, nullable=False),
    Column("body", LargeBinary, nullable=False),
)

# Counters the store keeps for itself (0004: ``quarantine_dropped``), incremented in SQL, so two
# instances adding at once never lose a count.
counters = Table(
    "counters",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("value", BigInteger, nullable=False),
)
