"""A local append-only spool: requests an intake authenticated but could not commit to the store in
time, kept on disk until the store answers again.

Why it exists: the Dataverse webhook step is synchronous, so any non-2xx answer fails the agent's own
presence change. When the store cannot commit within about a second (an exclusive lock on the SQLite
file, PostgreSQL failing over), the request is appended here, ``fsync``'d, and only then answered 2xx.
A replayer hands the records back, oldest first, once the store answers; what was replayed is cut off.

The file (one per instance, named by its owner id, ``spool_path``) is a sequence of framed records::

    magic "PSS1" | payload length (u32, big-endian) | CRC-32 of the payload (u32) | payload
    payload = meta length (u16) | meta JSON (route, received_at, content_type) | body bytes

- **Durable before the answer.** ``append`` returns once the record is written and ``fsync``'d;
  requests arriving together share one write and one ``fsync`` (group commit).
- **A crash tears at most the last record.** On ``open`` a record whose frame or checksum does not
  hold is skipped with a log line (never a crash): a torn tail is cut off so appends stay framed, and
  damage in the middle is stepped over to the next record that checks out.
- **Bounded.** Past ``max_bytes`` an append is refused (``SpoolUnavailable``), as when the disk
  refuses: the caller then answers 503, the only case where the sender has to try again.
- **One writer.** An exclusive ``flock`` on the file: a second process with the same owner id gets
  ``SpoolUnavailable`` instead of interleaving records.

Route-agnostic: it knows bytes, times and route names, nothing of the core or of Dataverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import struct
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

log = logging.getLogger("presence_sync.spool")

MAGIC = b"PSS1"
_FRAME = struct.Struct(">4sII")
_META = struct.Struct(">H")
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class SpoolUnavailable(Exception):
    """The spool cannot take a record (cannot be opened or written, or full); ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SpoolRecord:
    """One spooled request: the authenticated body as received, when it arrived, and on which route."""

    route: str
    received_at: datetime
    content_type: str
    body: bytes


@dataclass(frozen=True)
class SpoolStatus:
    path: Path
    records: int
    bytes: int
    problem: str | None = None

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"path": str(self.path), "records": self.records, "bytes": self.bytes}
        if self.problem:
            out["problem"] = self.problem
        return out


def spool_path(folder: Path, owner: str) -> Path:
    """The spool file of the instance ``owner`` (``host:port`` for ``serve``) in ``folder``."""
    return folder / f"webhook-spool-{re.sub(r'[^A-Za-z0-9._-]', '_', owner)}.bin"


def encode(record: SpoolRecord) -> bytes:
    meta = json.dumps(
        {"route": record.route, "received_at": record.received_at.isoformat(), "content_type": record.content_type},
        separators=(",", ":"),
    ).encode()
    payload = _META.pack(len(meta)) + meta + record.body
    return _FRAME.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes) -> SpoolRecord:
    (n,) = _META.unpack_from(payload)
    meta = json.loads(payload[_META.size : _META.size + n])
    return SpoolRecord(
        str(meta["route"]),
        datetime.fromisoformat(str(meta["received_at"])),
        str(meta.get("content_type") or ""),
        payload[_META.size + n :],
    )


def _frame_at(data: bytes, offset: int) -> int | None:
    """The length of the valid record at ``offset``, or None when no valid record starts there."""
    if len(data) - offset < _FRAME.size:
        return None
    magic, length, crc = _FRAME.unpack_from(data, offset)
    end = offset + _FRAME.size + length
    if magic != MAGIC or end > len(data) or length < _META.size:
        return None
    payload = data[offset + _FRAME.size : end]
    if zlib.crc32(payload) != crc:
        return None
    try:
        _decode_payload(payload)
    except (ValueError, KeyError, struct.error):
        return None
    return _FRAME.size + length


@dataclass(frozen=True)
class Scan:
    """What a spool file holds: its valid records (offset, size), bytes skipped as damaged, and where
    a torn tail begins (the file's length when there is none)."""

    records: list[tuple[int, int]]
    skipped: int
    valid_end: int


def scan(data: bytes) -> Scan:
    records: list[tuple[int, int]] = []
    skipped = 0
    offset = 0
    valid_end = 0
    while offset < len(data):
        size = _frame_at(data, offset)
        if size is not None:
            records.append((offset, size))
            offset += size
            valid_end = offset
            continue
        nxt = data.find(MAGIC, offset + 1)
        while nxt != -1 and _frame_at(data, nxt) is None:
            nxt = data.find(MAGIC, nxt + 1)
        if nxt == -1:
            break  # a torn tail: from ``valid_end`` on
        skipped += nxt - offset
        offset = nxt
    return Scan(records, skipped, valid_end)


def inspect(path: Path) -> SpoolStatus:
    """A read-only look at a spool file (``doctor``): what it holds, without opening it for writing."""
    if not path.exists():
        return SpoolStatus(path, 0, 0)
    found = scan(path.read_bytes())
    return SpoolStatus(path, len(found.records), sum(size for _, size in found.records))


