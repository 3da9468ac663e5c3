"""The console's reads (``console.reads``) behave alike on the in-memory store (in Python) and both
SQL dialects (in the database): search, sort (including keys inside the state document), paging,
the page's outbox rows, and which agents changed since a moment."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from console.reads import AgentPage, reads_for
from mapping.model import Agent, AgentSyncState, Seen, SetPresence, System
from mapping.ports import Store
from tests.support import AVAILABLE, AWAY, BUSY, DND

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
PEOPLE = [
    ("Dora Diaz", BUSY, "Busy/InACall"),
    ("alice Adams", AVAILABLE, "Away/Away"),
    ("Bob 100%_Brown", AWAY, "DoNotDisturb/Presenting"),
    ("Carol Chen", DND, "Available/Available"),
    ("Eve Evans", None, None),  # in the directory, never seen by the bridge
]


def agent(i: int, name: str) -> Agent:
    return Agent(f"{i:08x}-0000-4000-8000-00000000d365", f"{i:08x}-0000-4000-8000-0000000e0a1d", name)


async def fill(store: Store) -> list[Agent]:
    agents = [agent(i, p[0]) for i, p in enumerate(PEOPLE)]
    await store.upsert_agents(agents)
    for a, (_, dyn, teams) in zip(agents, PEOPLE, strict=True):
        if dyn is None:
            continue
        s = AgentSyncState(a.dynamics_user_id, own_dynamics=dyn)
        s.dynamics_seen = Seen(dyn, 1, NOW, NOW)
        s.teams_seen = Seen(teams, None, NOW, NOW)
        async with store.transaction() as tx:
            await tx.save_state(s)
    return agents


def names(page: AgentPage) -> list[str]:
    return [r.agent.display_name for r in page.rows]


async def test_search_sort_and_paging(any_store: Store):
    agents = await fill(any_store)
    reads = reads_for(any_store)
    page = await reads.console_agents(search="", sort="name", descending=False, offset=0, limit=2)
    assert page.total == 5
    assert names(page) == ["alice Adams", "Bob 100%_Brown"]  # case-insensitive name order
    page = await reads.console_agents(search="", sort="name", descending=False, offset=4, limit=2)
    assert names(page) == ["Eve Evans"]
    assert page.rows[0].state is None
    page = await reads.console_agents(search="CHEN", sort="name", descending=False, offset=0, limit=50)
    assert (page.total, names(page)) == (1, ["Carol Chen"])
    assert page.rows[0].state is not None and page.rows[0].state.own_dynamics == DND
    page = await reads.console_agents(search="100%_", sort="name", descending=False, offset=0, limit=50)
    assert names(page) == ["Bob 100%_Brown"]  # LIKE wildcards in a search are literal
    page = await reads.console_agents(search="%", sort="name", descending=False, offset=0, limit=50)
    assert names(page) == ["Bob 100%_Brown"]
    page = await reads.console_agents(
        search=agents[3].entra_object_id[:8], sort="id", descending=False, offset=0, limit=9
    )
    assert names(page) == ["Carol Chen"]
    page = await reads.console_agents(search="", sort="teams", descending=True, offset=0, limit=4)
    assert names(page) == ["Bob 100%_Brown", "Dora Diaz", "alice Adams", "Carol Chen"]
    page = await reads.console_agents(search="", sort="dynamics", descending=False, offset=0, limit=9)
    assert names(page)[-1] == "Eve Evans"  # never seen: last in either direction
    page = await reads.console_agents(search="", sort="teams", descending=False, offset=0, limit=9)
    assert names(page) == ["Carol Chen", "alice Adams", "Dora Diaz", "Bob 100%_Brown", "Eve Evans"]


async def test_outbox_rows_of_a_page(any_store: Store):
    agents = await fill(any_store)
    async with any_store.transaction() as tx:
        await tx.enqueue(SetPresence(agents[0].dynamics_user_id, System.TEAMS, "Busy/InACall"), NOW)
        await tx.enqueue(SetPresence(agents[1].dynamics_user_id, System.DYNAMICS, AWAY), NOW)
    rows = await reads_for(any_store).console_outbox_for([agents[0].dynamics_user_id, agents[2].dynamics_user_id])
    assert list(rows) == [(agents[0].dynamics_user_id, System.TEAMS)]
    assert rows[(agents[0].dynamics_user_id, System.TEAMS)].value == "Busy/InACall"


async def test_changed_since_names_the_agents_saved_after(sql_url: str, open_sql):
    store = await open_sql(sql_url)
    agents = await fill(store)
    reads = reads_for(store)
    latest, ids = await reads.console_changed_since(None, 10)
    assert latest is not None and ids == []  # the first look only learns where things are
    assert await reads.console_changed_since(latest, 10) == (latest, [])
    async with store.transaction() as tx:
        s = await tx.load_state(agents[2].dynamics_user_id)
        s.own_teams, s.own_teams_since = "Busy/InAMeeting", NOW + timedelta(minutes=1)
        await tx.save_state(s)
    later, ids = await reads.console_changed_since(latest, 10)
    assert later is not None and later > latest
    assert ids == [agents[2].dynamics_user_id]


async def test_last_teams_report_of_a_subscriptions_agents(any_store: Store):
    agents = await fill(any_store)
    async with any_store.transaction() as tx:
        s = await tx.load_state(agents[1].dynamics_user_id)
        s.teams_seen = Seen("Busy/InACall", None, NOW + timedelta(minutes=7), NOW)
        await tx.save_state(s)
    reads = reads_for(any_store)
    ids = [agents[0].entra_object_id, agents[1].entra_object_id.upper(), agents[4].entra_object_id]
    assert await reads.console_last_teams_report(ids) == NOW + timedelta(minutes=7)
    assert await reads.console_last_teams_report([agents[0].entra_object_id]) == NOW
    assert await reads.console_last_teams_report([agents[4].entra_object_id]) is None  # never seen
