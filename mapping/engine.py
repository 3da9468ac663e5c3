"""The sync engine: loads an agent's state, applies ``rules.decide`` and saves state and outbox
commands in one transaction. Adapters call it after parsing and before answering their upstream, so
that what they acknowledge is durable (rule 7)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from mapping import rules as R
from mapping.catalogue import Catalogue
from mapping.clock import Clock, utcnow
from mapping.model import Agent, AgentSyncState, Delivery, OutboxStatus, PresenceObserved, SetPresence, System
from mapping.ports import ReadRequests, Store, Transaction
from mapping.rules import Result
from mapping.telemetry import NullTelemetry, Telemetry
from mapping.translation import Rules
from mapping.waiters import reject, resolve

log = logging.getLogger("presence_sync.engine")


@dataclass(frozen=True)
class Outcome:
    result: Result
    agent: Agent | None
    commands: tuple[SetPresence, ...] = ()
    detail: str = ""


HOLD_CAP_FACTOR = 10
"""A held row is written at the latest this many holds after the first change of its run."""

BATCH = 16
"""Observations per transaction in ``observe``'s group commit: enough to fold the webhooks arriving
during one commit into the next, few enough that the write lock (SQLite) and the state rows it holds
do not delay the next group's answers much."""
MANY = 128
"""Observations per transaction in ``observe_many`` (a Graph request of many items, a sweep's batch):
the directory, states and saves of a chunk are one statement each, so a chunk costs little more than
its decisions (about 30 µs each) and its commit; bigger chunks spare commits (an fsync each), and 128
still holds the write lock only a few milliseconds."""


class OutboxView:
    """The outbox rows of a transaction's agents as read at its start, changed as its own writes
    change them, and those writes in order: the rules ask the outbox about each event (what is queued
    and unsent, whether a withdrawn write was still pending), and a group of events then costs one
    read and one batch of writes instead of a few statements per event. The transitions are the
    store's (``Transaction.enqueue``, ``cancel_pending``); the agents' state rows are locked (or the
    store has one writer), so no other engine changes these rows meanwhile."""

    def __init__(self, rows: Mapping[tuple[str, System], tuple[str, OutboxStatus]]) -> None:
        self.rows = dict(rows)
        self.writes: list[tuple[SetPresence, float, float] | SetPresence] = []
        """Enqueues (command, hold, max hold) and cancellations (the withdrawn command), in order."""

    def unsent(self, agent_id: str, system: System) -> str | None:
        """``Transaction.unsent_value``: the row's value while it is pending."""
        row = self.rows.get((agent_id, system))
        return row[0] if row is not None and row[1] is OutboxStatus.PENDING else None

    def enqueue(self, command: SetPresence, hold: float, max_hold: float) -> None:
        key = (command.agent_id, command.system)
        row = self.rows.get(key)
        in_flight = row is not None and row[1] is OutboxStatus.IN_FLIGHT
        self.rows[key] = (command.value, OutboxStatus.IN_FLIGHT if in_flight else OutboxStatus.PENDING)
        self.writes.append((command, hold, max_hold))

    def cancel(self, write: SetPresence) -> OutboxStatus | None:
        """``Transaction.cancel_pending``: the status the live row had, or None when none was live."""
        key = (write.agent_id, write.system)
        row = self.rows.get(key)
        if row is None or row[1] not in (OutboxStatus.PENDING, OutboxStatus.IN_FLIGHT):
            return None
        self.rows[key] = (row[0], OutboxStatus.DELIVERED)
        self.writes.append(write)
        return row[1]

    async def write(self, tx: Transaction, now: datetime) -> None:
        """The writes, in order: each run of enqueues in one statement."""
        run: list[tuple[SetPresence, float, float]] = []
        for item in self.writes:
            if isinstance(item, tuple):
                run.append(item)
                continue
            if run:
                await tx.enqueue_many(run, now)
                run = []
            await tx.cancel_pending(item.agent_id, item.system, now)
        if run:
            await tx.enqueue_many(run, now)
        self.writes = []


