"""``service.store.calls_thread``: the SQLite store's thread for BEGIN-waiting and COMMIT. Calls run
one at a time in the order given (the store relies on it: a rollback submitted after a BEGIN runs
after it), each answer reaches its own future, and a cancelled waiter does not stop its call."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.store.calls_thread import CallsThread


async def test_calls_run_in_order_on_one_thread_and_answer_their_own_futures():
    thread = CallsThread("test-calls")
    seen: list[tuple[int, str]] = []

    def record(i: int) -> int:
        seen.append((i, threading.current_thread().name))
        return i * 10

    try:
        futures = [thread.call(record, i) for i in range(50)]
        thread.submit(record, 50)
        assert await asyncio.gather(*futures) == [i * 10 for i in range(50)]
    finally:
        thread.shutdown()  # runs the submitted call before it returns
    assert [i for i, _ in seen] == list(range(51))
    assert {name for _, name in seen} == {"test-calls"}


async def test_an_exception_reaches_its_caller_and_the_next_call_still_runs():
    thread = CallsThread("test-calls")

    def fail() -> None:
        raise ValueError("database is locked")

    def dropped() -> None:
        raise RuntimeError("nobody waits for this one")

    try:
        failing = thread.call(fail)
        thread.submit(dropped)
        after = thread.call(lambda: "still running")
        with pytest.raises(ValueError, match="database is locked"):
            await failing
        assert await after == "still running"
    finally:
        thread.shutdown()


async def test_a_cancelled_waiter_does_not_stop_its_call():
    thread = CallsThread("test-calls")
    gate = threading.Event()
    ran = threading.Event()

    def slow() -> None:
        gate.wait(5)
        ran.set()

    try:
        waiter = thread.call(slow)
        waiter.cancel()
        gate.set()
        assert await thread.call(lambda: ran.is_set())  # the next call runs after slow finished
        assert waiter.cancelled()
    finally:
        thread.shutdown()


async def test_no_call_is_taken_after_shutdown():
    thread = CallsThread("test-calls")
    assert await thread.call(lambda: 1) == 1
    thread.shutdown()
    thread.shutdown()  # twice is harmless
    with pytest.raises(RuntimeError, match="shut down"):
        thread.call(lambda: 2)
    with pytest.raises(RuntimeError, match="shut down"):
        thread.submit(lambda: 3)


def test_a_thread_never_used_shuts_down_at_once():
    thread = CallsThread("test-calls")
    thread.shutdown()
    assert not thread._thread.is_alive()
