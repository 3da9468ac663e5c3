"""The quarantine part of the ``Store`` contract, on the in-memory reference and both SQL dialects:
ids grow, newest first, bounded with the oldest dropped first and counted, body kept byte for byte
(bytes that are not UTF-8 included) less its secrets, and nothing else of the store touched."""

from __future__ import annotations

from datetime import timedelta

import pytest

from mapping.memory import MemoryStore
from mapping.ports import Store
from tests.support import T0

BODY = b'{"InputParameters": [{"key": "Target", "value": {"Id": "x"}}], "raw": "\xff\xfe"}'


async def test_quarantine_keeps_what_it_was_given(any_store: Store) -> None:
    first = await any_store.quarantine("dataverse_webhook", "invalid_json", BODY, "body is not JSON", T0)
    second = await any_store.quarantine("graph_notifications", "not_json", b"", "empty body", T0 + timedelta(seconds=1))
    assert second > first
    item = await any_store.get_quarantined(first)
    assert item is not None
    assert (item.id, item.route, item.reason, item.detail) == (
        first,
        "dataverse_webhook",
        "invalid_json",
        "body is not JSON",
    )
    assert (item.received_at, item.size, item.body) == (T0, len(BODY), BODY)
    assert [q.id for q in await any_store.list_quarantined()] == [second, first]
    assert [q.id for q in await any_store.list_quarantined(limit=1)] == [second]
    assert await any_store.quarantine_count() == 2
    assert await any_store.get_quarantined(second + 100) is None


async def test_drop_removes_one_item(any_store: Store) -> None:
    item_id = await any_store.quarantine("dataverse_webhook", "not_context", b"[]", "an array", T0)
    assert await any_store.drop_quarantined(item_id) is True
    assert await any_store.drop_quarantined(item_id) is False
    assert await any_store.get_quarantined(item_id) is None
    assert await any_store.quarantine_count() == 0
    assert await any_store.quarantine_dropped() == 0  # dropped by hand is not "dropped for room"


async def test_secrets_are_masked_in_body_and_detail(any_store: Store) -> None:
    body = b'{"url": "https://contoso.example/api?code=s3cr3t-code-value", "auth": "Bearer abc.def.ghi"}'
    item_id = await any_store.quarantine("dataverse_webhook", "unknown_shape", body, "saw ?code=s3cr3t-code-value", T0)
    item = await any_store.get_quarantined(item_id)
    assert item is not None
    assert b"s3cr3t" not in item.body and b"abc.def" not in item.body and "s3cr3t" not in item.detail
    assert item.size == len(body)


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def small_store(request: pytest.FixtureRequest, open_sql) -> Store:  # type: ignore[no-untyped-def]
    if request.param == "memory":
        return MemoryStore(quarantine_max_items=3)
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    return await open_sql(url, quarantine_max_items=3)


async def test_bounded_oldest_dropped_first_and_counted(small_store: Store) -> None:
    ids = [await small_store.quarantine("dataverse_webhook", "invalid_json", b"%d" % i, "", T0) for i in range(5)]
    assert [q.id for q in await small_store.list_quarantined()] == ids[:1:-1]
    assert await small_store.quarantine_count() == 3
    assert await small_store.quarantine_dropped() == 2
    await small_store.quarantine("dataverse_webhook", "invalid_json", b"5", "", T0)
    assert await small_store.quarantine_dropped() == 3
    assert [q.body for q in await small_store.list_quarantined()] == [b"5", b"4", b"3"]