def _write_out(
    outbox: OutboxView,
    state: AgentSyncState,
    decision: R.Decision,
    now: datetime,
    holds: Mapping[System, float],
) -> AgentSyncState:
    """Withdraws and queues what ``decision`` says. The outbox knows what the rules cannot: a
    withdrawn write that never left, and a queued value replaced before any attempt, will never reach
    the system, and the state must stop expecting them there. ``state`` is the engine's own (this
    transaction's), changed in place where the rules allow it."""
    commands = list(decision.commands)
    for write in decision.cancel:
        superseded = None
        if outbox.unsent(write.agent_id, write.system) is None:
            # In flight (the state still expects it, and it is not pending): an attempt cannot be
            # called back, and cancelling would void its lease, so its failure would go unheard.
            # Supersede it instead: the outbox then says, by the row, whether it is still under way.
            superseded = R.superseded(state, write, now)
        if superseded is not None:
            state, cmd = superseded
            commands.append(cmd)
        elif outbox.cancel(write) is OutboxStatus.PENDING:
            state = R.withdrawn(state, write)
    for cmd in commands:
        hold = holds.get(cmd.system, 0.0)
        unsent = outbox.unsent(cmd.agent_id, cmd.system)
        outbox.enqueue(cmd, hold, hold * HOLD_CAP_FACTOR)
        if unsent is not None:
            state = R.never_sent(state, cmd.system, unsent, owned=True)
    return state


