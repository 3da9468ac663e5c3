"""The SQL store (SQLite or PostgreSQL): ``open_store`` gives a ``mapping.ports.Store``.

Public API: ``open_store``, ``SqlStore``, ``migration_status``, ``upgrade``.
"""

from service.store.migrate import migration_status, upgrade
from service.store.sql import SqlStore, open_store

__all__ = ["SqlStore", "migration_status", "open_store", "upgrade"]
