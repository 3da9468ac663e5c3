"""Live updates for open console pages, by server-sent events.

One poller per process, not one per page: every second it asks the store which agents' states were
saved since it last looked and what the outbox counts are (two small indexed reads, whichever
instance made the change), and tells every open page. A page then re-reads only what it shows. The
poller runs while at least one page listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from console.reads import ConsoleReads

log = logging.getLogger("presence_sync.console")

POLL_SECONDS = 1.0
KEEPALIVE_SECONDS = 15.0
MAX_IDS = 200


class Hub:
    def __init__(
        self, reads: ConsoleReads, counts: Callable[[], Awaitable[dict[str, int]]], *, poll: float = POLL_SECONDS
    ) -> None:
        self.reads = reads
        self.counts = counts
        self.poll = poll
        self._listeners: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def listen(self) -> asyncio.Queue[dict[str, Any] | None]:
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=64)
        self._listeners.add(q)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="console-live")
        return q

    def leave(self, q: asyncio.Queue[dict[str, Any] | None]) -> None:
        self._listeners.discard(q)

    def _tell(self, message: dict[str, Any] | None) -> None:
        for q in list(self._listeners):
            if q.full():  # a page that stopped reading: it re-reads everything on its next message
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(message)

    async def _run(self) -> None:
        since: datetime | None = None
        counts: dict[str, int] | None = None
        first = True
        while self._listeners and not self._closed:
            try:
                latest, ids = await self.reads.console_changed_since(since, MAX_IDS)
                now_counts = await self.counts()
                if not first and (ids or latest != since):
                    self._tell({"type": "agents", "ids": ids, "more": len(ids) >= MAX_IDS})
                if not first and now_counts != counts:
                    self._tell({"type": "ops", "counts": now_counts})
                since, counts, first = latest, now_counts, False
            except Exception as e:  # the store is down: pages keep what they show, the poller keeps trying
                log.warning("console live poll failed", extra={"fields": {"error": type(e).__name__}})
            await asyncio.sleep(self.poll)

    async def close(self) -> None:
        self._closed = True
        self._tell(None)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        q = self.listen()
        try:
            await response.write(b"event: hello\ndata: {}\n\n")
            while not self._closed:
                try:
                    message = await asyncio.wait_for(q.get(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if message is None:
                    break
                data = json.dumps(message)
                await response.write(f"event: {message['type']}\ndata: {data}\n\n".encode())
        except ConnectionResetError:
            pass
        finally:
            self.leave(q)
        return response
