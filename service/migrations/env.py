"""Alembic environment for presence-sync: always run through ``service.store.migrate``.

The connection comes from ``config.attributes["connection"]`` (a sync connection lent by the async
engine, already inside a transaction), never from a URL in an ini file, so the code path is the
same for ``open_store``, ``presence-sync db upgrade`` and the tests.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from alembic import context
from alembic.runtime.migration import MigrationContext, MigrationInfo

from service.store.schema import metadata

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run migrations through service.store.migrate (presence-sync db upgrade); "
        "there is no alembic.ini with a database URL"
    )
applied: list[str] = config.attributes.setdefault("applied", [])


def _record(ctx: MigrationContext, step: MigrationInfo, heads: Collection[Any], run_args: Mapping[str, Any]) -> None:
    if step.up_revision_id and step.is_upgrade:
        applied.append(step.up_revision_id)


context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    compare_type=True,
    on_version_apply=_record,
)
with context.begin_transaction():
    context.run_migrations()
