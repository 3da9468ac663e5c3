"""One thread that runs blocking calls in the order given and answers the event loop directly.

Why not ``ThreadPoolExecutor`` with ``loop.run_in_executor``: the SQLite store hands every group
commit's ``COMMIT`` (its fsync) to a thread, and the executor's way of doing it (a work item and
semaphore per call, a ``concurrent.futures.Future`` whose every state read takes a lock, an asyncio
future wrapped around it and the callbacks chaining the two) cost more CPU on the loop thread than
the hand-off itself: an eighth of the loop thread's samples at one observation per group (py-spy, in-process
``bridge.observe``). Here a call is one queue put, and its answer one ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from mapping.waiters import reject, resolve

T = TypeVar("T")

_Call = tuple[Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop | None, "asyncio.Future[Any] | None"]


class CallsThread:
    """Runs ``call``/``submit`` callables one at a time, in order, on a thread of its own (started
    at the first call). Cancelling the future ``call`` returned does not stop its callable: it may
    be under way inside a driver, and it runs to its end like the calls queued behind it."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        # A daemon: a store never closed must not keep the interpreter from exiting (SQLite is safe
        # against an exit in the middle of a COMMIT, as against a kill).
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = self._closed = False

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` on the thread; the returned future (of the running loop) gets its result
        or its exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._put((fn, args, loop, future))
        return future

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(*args)`` on the thread, nobody waiting for it: an exception it raises is dropped."""
        self._put((fn, args, None, None))

    def shutdown(self) -> None:
        """Runs every call handed over so far, then ends the thread (waits for it)."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            self._calls.put(None)
            self._thread.join()

    def _put(self, item: _Call) -> None:
        if self._closed:
            raise RuntimeError(f"{self._thread.name}: shut down, no more calls taken")
        if not self._started:
            self._started = True
            self._thread.start()
        self._calls.put(item)

    def _run(self) -> None:
        while (item := self._calls.get()) is not None:
            fn, args, loop, future = item
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as e:
                error = e
            if loop is None or future is None:
                continue
            try:
                # A future whose awaiter was cancelled meanwhile is left alone: the call ran all the same.
                if error is None:
                    loop.call_soon_threadsafe(resolve, future, result)
                else:
                    loop.call_soon_threadsafe(reject, future, error)
            except RuntimeError:  # the loop closed meanwhile: nobody is left to answer
                pass
