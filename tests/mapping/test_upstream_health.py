"""Rule 7 in the core: a down upstream is slowed as a whole (breaker), probed, re-driven at once when
it answers; a command dies only after the dead-letter budget; a dead instance's rows are taken over.

Driven by a fake clock and in-memory writers, so every bound is a count of calls, never a time."""

from __future__ import annotations

from datetime import timedelta

from mapping.errors import PermanentError, RetryableError, Throttled
from mapping.memory import MemoryStore
from mapping.model import Agent, OutboxStatus, SetPresence, System
from mapping.outbox import OutboxWorker
from mapping.retry import RetryPolicy
from mapping.upstream_health import BreakerPolicy, BreakerState, UpstreamHealth
from tests.support import T0, FakeClock

T, D = System.TEAMS, System.DYNAMICS
AGENTS = [
    Agent(f"00000000-0000-4000-8000-{i:012d}", f"10000000-0000-4000-8000-{i:012d}", f"Agent {i}") for i in range(40)
]


class Upstream:
    """A writer whose upstream is down (every call fails with ``error``) until ``up`` is set."""

    def __init__(self, system: System, error: Exception | None = None) -> None:
        self.system = system
        self.error = error or RetryableError("503 Service Unavailable", status=503)
        self.down = True
        self.calls = 0
        self.landed: dict[str, str] = {}

    async def apply(self, agent: Agent, value: str) -> None:
        self.calls += 1
        if self.down:
            raise self.error
        self.landed[agent.dynamics_user_id] = value


class Counting:
    def __init__(self) -> None:
        self.states: list[tuple[str, str]] = []
        self.probes: list[tuple[str, str]] = []
        self.dead: list[str] = []

    def event(self, source: str, result: str) -> None: ...
    def rejected(self, route: str, reason: str) -> None: ...
    def delivery(self, system: str, result: str, seconds: float) -> None: ...
    def latency(self, name: str, seconds: float) -> None: ...

    def breaker(self, system: str, state: str) -> None:
        self.states.append((system, state))

    def probe(self, system: str, result: str) -> None:
        self.probes.append((system, result))

    def dead_lettered(self, system: str) -> None:
        self.dead.append(system)


async def setup(
    upstream: Upstream, *, agents: int = 20, policy: RetryPolicy | None = None, clock: FakeClock | None = None
) -> tuple[MemoryStore, OutboxWorker, FakeClock, Counting]:
    clock = clock or FakeClock()
    store = MemoryStore()
    await store.upsert_agents(AGENTS[:agents])
    telemetry = Counting()
    worker = OutboxWorker(
        store,
        {upstream.system: upstream},
        policy=policy or RetryPolicy(jitter=False),
        telemetry=telemetry,
        clock=clock,
        owner="w1",
        breaker=BreakerPolicy(min_jitter=1.0),
    )
    return store, worker, clock, telemetry


async def enqueue(store: MemoryStore, clock: FakeClock, system: System, value: str, agents: int) -> None:
    async with store.transaction() as tx:
        for a in AGENTS[:agents]:
            await tx.enqueue(SetPresence(a.dynamics_user_id, system, value), clock())