class SyncEngine:
    def __init__(
        self,
        store: Store,
        catalogue: Catalogue,
        rules: Rules,
        *,
        telemetry: Telemetry | None = None,
        clock: Clock = utcnow,
        on_enqueued: Callable[[], None] | None = None,
        holds: Mapping[System, float] | None = None,
        reads: ReadRequests | None = None,
    ) -> None:
        """``holds``: per target system, the quiet time (seconds) an observed change waits in the
        outbox before it is written, so that a burst folds into one upstream call (rule 6; see
        ``Transaction.enqueue``); a steady stream is still written every ``HOLD_CAP_FACTOR`` holds.
        An agent's own command (the bot) is never held: the agent is waiting for the answer.
        ``reads``: where to ask for a read of Teams once a session write landed over what Teams
        showed (rule 2: Graph notifies nothing when the aggregate does not change)."""
        self.store = store
        self.catalogue = catalogue
        self.rules = rules
        self.telemetry = telemetry or NullTelemetry()
        self.clock = clock
        self.on_enqueued = on_enqueued
        self.holds = dict(holds or {})
        self.reads = reads
        # Per-agent serialisation inside this process; across processes, load_state's row lock.
        self._locks: dict[str, asyncio.Lock] = {}
        # The group-commit front of ``observe``: waiting observations and the task writing them.
        self._queue: list[tuple[PresenceObserved, str | None, asyncio.Future[Outcome]]] = []
        self._flusher: asyncio.Future[None] | None = None

    def _lock(self, agent_id: str) -> asyncio.Lock:
        lock = self._locks.get(agent_id)
        if lock is None:
            lock = self._locks[agent_id] = asyncio.Lock()
        return lock

    async def agent_for(self, system: System, external_id: str) -> Agent | None:
        """The directory entry for a Dynamics systemuserid or a Teams (Entra) object id. Unknown ids
        are recorded for `agents list --unknown`, never guessed (rule 1)."""
        key = external_id.strip().lower()
        agent = await (self.store.get_agent(key) if system is System.DYNAMICS else self.store.get_agent_by_entra(key))
        if agent is None:
            async with self.store.transaction() as tx:
                await tx.record_unknown(system, key, self.clock())
        return agent

    async def observe(self, event: PresenceObserved, *, intake: str | None = None) -> Outcome:
        """Applies one observation. ``event.agent_id`` is the Dynamics systemuserid (resolve Teams ids
        with ``agent_for`` first).

        Group commit: observations arriving while an earlier group is being written wait for it and
        are then written together, up to ``BATCH`` in one transaction. Nothing waits for company (a
        lone request is written at once), each caller is answered only after its group committed,
        and a group that fails is written again one by one, so each caller gets its own outcome or
        its own error. Concurrent webhooks thus share one commit instead of queueing for the store's
        writer (SQLite) or paying a transaction's round trips each (PostgreSQL)."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue.append((event, intake, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        return await future

    async def _flush(self) -> None:
        """Writes queued observations group by group until none is left (see ``observe``)."""
        while self._queue:
            group = [item for item in self._queue[:BATCH] if not item[2].done()]  # cancelled callers dropped
            del self._queue[:BATCH]
            if not group:
                continue
            try:
                outcomes = await self._observe_chunk([e for e, _, _ in group], [i for _, i, _ in group])
            except Exception as e:
                if len(group) == 1:
                    reject(group[0][2], e)
                    continue
                for event, intake, future in group:  # the group rolled back: each on its own
                    if future.done():
                        continue
                    try:
                        (outcome,) = await self._observe_chunk([event], [intake])
                    except Exception as alone:
                        reject(future, alone)
                    else:
                        resolve(future, outcome)
                continue
            except BaseException as e:  # cancelled (shutdown): no caller may wait forever
                for _, _, future in group + self._queue:
                    reject(future, e)
                self._queue.clear()
                raise
            for (_, _, future), outcome in zip(group, outcomes, strict=True):
                resolve(future, outcome)

    async def observe_many(self, events: Sequence[PresenceObserved], *, intake: str | None = None) -> list[Outcome]:
        """Applies observations in their order, up to ``MANY`` per transaction: one commit for a
        Graph request of many items or a batch of reads instead of one each, which is what the
        store's single writer (SQLite) or round trips (PostgreSQL) make expensive. Same rules, same
        outcomes as one ``observe`` per event; a failure rolls back only its chunk. A single event
        goes through ``observe``'s group commit (a Graph request of one item, the usual case at low
        load, then shares a commit with its neighbours' instead of paying one of its own)."""
        if len(events) == 1:
            return [await self.observe(events[0], intake=intake)]
        outcomes: list[Outcome] = []
        for start in range(0, len(events), MANY):
            chunk = events[start : start + MANY]
            outcomes.extend(await self._observe_chunk(chunk, [intake] * len(chunk)))
        return outcomes

    async def _observe_chunk(self, events: Sequence[PresenceObserved], intakes: Sequence[str | None]) -> list[Outcome]:
        # The directory is read in the transaction (one connection, no separate round trips before
        # it); locks are keyed by the id as the directory keeps it (lower case), so they can be
        # taken before the agents are known.
        event_keys = [event.agent_id.strip().lower() for event in events]
        keys = sorted(set(event_keys))
        decisions: list[R.Decision | None] = []
        async with contextlib.AsyncExitStack() as held:
            # Locks (and, in the transaction, state rows) are taken in one order, so two batches
            # touching the same agents cannot deadlock.
            for key in keys:
                await held.enter_async_context(self._lock(key))
            now = self.clock()
            async with self.store.transaction() as tx:
                found, states = await tx.agents_with_states(keys)
                agents = [found.get(key) for key in event_keys]  # each event's directory entry
                outbox = OutboxView(await tx.outbox_rows(list(states)))
                changed: set[str] = set()
                for event, agent in zip(events, agents, strict=True):
                    if agent is None or not agent.enabled:
                        decisions.append(None)
                        continue
                    agent_id = agent.dynamics_user_id
                    state = states[agent_id]
                    unsent = outbox.unsent(agent_id, event.system) if R.needs_unsent(state, event.system) else None
                    # A Teams event converges Dynamics too: it needs what the outbox says of Dynamics.
                    dynamics_unsent = (
                        outbox.unsent(agent_id, System.DYNAMICS)
                        if event.system is System.TEAMS and R.needs_unsent(state, System.DYNAMICS)
                        else None
                    )
                    # The state is this transaction's own (loaded for it, or the last decision's).
                    decision = R.decide(
                        state, event, self.rules, self.catalogue, now, unsent, dynamics_unsent, owned=True
                    )
                    if decision.result not in (Result.STALE, Result.DUPLICATE):
                        states[agent_id] = decision.state
                        changed.add(agent_id)
                    states[agent_id] = _write_out(outbox, states[agent_id], decision, now, self.holds)
                    decisions.append(decision)
                await outbox.write(tx, now)
                # Handed over: nothing here reads or changes these states after the save.
                await tx.save_states([states[agent_id] for agent_id in sorted(changed)], handed_over=True)
        outcomes: list[Outcome] = []
        for event, intake, agent, done in zip(events, intakes, agents, decisions, strict=True):
            source = intake or event.source
            if done is None:
                self.telemetry.event(source, Result.UNKNOWN_AGENT)
                detail = "agent disabled" if agent else "agent not in directory"
                outcomes.append(Outcome(Result.UNKNOWN_AGENT, agent, detail=detail))
                continue
            assert agent is not None
            self._after(agent, source, event, done)
            outcomes.append(Outcome(done.result, agent, done.commands, done.detail))
            await self._request_reads(agent, done, "a replaced session's value")  # after the commit
        return outcomes

    async def _request_reads(self, agent: Agent, decision: R.Decision, why: str) -> None:
        """The reads a decision asks for, once it is committed (the read sees what was saved)."""
        if self.reads is not None:
            for system in decision.read:
                await self.reads.request_read(system, agent.dynamics_user_id, why)

    async def command(self, agent: Agent, presence_id: str, *, source: str = "bot") -> Outcome:
        """An agent's own request to change presence: Dynamics gets it, Teams follows."""
        presence = self.catalogue.get(presence_id)
        if presence is None:
            return Outcome(Result.UNKNOWN_PRESENCE, agent, detail=f"presence id {presence_id} is not in the catalogue")
        decision = await self._decide_now(
            agent, source, lambda state, now: R.command(state, presence, self.rules, self.catalogue, now, source)
        )
        return Outcome(decision.result, agent, decision.commands, decision.detail)

    async def _decide_now(
        self, agent: Agent, source: str, decide: Callable[[AgentSyncState, datetime], R.Decision]
    ) -> R.Decision:
        """One decision not made from an observation (a command, a dead letter): saved with its
        commands in one transaction, written at once (never held: someone is waiting for it)."""
        async with self._lock(agent.dynamics_user_id):
            now = self.clock()
            async with self.store.transaction() as tx:
                decision = decide(await tx.load_state(agent.dynamics_user_id), now)
                outbox = OutboxView(await tx.outbox_rows([agent.dynamics_user_id]))
                state = _write_out(outbox, decision.state, decision, now, {})
                await outbox.write(tx, now)
                await tx.save_state(state)
        if decision.commands or source != "delivery":
            self._after(agent, source, None, decision)
        return decision

    async def on_outcome(self, delivery: Delivery, outcome: str, error: str | None) -> None:
        """DeliveryListener: a write of ours landed or died. The state records what each system
        really holds (the sweep repairs the difference), and a session that landed over what Teams
        showed is read back."""
        if outcome not in ("delivered", "dead"):
            return
        agent = await self.store.get_agent(delivery.agent_id)
        if agent is None:
            return
        rule = R.landed if outcome == "delivered" else R.write_died
        decision = await self._decide_now(
            agent,
            "delivery" if outcome == "delivered" else "dead_letter",
            lambda state, now: rule(state, delivery.system, delivery.value, self.rules, self.catalogue, now),
        )
        await self._request_reads(agent, decision, "session landed")

    async def recheck_dead_letters(self, limit: int = 10_000) -> int:
        """Applies the death of every dead row whose write the state still expects (its report was
        lost: the process died between the store's ``fail`` and the engine's ``on_outcome``, or the
        state's transaction failed then). Left alone, the state would count the dead write as on its
        way, and the sweep would find the agent in sync while the system shows something else. The
        sweep calls it first. Returns how many were applied."""
        applied = 0
        for row in await self.store.list_outbox(OutboxStatus.DEAD, limit):
            state = (await self.store.load_states([row.agent_id])).get(row.agent_id)
            if state is None:
                continue
            expected = (
                state.dynamics_written == row.value
                if row.system is System.DYNAMICS
                else row.value in state.session_unacked
            )
            if not expected:
                continue
            delivery = Delivery(row.id, row.agent_id, row.system, row.value, row.generation, row.attempts, "")
            await self.on_outcome(delivery, "dead", row.last_error)
            applied += 1
        return applied

    async def refresh_sessions(self, *, available_every: timedelta, others_every: timedelta) -> int:
        """Re-issues the bridge's Teams session before Graph lets it fade or expire (an Available
        session fades to Away after 5 minutes; every session ends at its expiration). Goes through
        the outbox like any write, so limits and retries apply. Returns how many were re-issued."""
        agents = await self.store.list_agents(enabled_only=True)
        states = await self.store.load_states([a.dynamics_user_id for a in agents])
        now = self.clock()
        count = 0
        for agent_id, st in states.items():
            held, at = st.session_written, st.session_written_at
            if R.refresh(st, now) is None or held is None or at is None:
                continue
            every = available_every if held.startswith("Available/") else others_every
            if now - at < every:
                continue
            async with self._lock(agent_id):
                async with self.store.transaction() as tx:
                    fresh = R.refresh(await tx.load_state(agent_id), now)
                    if fresh is None or fresh[1].value != held:
                        continue
                    await tx.save_state(fresh[0])
                    await tx.enqueue(fresh[1], now)
            count += 1
        if count and self.on_enqueued:
            self.on_enqueued()
        return count

    def _after(self, agent: Agent, source: str, event: PresenceObserved | None, decision: R.Decision) -> None:
        """Counts the event, logs it (DEBUG: one line per event is thousands of lines a second in a
        burst at scale; the counters and the console's timeline say what happened) and wakes the
        outbox for the commands it queued."""
        self.telemetry.event(source, decision.result)
        if decision.commands and self.on_enqueued:
            self.on_enqueued()
        if not log.isEnabledFor(logging.DEBUG):
            return
        extra: dict[str, object] = {
            "agent": agent.dynamics_user_id,
            "agent_name": agent.display_name,
            "source": source,
            "result": str(decision.result),
            "commands": [f"{c.system}={c.value}" for c in decision.commands],
        }
        if event is not None:
            extra |= {"system": str(event.system), "value": event.value, "version": event.version}
        if decision.detail:
            extra["detail"] = decision.detail
        extra |= dict(decision.log)
        log.debug("event", extra={"fields": extra})
