"""Outbox throughput: rows claimed and delivered per second through ``OutboxWorker``, per store.

Fills the outbox with N rows for N distinct agents, then lets the real worker (claim, directory
lookup, apply, ack: one store write per row plus one claim per batch) deliver them to a writer that
does nothing, so the number measured is the store's cost per delivered command. Runs on SQLite (a
temporary file, WAL, fsync per commit as in production) and on PostgreSQL (a schema of its own,
dropped afterwards).

    python bench/outbox_throughput.py [--rows 5000] [--pg-url postgresql+asyncpg://postgres@127.0.0.1:5432/test]
                                      [--workers 1] [--batch-size 64] [--timeout 120]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from mapping.clock import utcnow
from mapping.model import Agent, SetPresence, System
from mapping.outbox import OutboxWorker
from mapping.ports import Store
from service.store import open_store

DEFAULT_PG_URL = os.environ.get("PRESENCE_SYNC_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
FILL_CHUNK = 500


@dataclass(frozen=True)
class Result:
    store: str
    rows: int
    delivered: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else 0.0


class NoopWriter:
    def __init__(self, system: System) -> None:
        self.system = system

    async def apply(self, agent: Agent, value: str) -> None:
        return None


def say(text: str) -> None:
    print(text, flush=True)


async def fill(store: Store, rows: int, label: str) -> None:
    agents = [
        Agent(f"{i:08x}-0000-4000-8000-000000000000", f"{i:08x}-0000-4000-8000-00000000e000", f"Agent {i}")
        for i in range(rows)
    ]
    started = time.monotonic()
    for start in range(0, rows, FILL_CHUNK):
        await store.upsert_agents(agents[start : start + FILL_CHUNK])
        now = utcnow()
        async with store.transaction() as tx:
            for agent in agents[start : start + FILL_CHUNK]:
                await tx.enqueue(SetPresence(agent.dynamics_user_id, System.TEAMS, "Busy/InACall", "bench"), now)
    say(f"[{label}] filled {rows} rows in {time.monotonic() - started:.1f} s")


async def deliver(store: Store, rows: int, label: str, *, workers: int, batch_size: int, timeout: float) -> Result:
    writers = {s: NoopWriter(s) for s in System}
    pool = [
        OutboxWorker(store, writers, batch_size=batch_size, poll_seconds=0.01, limiters={}, owner=f"bench-{i}")
        for i in range(workers)
    ]
    stop = asyncio.Event()
    started = time.monotonic()
    tasks = [asyncio.create_task(w.run(stop)) for w in pool]
    delivered = 0
    next_report = started + 1.0
    try:
        while True:
            counts = await store.outbox_counts()
            delivered = counts["delivered"]
            now = time.monotonic()
            if delivered >= rows or counts["pending"] + counts["in_flight"] == 0:
                break
            if now - started > timeout:
                say(f"[{label}] timeout after {timeout:.0f} s: stopping with {delivered}/{rows} delivered")
                break
            if now >= next_report:
                say(f"[{label}] {delivered:>7}/{rows} delivered, {delivered / (now - started):8.0f} rows/s")
                next_report += 1.0
            await asyncio.sleep(0.05)
    finally:
        seconds = time.monotonic() - started
        stop.set()
        await asyncio.gather(*tasks)
    say(f"[{label}] done: {delivered}/{rows} in {seconds:.2f} s")
    return Result(label, rows, delivered, seconds)


async def run_sqlite(args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory(prefix="ps-bench-") as folder:
        url = f"sqlite+aiosqlite:///{Path(folder) / 'bench.db'}"
        store = await open_store(url)
        try:
            await fill(store, args.rows, "sqlite")
            return await deliver(
                store, args.rows, "sqlite", workers=args.workers, batch_size=args.batch_size, timeout=args.timeout
            )
        finally:
            await store.close()


async def run_postgres(args: argparse.Namespace) -> Result | None:
    dsn = args.pg_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    schema = f"ps_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        admin = await asyncpg.connect(dsn, timeout=5)
    except Exception as e:
        say(f"[postgresql] skipped: cannot connect to {args.pg_url} ({type(e).__name__}: {e})")
        return None
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        store = await open_store(f"{args.pg_url}?schema={schema}")
        try:
            await fill(store, args.rows, "postgresql")
            return await deliver(
                store, args.rows, "postgresql", workers=args.workers, batch_size=args.batch_size, timeout=args.timeout
            )
        finally:
            await store.close()
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


def table(results: list[Result]) -> str:
    lines = [f"{'store':<12} {'rows':>7} {'delivered':>9} {'seconds':>8} {'rows/s':>8}"]
    lines += [f"{r.store:<12} {r.rows:>7} {r.delivered:>9} {r.seconds:>8.2f} {r.rate:>8.0f}" for r in results]
    return "\n".join(lines)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=5000, help="rows to deliver, one per agent (default 5000)")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help="PostgreSQL server; a schema is made and dropped")
    parser.add_argument("--workers", type=int, default=1, help="OutboxWorkers sharing the store (default 1)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per claim (default 64, as in service)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per store (default 120)")
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.workers < 1 or args.batch_size < 1:
        parser.error("--rows, --workers and --batch-size must be at least 1")
    say(f"outbox throughput: {args.rows} rows, {args.workers} worker(s), batch {args.batch_size}, no-op writer")
    results = [await run_sqlite(args)]
    if not args.skip_postgres:
        pg = await run_postgres(args)
        if pg is not None:
            results.append(pg)
    say("")
    say(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
