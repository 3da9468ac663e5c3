"""Answering the callers that wait on a group commit (``SyncEngine.observe``, the notification
intake's ``NoteWriter``): each waits on a future of its own, answered once its group's write ends."""

from __future__ import annotations

import asyncio
from typing import TypeVar

T = TypeVar("T")


def resolve(future: asyncio.Future[T], result: T) -> None:
    """The caller's result, unless it stopped waiting (cancelled)."""
    if not future.done():
        future.set_result(result)


def reject(future: asyncio.Future[T], error: BaseException) -> None:
    """The caller's error, unless it stopped waiting; a cancellation (shutdown) cancels it, so that
    it is not handed a CancelledError as an ordinary failure."""
    if future.done():
        return
    if isinstance(error, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(error)
