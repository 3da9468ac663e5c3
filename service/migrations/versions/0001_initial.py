"""Initial schema: directory, catalogue, sync state, outbox, unknown ids, documents, secrets.

Revision ID: 0001
Revises:
Create Date: 2026-01-01

Written by hand to match ``service/store/schema.py``; ``tests/store/test_migrations.py`` checks
that the migrated database and the metadata agree on both dialects.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from service.store.types import UTCDateTime

revision = "0001"
down_revision: str | None = None
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None

_ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_LIVE = sa.text("status IN ('pending', 'in_flight')")


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("dynamics_user_id", sa.String(64), nullable=False),
        sa.Column("entra_object_id", sa.String(64), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False, server_default=""),
        sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.text("true")),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("dynamics_user_id", name="pk_agents"),
        sa.UniqueConstraint("entra_object_id", name="uq_agents_entra_object_id"),
    )
    op.create_table(
        "presences",
        sa.Column("presence_id", sa.String(64), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("base", sa.Integer(), nullable=False),
        sa.Column("can_user_set", sa.Boolean(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("presence_id", name="pk_presences"),
    )
    op.create_table(
        "agent_state",
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("saved", sa.Boolean(), nullable=False),
        sa.Column("restore_value", sa.Text(), nullable=True),
        sa.Column("override_value", sa.Text(), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("agent_id", name="pk_agent_state"),
    )
    op.create_table(
        "sync_state",
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("system", sa.String(16), nullable=False),
        sa.Column("observed_value", sa.Text(), nullable=True),
        sa.Column("observed_version", sa.BigInteger(), nullable=True),
        sa.Column("observed_at", UTCDateTime(), nullable=True),
        sa.Column("written_value", sa.Text(), nullable=True),
        sa.Column("written_at", UTCDateTime(), nullable=True),
        sa.Column("write_seen", sa.Boolean(), nullable=False),
        sa.Column("changed_at", UTCDateTime(), nullable=True),
        sa.Column("delivered_value", sa.Text(), nullable=True),
        sa.Column("delivered_at", UTCDateTime(), nullable=True),
        sa.Column("recent_writes", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agent_state.agent_id"], name="fk_sync_state_agent_id_agent_state", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("agent_id", "system", name="pk_sync_state"),
    )
    op.create_table(
        "outbox",
        sa.Column("id", _ROW_ID, autoincrement=True, nullable=False),
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("system", sa.String(16), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False, server_default=""),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("delivered_generation", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=True),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_token", sa.String(64), nullable=True),
        sa.Column("lease_until", UTCDateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("agent_id", "system", name="uq_outbox_agent_id_system"),
    )
    op.create_index(
        "ix_outbox_claim",
        "outbox",
        ["status", "next_attempt_at", "id"],
        postgresql_where=_LIVE,
        sqlite_where=_LIVE,
    )
    op.create_table(
        "unknown_ids",
        sa.Column("system", sa.String(16), nullable=False),
        sa.Column("external_id", sa.String(128), nullable=False),
        sa.Column("first_seen", UTCDateTime(), nullable=False),
        sa.Column("last_seen", UTCDateTime(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("system", "external_id", name="pk_unknown_ids"),
    )
    op.create_table(
        "docs",
        sa.Column("kind", sa.String(128), nullable=False),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("doc", sa.JSON(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "key", name="pk_docs"),
    )
    op.create_table(
        "secrets",
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_secrets"),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_claim", table_name="outbox")
    for table in ("secrets", "docs", "unknown_ids", "outbox", "sync_state", "agent_state", "presences", "agents"):
        op.drop_table(table)
