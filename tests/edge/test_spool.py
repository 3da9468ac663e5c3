"""``edge.spool``: records come back in the order they were appended, survive a new process on the
same file, a torn last record (a crash mid-write) or damage in the middle is skipped with a log line
and never a crash, the bound and an unwritable folder refuse with ``SpoolUnavailable``, and one file
has one writer."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edge.spool import MAGIC, Spool, SpoolRecord, SpoolUnavailable, encode, inspect, spool_path

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def rec(i: int, body: bytes | None = None) -> SpoolRecord:
    return SpoolRecord("dataverse_webhook", T0 + timedelta(seconds=i), "application/json", body or b'{"n": %d}' % i)


async def drain(spool: Spool) -> list[SpoolRecord]:
    seen: list[SpoolRecord] = []

    async def handle(r: SpoolRecord) -> None:
        seen.append(r)

    await spool.replay(handle)
    return seen


async def test_records_are_replayed_in_order_and_the_file_is_cut_back(tmp_path: Path) -> None:
    spool = Spool(spool_path(tmp_path / "spool", "host:3978"))
    spool.open()
    for i in range(5):
        await spool.append(rec(i))
    assert spool.records == 5 and spool.pending_bytes == sum(len(encode(rec(i))) for i in range(5))
    assert spool.path.name == "webhook-spool-host_3978.bin"
    assert [r.body for r in await drain(spool)] == [b'{"n": %d}' % i for i in range(5)]
    assert [r.received_at for r in [rec(i) for i in range(5)]] == [T0 + timedelta(seconds=i) for i in range(5)]
    assert spool.records == 0 and spool.path.stat().st_size == 0
    await spool.close()


async def test_concurrent_appends_share_writes_and_keep_their_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.bin")
    spool.open()
    await asyncio.gather(*(spool.append(rec(i)) for i in range(50)))
    got = await drain(spool)
    assert [r.received_at for r in got] == [rec(i).received_at for i in range(50)]
    await spool.close()


async def test_a_failing_handler_stops_the_replay_and_keeps_that_record_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.bin")
    spool.open()
    for i in range(3):
        await spool.append(rec(i))
    calls: list[int] = []

    async def flaky(r: SpoolRecord) -> None:
        calls.append(r.body[-2])
        if len(calls) == 2:
            raise ConnectionError("store down")

    with pytest.raises(ConnectionError):
        await spool.replay(flaky)
    assert spool.records == 2
    assert [r.body for r in await drain(spool)] == [b'{"n": 1}', b'{"n": 2}']
    await spool.close()


async def test_a_new_process_on_the_same_file_replays_what_was_left(tmp_path: Path) -> None:
    path = tmp_path / "s.bin"
    first = Spool(path)
    first.open()
    for i in range(3):
        await first.append(rec(i))
    await first.close()  # as after kill -9: nothing replayed, the file stays
    second = Spool(path)
    second.open()
    assert second.records == 3
    assert inspect(path).records == 3
    assert [r.body for r in await drain(second)] == [b'{"n": %d}' % i for i in range(3)]
    await second.close()


async def test_a_torn_last_record_is_skipped_with_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s.bin"
    whole = encode(rec(0)) + encode(rec(1))
    path.write_bytes(whole + encode(rec(2))[:-7])  # the process died inside the third write
    spool = Spool(path)
    with caplog.at_level(logging.WARNING, logger="presence_sync.spool"):
        spool.open()
    assert "torn last record" in caplog.text
    assert spool.records == 2 and path.stat().st_size == len(whole)  # cut off: appends stay framed
    await spool.append(rec(3))
    assert [r.body for r in await drain(spool)] == [b'{"n": 0}', b'{"n": 1}', b'{"n": 3}']
    await spool.close()


async def test_damage_in_the_middle_is_stepped_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s.bin"
    middle = bytearray(encode(rec(1)))
    middle[-3] ^= 0xFF  # a flipped byte: its checksum no longer holds
    path.write_bytes(encode(rec(0)) + bytes(middle) + encode(rec(2)))
    spool = Spool(path)
    with caplog.at_level(logging.WARNING, logger="presence_sync.spool"):
        spool.open()
    assert "damaged bytes" in caplog.text
    assert [r.body for r in await drain(spool)] == [b'{"n": 0}', b'{"n": 2}']
    await spool.close()


async def test_a_body_holding_the_magic_is_just_a_body(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.bin")
    spool.open()
    await spool.append(rec(0, body=MAGIC * 3 + b"\x00\xff"))
    await spool.close()
    again = Spool(tmp_path / "s.bin")
    again.open()
    assert [r.body for r in await drain(again)] == [MAGIC * 3 + b"\x00\xff"]
    await again.close()


async def test_over_the_bound_is_refused(tmp_path: Path) -> None:
    one = len(encode(rec(0)))
    spool = Spool(tmp_path / "s.bin", max_bytes=2 * one)
    spool.open()
    await spool.append(rec(0))
    await spool.append(rec(1))
    with pytest.raises(SpoolUnavailable, match="full"):
        await spool.append(rec(2))
    assert spool.problem is not None and spool.records == 2
    await drain(spool)
    assert spool.problem is None  # replayed and cut back: room again
    await spool.append(rec(2))
    await spool.close()


async def test_an_unwritable_folder_is_refused_and_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the spool folder should be")
    spool = Spool(blocker / "spool" / "s.bin")
    with pytest.raises(SpoolUnavailable, match="cannot open"):
        spool.open()
    assert spool.problem is not None and "cannot open" in spool.problem
    with pytest.raises(SpoolUnavailable):
        await spool.append(rec(0))


async def test_a_write_error_leaves_no_half_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "s.bin")
    spool.open()
    await spool.append(rec(0))

    def disk_full(fd: int, blob: bytes, offset: int) -> None:
        import os

        os.pwrite(fd, blob[:5], offset)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("edge.spool._write_at", disk_full)
    with pytest.raises(SpoolUnavailable, match="No space left"):
        await spool.append(rec(1))
    assert spool.problem is not None and spool.records == 1
    monkeypatch.undo()
    await spool.append(rec(2))
    assert spool.problem is None
    assert [r.body for r in await drain(spool)] == [b'{"n": 0}', b'{"n": 2}']
    await spool.close()


async def test_one_writer_per_file(tmp_path: Path) -> None:
    first = Spool(tmp_path / "s.bin")
    first.open()
    second = Spool(tmp_path / "s.bin")
    with pytest.raises(SpoolUnavailable, match="in use"):
        second.open()
    await first.close()
    second.open()
    await second.close()