class Spool:
    """Build, ``open()`` (at the intake's start), ``append`` and ``replay``; ``close()`` at stop."""

    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._fd: int | None = None
        self._size = 0
        self._index: deque[tuple[int, int]] = deque()
        self._queue: list[tuple[bytes, asyncio.Future[None]]] = []
        self._queued_bytes = 0
        self._writing = (0, 0)
        """Records and bytes of the batch being written: out of the queue, not in the index yet."""
        self._flusher: asyncio.Task[None] | None = None
        self._io = asyncio.Lock()
        self._replaying = asyncio.Lock()
        self._problem: str | None = None

    # ------------------------------------------------------------------------------------ state

    @property
    def records(self) -> int:
        """Records waiting: written, or being written (a request counts from the moment it is queued,
        so that the next request keeps behind it)."""
        return len(self._index) + len(self._queue) + self._writing[0]

    @property
    def pending_bytes(self) -> int:
        return sum(size for _, size in self._index) + self._queued_bytes + self._writing[1]

    @property
    def problem(self) -> str | None:
        """Why the last open or write failed (cleared by the next one that works)."""
        return self._problem

    def status(self) -> SpoolStatus:
        return SpoolStatus(self.path, self.records, self.pending_bytes, self._problem)

    # ------------------------------------------------------------------------------------ open/close

    def open(self) -> None:
        """Opens (creating the folder and file), locks and scans the file: records left by an earlier
        process are waiting for ``replay``. Raises ``SpoolUnavailable`` (also kept as ``problem``)."""
        if self._fd is not None:
            return
        try:
            self._open()
        except SpoolUnavailable as e:
            self._problem = e.reason
            raise
        self._problem = None

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise SpoolUnavailable(f"cannot open {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SpoolUnavailable(f"{self.path} is in use by another process with the same owner id") from None
        try:
            if created:
                _fsync_dir(self.path.parent)
            data = _read_all(fd)
            found = scan(data)
            if found.valid_end < len(data):
                log.warning(
                    "spool: a torn last record (an interrupted write) was skipped",
                    extra={"fields": {"path": str(self.path), "bytes": len(data) - found.valid_end}},
                )
                os.ftruncate(fd, found.valid_end)
                os.fsync(fd)
            if found.skipped:
                log.warning(
                    "spool: damaged bytes between records were skipped",
                    extra={"fields": {"path": str(self.path), "bytes": found.skipped}},
                )
        except OSError as e:
            os.close(fd)
            raise SpoolUnavailable(f"cannot read {self.path}: {e.strerror or e}") from None
        self._fd = fd
        self._size = found.valid_end
        self._index = deque(found.records)
        if found.records:
            log.info(
                "spool: records left by an earlier run are replayed first",
                extra={"fields": {"path": str(self.path), "records": len(found.records)}},
            )

    async def close(self) -> None:
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    # ------------------------------------------------------------------------------------ append

    async def append(self, record: SpoolRecord) -> None:
        """Returns once ``record`` is on disk (written and ``fsync``'d); ``SpoolUnavailable`` when it
        cannot be (nothing of it is then kept)."""
        if self._fd is None:
            self.open()
        data = encode(record)
        used = self._size + self._queued_bytes + self._writing[1]
        if used + len(data) > self.max_bytes:
            self._problem = f"full: {used} of {self.max_bytes} bytes in use"
            raise SpoolUnavailable(f"{self.path} is {self._problem}")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((data, done))
        self._queued_bytes += len(data)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="spool-flush")
        await done

    async def _flush(self) -> None:
        """Writes everything queued with one write and one ``fsync`` per batch (group commit)."""
        while self._queue:
            async with self._io:
                batch, self._queue = self._queue, []
                blob = b"".join(data for data, _ in batch)
                self._queued_bytes -= len(blob)
                self._writing = (len(batch), len(blob))
                fd, start = self._fd, self._size
                error: str | None = None
                if fd is None:
                    error = "closed"
                else:
                    try:
                        await asyncio.to_thread(_write_at, fd, blob, start)
                    except OSError as e:
                        error = f"cannot write {self.path}: {e.strerror or e}"
                        with contextlib.suppress(OSError):
                            os.ftruncate(fd, start)  # no half record left behind
                self._writing = (0, 0)
                if error is None:
                    offset = start
                    for data, _ in batch:
                        self._index.append((offset, len(data)))
                        offset += len(data)
                    self._size = offset
                    self._problem = None
                else:
                    self._problem = error
                for _, done in batch:
                    if done.done():
                        continue
                    if error is None:
                        done.set_result(None)
                    else:
                        done.set_exception(SpoolUnavailable(error))

    # ------------------------------------------------------------------------------------ replay

    async def replay(self, handle: Callable[[SpoolRecord], Awaitable[None]]) -> int:
        """Hands the waiting records to ``handle`` oldest first, each removed once ``handle`` returned;
        an exception from ``handle`` stops the replay there (that record stays first) and is raised.
        Once none is left, the file is cut back to empty. Returns how many were replayed."""
        async with self._replaying:
            replayed = 0
            while self._index and self._fd is not None:
                offset, size = self._index[0]
                payload = os.pread(self._fd, size, offset)[_FRAME.size :]
                await handle(_decode_payload(payload))
                self._index.popleft()
                replayed += 1
            async with self._io:
                if not self._index and not self._queue and self._fd is not None and self._size:
                    os.ftruncate(self._fd, 0)
                    os.fsync(self._fd)
                    self._size = 0
                    if self._problem and self._problem.startswith("full"):
                        self._problem = None
            return replayed


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


def _write_at(fd: int, blob: bytes, offset: int) -> None:
    view = memoryview(blob)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
    os.fsync(fd)


def _fsync_dir(folder: Path) -> None:
    """A new file's directory entry is durable only once its folder is synced."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
