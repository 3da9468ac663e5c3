"""Pending-read notes by group commit (``NoteWriter``): a lone note is written at once, notes arriving
during a write go together in the next, each caller returns only after the write holding its note
committed, and a failed write fails every caller of its group (the route: 503 to each request of it,
Graph sends them again) and no other."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import pytest

from graph_sync.notifications import PENDING_KIND, NoteWriter
from tests.graph.conftest import Rig, agents
from tests.graph.test_notifications import basic_item, known_agents, post

ALICE, BOB, CAROL = agents(3)
ROUTE = "graph_notifications"


class HeldWrites:
    """``put_docs`` that holds each write until the test lets it go, then commits it to ``inner`` (if
    any) or fails it as told."""

    def __init__(self, inner: Callable[[str, Mapping[str, dict[str, Any]]], Awaitable[None]] | None = None) -> None:
        self.inner = inner
        self.calls: list[tuple[str, list[str]]] = []
        self.gates: list[asyncio.Event] = []
        self.fail: set[int] = set()
        self.committed: list[int] = []
        self.opened = False

    async def put_docs(self, kind: str, items: Mapping[str, dict[str, Any]]) -> None:
        n = len(self.calls)
        self.calls.append((kind, list(items)))
        self.gates.append(gate := asyncio.Event())
        if not self.opened:
            await gate.wait()
        if n in self.fail:
            raise RuntimeError("disk I/O error")
        if self.inner is not None:
            await self.inner(kind, items)
        self.committed.append(n)

    def release(self, n: int) -> None:
        self.gates[n].set()

    def open_all(self) -> None:
        """Every write held or to come goes through (teardown: a broken writer must fail, not hang)."""
        self.opened = True
        for gate in self.gates:
            gate.set()


GUARD = 30.0
"""Seconds before a wait that should end gives up: a broken writer fails the test instead of hanging it."""


async def until(condition: Callable[[], bool]) -> None:
    """Lets the loop run until ``condition`` holds."""
    async with asyncio.timeout(GUARD):
        while not condition():
            await asyncio.sleep(0)


async def bounded(awaitable: Awaitable[Any]) -> Any:
    async with asyncio.timeout(GUARD):
        return await awaitable


async def settle() -> None:
    """Lets every ready task run a few steps."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_notes_arriving_during_a_write_go_together_in_the_next_each_answered_after_its_commit() -> None:
    held = HeldWrites()
    writer = NoteWriter(held, "k")  # type: ignore[arg-type]
    a = asyncio.create_task(writer.put("a", {"ids": ["a"]}))
    await until(lambda: len(held.calls) == 1)  # a lone note: written at once, no waiting for company
    b = asyncio.create_task(writer.put("b", {"ids": ["b"]}))
    c = asyncio.create_task(writer.put("c", {"ids": ["c"]}))
    await until(lambda: writer.queued == 2)
    await settle()
    assert len(held.calls) == 1 and not (a.done() or b.done() or c.done())
    held.release(0)
    await bounded(a)
    await until(lambda: len(held.calls) == 2)
    assert held.calls == [("k", ["a"]), ("k", ["b", "c"])]  # one write for both
    await settle()
    assert not (b.done() or c.done())  # not before their own write committed
    held.release(1)
    await bounded(asyncio.gather(b, c))
    assert held.committed == [0, 1] and writer.writes == 2


async def test_a_failed_write_fails_every_note_of_its_group_and_no_other() -> None:
    held = HeldWrites()
    held.fail = {1}
    writer = NoteWriter(held, "k")  # type: ignore[arg-type]
    a = asyncio.create_task(writer.put("a", {}))
    await until(lambda: len(held.calls) == 1)
    b = asyncio.create_task(writer.put("b", {}))
    c = asyncio.create_task(writer.put("c", {}))
    await until(lambda: writer.queued == 2)
    held.release(0)
    await until(lambda: len(held.calls) == 2)
    held.release(1)
    results = await bounded(asyncio.gather(a, b, c, return_exceptions=True))
    assert results[0] is None
    assert all(isinstance(r, RuntimeError) and "disk" in str(r) for r in results[1:])
    d = asyncio.create_task(writer.put("d", {}))  # the writer goes on after a failed group
    await until(lambda: len(held.calls) == 3)
    held.release(2)
    await bounded(d)
    assert held.calls[2] == ("k", ["d"]) and held.committed == [0, 2]


async def test_concurrent_basic_requests_share_a_write_and_a_failed_one_is_503_to_each_of_its_requests(
    rig: Rig, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    await rig.intake.stop()  # no background reads: the notes stay to be looked at
    await known_agents(rig, [ALICE, BOB, CAROL])
    store = rig.bridge.store
    held = HeldWrites(store.put_docs)
    monkeypatch.setattr(store, "put_docs", held.put_docs)

    def send(uid: str) -> asyncio.Task[tuple[int, Any]]:
        return asyncio.create_task(post(http, rig.notify_url, {"value": [basic_item(uid)]}))

    try:
        first = send(ALICE.entra_object_id)
        await until(lambda: len(held.calls) == 1)
        second, third = send(BOB.entra_object_id), send(CAROL.entra_object_id)
        await until(lambda: rig.intake.notes.queued == 2)
        await settle()
        assert not (first.done() or second.done() or third.done())  # nothing answered before its commit
        held.fail = {1}
        held.release(0)
        assert await bounded(first) == (202, {"accepted": 1})
        await until(lambda: len(held.calls) == 2)
        assert held.calls[1][0] == PENDING_KIND and len(held.calls[1][1]) == 2  # the two requests, one write
        held.release(1)
        for answer in await bounded(asyncio.gather(second, third)):
            assert answer[0] == 503 and "retry" in answer[1]["error"]
        assert rig.telemetry.rejections[(ROUTE, "internal")] == 2
        notes = await store.list_docs(PENDING_KIND)
        assert [n["ids"] for n in notes.values()] == [[ALICE.entra_object_id]]  # only what was answered 202
        again = send(BOB.entra_object_id)  # Graph delivers it again: stored this time
        await until(lambda: len(held.calls) == 3)
        held.release(2)
        assert await bounded(again) == (202, {"accepted": 1})
        notes = await store.list_docs(PENDING_KIND)
        assert sorted(n["ids"][0] for n in notes.values()) == sorted([ALICE.entra_object_id, BOB.entra_object_id])
    finally:
        held.open_all()
