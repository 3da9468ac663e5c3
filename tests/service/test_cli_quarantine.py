"""``presence-sync quarantine list|show|drop`` as an admin meets them: on a fresh store, the body
pretty-printed when it is JSON, no key in any output, an unknown id one line and exit 2."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from service.store import open_store
from tests.service.test_cli import run_cli
from tests.support import T0

pytestmark = pytest.mark.slow
KEY = "quarantine-cli-key-0123456789"


def fill(url: str, *bodies: bytes) -> list[int]:
    async def go() -> list[int]:
        store = await open_store(url)
        try:
            return [
                await store.quarantine("dataverse_webhook", "invalid_json", b, f"body is not JSON ({i})", T0)
                for i, b in enumerate(bodies)
            ]
        finally:
            await store.close()

    return asyncio.run(go())


def test_fresh_store_lists_nothing(tmp_path: Path) -> None:
    env = {"PRESENCE_SYNC_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"}
    r = run_cli("quarantine", "list", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "0 item(s) held (at most 10000), 0 dropped for room" in r.stdout


def test_list_show_drop_and_unknown_id(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    env = {"PRESENCE_SYNC_DATABASE_URL": url, "PRESENCE_SYNC_DATAVERSE_WEBHOOK_KEY": KEY}
    run_cli("db", "upgrade", env=env, cwd=tmp_path)
    doc = {"MessageName": "Update", "echo": KEY, "nested": {"a": [1, 2]}}
    first, second = fill(url, json.dumps(doc).encode(), b"not json \xff at all")

    r = run_cli("quarantine", "list", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["id", "received", "(UTC)", "route", "reason", "size", "detail"]
    assert lines[1].split()[0] == str(second) and lines[2].split()[0] == str(first)  # newest first
    assert "2026-11-25 09:00:00" in lines[1] and "dataverse_webhook" in lines[1] and "invalid_json" in lines[1]
    assert "2 item(s) held" in lines[-1]
    assert KEY not in r.stdout

    r = run_cli("quarantine", "show", str(first), env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"id:       {first}" in r.stdout and "reason:   invalid_json" in r.stdout
    assert '  "nested": {\n    "a": [\n      1,' in r.stdout  # pretty-printed JSON
    assert KEY not in r.stdout and "***" in r.stdout
    r = run_cli("quarantine", "show", str(second), env=env, cwd=tmp_path)
    assert r.returncode == 0 and "not json \\xff at all" in r.stdout

    r = run_cli("quarantine", "drop", str(first), env=env, cwd=tmp_path)
    assert (r.returncode, r.stdout.strip()) == (0, f"dropped quarantine item {first}")
    for command in ("drop", "show"):
        r = run_cli("quarantine", command, str(first), env=env, cwd=tmp_path)
        assert r.returncode == 2
        assert r.stderr.strip() == (
            f"presence-sync: quarantine item {first} does not exist (see `presence-sync quarantine list`)"
        )
    r = run_cli("quarantine", "show", "abc", env=env, cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
