"""Background rounds over durable notes (pending new agents, pending Teams reads).

Intakes answer at once and leave a note in the store; a worker settles the notes later. Each such
worker is the same loop: run a round when woken or every ``interval``, stop promptly, and after a
failure wait the retry policy's delay (``Retry-After`` included) instead of hammering a throttled
upstream. One loop, so the adapters cannot drift apart in how they back off."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mapping.errors import UpstreamError
from mapping.retry import RetryPolicy

log = logging.getLogger("presence_sync.rounds")


async def run_rounds(
    round_: Callable[[], Awaitable[Any]],
    *,
    wake: asyncio.Event,
    stop: asyncio.Event,
    interval: float,
    retry: RetryPolicy,
    what: str,
) -> None:
    """Until ``stop``: wait for ``wake`` (at most ``interval``), run ``round_``. Upstream errors are
    the round's to log (it knows which note failed); anything else is logged here with ``what``."""
    failures = 0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), interval)
        wake.clear()
        if stop.is_set():
            return
        try:
            await round_()
            failures = 0
        except Exception as e:
            failures += 1
            if not isinstance(e, UpstreamError):
                log.exception(f"{what} round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), retry.delay(failures, e))


class Rounds:
    """One background worker of ``run_rounds`` with its events and task: an adapter starts, wakes
    and stops it with one call each instead of keeping the same three fields and teardown itself."""

    def __init__(
        self, round_: Callable[[], Awaitable[Any]], *, interval: float, retry: RetryPolicy, what: str, name: str
    ) -> None:
        self._round = round_
        self._interval = interval
        self._retry = retry
        self._what = what
        self._name = name
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, *, at_once: bool = False) -> None:
        """Starts the worker (no-op when running); ``at_once``: run a first round now rather than
        after ``interval`` (notes an earlier process left)."""
        if self._task is not None:
            return
        self._stop.clear()
        if at_once:
            self._wake.set()
        self._task = asyncio.create_task(
            run_rounds(
                self._round,
                wake=self._wake,
                stop=self._stop,
                interval=self._interval,
                retry=self._retry,
                what=self._what,
            ),
            name=self._name,
        )

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
