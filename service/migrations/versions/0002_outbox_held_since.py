"""Outbox ``held_since``: when the current run of coalesced changes began (rule 6's hold).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

A held row is due ``hold`` seconds after its newest change, but never later than ``max_hold`` after
the first change of the run; this column remembers that first change.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from service.store.types import UTCDateTime

revision = "0002"
down_revision: str | None = "0001"
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("held_since", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("held_since")
