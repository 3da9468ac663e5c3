"""Sync rules version 2: the agent state becomes one JSON document (``agent_state.doc``).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Version 1 kept per-side columns (``sync_state``) and an override snapshot (``restore_value``,
``override_value``). Version 2 derives both outputs from two inputs (the agent's own Dynamics presence
P and the person's own Teams state Q), so the state is converted, not copied:

- P = the snapshot taken before a v1 override if one was active, else what Dynamics last showed;
- Q = what Teams last showed, unless that was the bridge's own session (then unknown);
- what Dynamics and Teams last showed, the session Teams holds from the bridge (acknowledged) and the
  writes whose echo was still expected carry over, so echoes of v1 writes are still recognised;
- when the agent last chose a presence is unknown in v1 (left empty).

The directory, the outbox (dead letters included) and every other table are untouched. What cannot be
converted (a state without sides) is dropped and rebuilt by the start-up sweep, which reads both
systems and repairs any difference from the outputs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

from service.store.types import UTCDateTime

revision = "0003"
down_revision: str | None = "0002"
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None

CLEAR = "clear"


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


def _as_dt(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _v1_doc(head: Any, sides: dict[str, Any]) -> dict[str, Any] | None:
    dyn, teams = sides.get("dynamics"), sides.get("teams")
    if dyn is None and teams is None:
        return None
    doc: dict[str, Any] = {"v": 2}
    if dyn is not None:
        seen_at = _as_dt(dyn.observed_at)
        doc["dynamics_seen"] = {
            "value": dyn.observed_value,
            "version": dyn.observed_version,
            "at": _iso(seen_at),
            "since": _iso(seen_at),
        }
        doc["own_dynamics"] = head.restore_value if head.override_value is not None else dyn.observed_value
        doc["own_dynamics_at"] = _iso(seen_at)
        doc["dynamics_unconfirmed"] = [[v, at] for v, at in (dyn.recent_writes or [])]
    if teams is not None:
        seen_at = _as_dt(teams.observed_at)
        doc["teams_seen"] = {
            "value": teams.observed_value,
            "version": None,
            "at": _iso(seen_at),
            "since": _iso(seen_at),
        }
        session = teams.delivered_value
        if teams.observed_value is not None and teams.observed_value != session:
            doc["own_teams"], doc["own_teams_since"] = teams.observed_value, _iso(seen_at)
        doc["session_delivered"] = session
        doc["session_written"] = teams.written_value
        doc["session_written_at"] = _iso(_as_dt(teams.written_at))
        doc["session_landed_at"] = _iso(_as_dt(teams.delivered_at))
        if teams.written_value is not None and teams.written_value != session:
            doc["session_unacked"] = [teams.written_value]
    return doc


def upgrade() -> None:
    with op.batch_alter_table("agent_state") as batch:
        batch.add_column(sa.Column("doc", sa.JSON(), nullable=True))
    bind = op.get_bind()
    meta = sa.MetaData()
    head_t = sa.Table("agent_state", meta, autoload_with=bind)
    side_t = sa.Table("sync_state", meta, autoload_with=bind)
    sides: dict[str, dict[str, Any]] = {}
    for row in bind.execute(sa.select(side_t)):
        sides.setdefault(row.agent_id, {})[row.system] = row
    for head in bind.execute(sa.select(head_t).where(head_t.c.saved.is_(True))).all():
        doc = _v1_doc(head, sides.get(head.agent_id, {}))
        if doc is None:
            bind.execute(sa.delete(head_t).where(head_t.c.agent_id == head.agent_id))
        else:
            bind.execute(sa.update(head_t).where(head_t.c.agent_id == head.agent_id).values(doc=doc))
    op.drop_table("sync_state")
    with op.batch_alter_table("agent_state") as batch:
        batch.drop_column("restore_value")
        batch.drop_column("override_value")


def downgrade() -> None:
    """Back to the v1 tables, without states: v1 rebuilds them from its start-up sweep."""
    op.execute("DELETE FROM agent_state")
    with op.batch_alter_table("agent_state") as batch:
        batch.drop_column("doc")
        batch.add_column(sa.Column("restore_value", sa.Text(), nullable=True))
        batch.add_column(sa.Column("override_value", sa.Text(), nullable=True))
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