def test_probe_schedule_grows_with_jitter_and_is_capped() -> None:
    policy = BreakerPolicy(base_seconds=1.0, max_probe_seconds=5.0, min_jitter=0.8)
    assert [policy.probe_interval(n, lambda lo, hi: hi) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert [policy.probe_interval(n, lambda lo, hi: lo) for n in range(3)] == [0.8, 1.6, 3.2]
    # Probes start within 60 s at least 0.8, 1.6, 3.2, then every 4 s: 3 + 13 of them.
    assert policy.max_probes(60.0) == 16
    assert policy.max_probes(0.5) == 0


def test_failures_of_several_rows_open_the_breaker_one_row_does_not() -> None:
    health = UpstreamHealth(BreakerPolicy(threshold=3, window_seconds=10))
    error = RetryableError("503")
    for _ in range(5):
        health.failed("teams", "alice", error, T0)
    assert health.state("teams") is BreakerState.CLOSED  # one row failing is that row's trouble
    health.failed("teams", "bob", error, T0 + timedelta(seconds=20))
    health.failed("teams", "carol", error, T0 + timedelta(seconds=21))
    assert health.state("teams") is BreakerState.CLOSED  # alice's failure is out of the window
    health.failed("teams", "dave", PermanentError("404"), T0 + timedelta(seconds=22))
    assert health.state("teams") is BreakerState.CLOSED  # a permanent error is the row's own fault
    health.failed("teams", "erin", error, T0 + timedelta(seconds=22))
    assert health.state("teams") is BreakerState.OPEN
    assert health.state("dynamics") is BreakerState.CLOSED  # one breaker per upstream


def test_retry_after_opens_at_once_and_holds_the_probe_back() -> None:
    health = UpstreamHealth(BreakerPolicy())
    health.failed("teams", "alice", Throttled("429", retry_after=5), T0)
    assert health.state("teams") is BreakerState.OPEN
    assert health.claim_limit("teams", T0 + timedelta(seconds=4.9), 64) == 0
    assert health.claim_limit("teams", T0 + timedelta(seconds=5), 64) == 1
    assert health.state("teams") is BreakerState.PROBING


async def test_a_down_upstream_costs_a_bounded_number_of_calls_and_is_redriven_at_once() -> None:
    """40 rows, the upstream down for 60 s (fake clock, the worker polling every 0.25 s): the calls
    are the first batch plus the probes the schedule allows, not rows times tries; the first probe
    that succeeds delivers every row in the next claim; nothing died."""
    upstream = Upstream(T)
    store, worker, clock, telemetry = await setup(upstream, agents=40)
    await enqueue(store, clock, T, "Busy/InACall", 40)
    outage = 60.0
    steps = int(outage / 0.25)
    for i in range(steps):
        await worker.run_once()
        if i == steps // 2:  # new values during the outage do not make rows tried again
            await enqueue(store, clock, T, "DoNotDisturb/Presenting", 40)
        clock.advance(0.25)
    during = upstream.calls
    bound = 40 + worker.health.policy.max_probes(outage)  # the first batch failed together
    assert during <= bound, (during, bound)
    assert worker.health.state("teams") is BreakerState.OPEN
    assert (await store.outbox_counts())["dead"] == 0
    upstream.down = False
    rounds = 0
    while len(upstream.landed) < 40 and rounds < 100:
        await worker.run_once()
        clock.advance(0.25)
        rounds += 1
    assert upstream.landed == {a.dynamics_user_id: "DoNotDisturb/Presenting" for a in AGENTS}
    # Found back by the next probe (at most max_probe_seconds), then everything at once.
    assert rounds <= worker.health.policy.max_probe_seconds / 0.25 + 2, rounds
    assert worker.health.state("teams") is BreakerState.CLOSED
    assert telemetry.probes[-1] == ("teams", "success")
    assert ("teams", "open") in telemetry.states and telemetry.states[-1] == ("teams", "closed")
    assert telemetry.dead == []


async def test_a_command_dies_after_the_budget_not_before() -> None:
    """One row failing on its own (the upstream answers others): retried with backoff for the whole
    budget, then a dead letter, counted for the alert."""
    upstream = Upstream(D)
    policy = RetryPolicy(jitter=False, max_attempts=3, dead_letter_after_seconds=3600)
    store, worker, clock, telemetry = await setup(upstream, agents=1, policy=policy)
    await enqueue(store, clock, D, "busy", 1)
    start = clock()
    tries = 0
    while clock() - start < timedelta(seconds=3590):
        tries += await worker.run_once()
        clock.advance(10)
        row = await store.outbox_row(AGENTS[0].dynamics_user_id, D)
        assert row is not None and row.status is OutboxStatus.PENDING, (clock() - start, row)
        if tries == 2:  # a new value during the backoff keeps the run's clock
            await enqueue(store, clock, D, "away", 1)
    assert tries > policy.max_attempts  # more tries than the bound alone would allow
    while clock() - start <= timedelta(seconds=3600 + policy.max_delay_seconds + 10):
        await worker.run_once()
        clock.advance(10)
    row = await store.outbox_row(AGENTS[0].dynamics_user_id, D)
    assert row is not None and row.status is OutboxStatus.DEAD and row.value == "away"
    assert telemetry.dead == ["dynamics"]
    assert worker.health.state("dynamics") is BreakerState.CLOSED


async def test_no_row_dies_while_its_upstream_is_down_even_past_the_budget() -> None:
    upstream = Upstream(T)
    policy = RetryPolicy(jitter=False, max_attempts=1, dead_letter_after_seconds=0)
    store, worker, clock, _telemetry = await setup(upstream, agents=5, policy=policy)
    await enqueue(store, clock, T, "Busy/InACall", 5)
    await worker.run_once()  # all five fail together: the breaker opens; the first ones die
    early = (await store.outbox_counts())["dead"]
    assert early < 5  # rows failing once the breaker was open did not die
    for _ in range(400):
        await worker.run_once()
        clock.advance(0.25)
    assert (await store.outbox_counts())["dead"] == early
    upstream.down = False
    for _ in range(40):
        await worker.run_once()
        clock.advance(0.25)
    assert len(upstream.landed) == 5 - early


async def test_rows_of_a_silent_instance_are_taken_over_after_three_heartbeats() -> None:
    store = MemoryStore()
    await store.upsert_agents(AGENTS[:2])
    clock = FakeClock()
    upstream = Upstream(T)
    upstream.down = False
    dead = OutboxWorker(store, {T: upstream}, clock=clock, owner="dead")
    alive = OutboxWorker(store, {T: upstream}, clock=clock, owner="alive")
    await enqueue(store, clock, T, "Busy/InACall", 2)
    await dead.heartbeat(2.0)
    assert len(await store.claim([T], 10, 30, "dead", clock())) == 2  # then it is killed
    clock.advance(5)
    assert await alive.heartbeat(2.0) == 0  # 5 s of silence: not yet 3 heartbeats
    assert await alive.run_once() == 0
    clock.advance(1.5)
    assert await alive.heartbeat(2.0) == 2
    assert await alive.run_once() == 2  # long before the 30 s lease
    assert upstream.landed.keys() == {a.dynamics_user_id for a in AGENTS[:2]}
    assert await store.get_doc("outbox.heartbeat", "dead") is None
