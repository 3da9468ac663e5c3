"""Outbox ``failing_since``: when the current run of a row began to fail (rule 7's dead-letter budget).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

A command becomes a dead letter only after a long budget of trying (hours, not seconds), counted from
its first failed attempt; a new value for a failing row keeps the clock, so neither a stream of new
values nor a short burst of failures decides when a command dies. Existing rows start with no
failure recorded (their next failure starts the clock).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from service.store.types import UTCDateTime

revision = "0005"
# On the merged main this follows 0004 (quarantine); branch h-outage has no 0004 yet, so it points at
# 0003 there until the lead merges (see the branch's report).
down_revision: str | None = "0004"
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("failing_since", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("failing_since")
