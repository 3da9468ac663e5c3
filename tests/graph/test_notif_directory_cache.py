"""The intake's memory of who an Entra id belongs to (``EntraAgents``), through the real route and the
pending-read batcher: a user is looked up once per ``AGENT_TTL`` and the directory is asked again
after it (a moved Entra id is followed), another user is never served from someone else's entry, an
unknown id is asked (and recorded) every time, and the batcher trusts memory only for enabled agents."""

from __future__ import annotations

import aiohttp
import pytest

from graph_sync.notifications import AGENT_TTL, LIST_AFTER, PENDING_KIND
from mapping.model import Agent
from tests.graph.conftest import Certificate, Rig, agents
from tests.graph.test_notifications import dynamics_value, known_agents, post, rich_item, token
from tests.support import BUSY, DND

ALICE, BOB, CAROL = agents(3)


class Ticker:
    """A monotonic clock moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lookups(rich_rig: Rig, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every Entra id the directory is asked about, in order."""
    asked: list[str] = []
    real = rich_rig.bridge.store.get_agent_by_entra

    async def get_agent_by_entra(entra_object_id: str) -> Agent | None:
        asked.append(entra_object_id)
        return await real(entra_object_id)

    monkeypatch.setattr(rich_rig.bridge.store, "get_agent_by_entra", get_agent_by_entra)
    return asked


@pytest.fixture
def ticker(rich_rig: Rig) -> Ticker:
    clock = Ticker()
    rich_rig.intake.agents.clock = clock
    return clock


async def notify(
    rig: Rig, cert: Certificate, http: aiohttp.ClientSession, agent: Agent, availability: str, activity: str
) -> None:
    body = {"value": [rich_item(rig, cert, agent, availability, activity)], "validationTokens": [token(rig)]}
    status, answer = await post(http, rig.notify_url, body)
    assert status == 202 and answer == {"accepted": 1}


async def test_a_user_is_looked_up_once_per_ttl_and_another_user_on_their_own(
    rich_rig: Rig, certificate: Certificate, http: aiohttp.ClientSession, lookups: list[str], ticker: Ticker
) -> None:
    await known_agents(rich_rig, [ALICE, BOB])
    await notify(rich_rig, certificate, http, ALICE, "Busy", "InACall")
    await notify(rich_rig, certificate, http, ALICE, "DoNotDisturb", "Presenting")
    assert lookups == [ALICE.entra_object_id]
    assert await dynamics_value(rich_rig, ALICE) == DND  # applied, to the agent held in memory
    await notify(rich_rig, certificate, http, BOB, "Busy", "InACall")
    assert lookups == [ALICE.entra_object_id, BOB.entra_object_id]  # not answered from Alice's entry
    assert await dynamics_value(rich_rig, BOB) == BUSY and await dynamics_value(rich_rig, ALICE) == DND
    ticker.now += AGENT_TTL - 0.001
    await notify(rich_rig, certificate, http, ALICE, "Busy", "InACall")
    assert lookups == [ALICE.entra_object_id, BOB.entra_object_id]
    ticker.now += 0.001
    await notify(rich_rig, certificate, http, ALICE, "DoNotDisturb", "Presenting")
    assert lookups == [ALICE.entra_object_id, BOB.entra_object_id, ALICE.entra_object_id]
    assert await dynamics_value(rich_rig, ALICE) == DND


async def test_an_entra_id_given_to_another_agent_is_followed_once_the_ttl_is_over(
    rich_rig: Rig, certificate: Certificate, http: aiohttp.ClientSession, ticker: Ticker
) -> None:
    await known_agents(rich_rig, [ALICE])
    await notify(rich_rig, certificate, http, ALICE, "Busy", "InACall")
    assert await dynamics_value(rich_rig, ALICE) == BUSY
    # An import corrects the directory: the Entra id was Carol's all along, Alice gets her own.
    moved = Agent(ALICE.dynamics_user_id, "0a1b2c3d-0000-4000-8000-00000000a11c", ALICE.display_name)
    await rich_rig.bridge.store.upsert_agents([moved])
    await known_agents(rich_rig, [Agent(CAROL.dynamics_user_id, ALICE.entra_object_id, "Carol Agent")])
    ticker.now += AGENT_TTL
    await notify(rich_rig, certificate, http, ALICE, "DoNotDisturb", "Presenting")  # Carol's Teams, by that id
    assert await dynamics_value(rich_rig, CAROL) == DND
    assert await dynamics_value(rich_rig, ALICE) == BUSY


async def test_an_unknown_user_is_asked_and_recorded_every_time_and_applied_once_added(
    rich_rig: Rig, certificate: Certificate, http: aiohttp.ClientSession, lookups: list[str], ticker: Ticker
) -> None:
    stranger = agents(1, start=77)[0]
    for _ in range(2):
        await notify(rich_rig, certificate, http, stranger, "Busy", "InACall")
    assert lookups == [stranger.entra_object_id] * 2
    assert [u["id"] for u in await rich_rig.bridge.store.list_unknown()] == [stranger.entra_object_id]
    assert rich_rig.telemetry.events[("graph_notification", "unknown_agent")] == 2
    await known_agents(rich_rig, [stranger])  # added: the very next notification is applied
    await notify(rich_rig, certificate, http, stranger, "Busy", "InACall")
    assert await dynamics_value(rich_rig, stranger) == BUSY


async def test_the_batcher_reads_enabled_agents_from_memory_and_asks_again_about_disabled_ones(
    rich_rig: Rig, lookups: list[str], ticker: Ticker
) -> None:
    rig = rich_rig
    await rig.intake.stop()  # rounds driven by hand below
    await known_agents(rig, [ALICE, BOB])
    rig.emu.add_users([ALICE.entra_object_id, BOB.entra_object_id], own=("Busy", "InACall"))
    await rig.bridge.store.set_agent_enabled(BOB.dynamics_user_id, False)
    assert (await rig.intake.agents.get(ALICE.entra_object_id)) == ALICE
    assert (await rig.intake.agents.get(BOB.entra_object_id)).enabled is False  # type: ignore[union-attr]
    await rig.bridge.store.set_agent_enabled(BOB.dynamics_user_id, True)  # enabled again since
    lookups.clear()
    await rig.intake._queue_reads([ALICE.entra_object_id, BOB.entra_object_id], "notification")
    assert await rig.intake.read_pending() == 2
    assert lookups == [BOB.entra_object_id]  # Alice from memory; Bob's disabled entry not trusted
    assert await dynamics_value(rig, ALICE) == BUSY and await dynamics_value(rig, BOB) == BUSY
    assert await rig.bridge.store.list_docs(PENDING_KIND) == {}


async def test_a_burst_of_first_sightings_lists_the_directory_once_per_ttl_and_the_rest_comes_from_it(
    rich_rig: Rig,
    certificate: Certificate,
    http: aiohttp.ClientSession,
    lookups: list[str],
    ticker: Ticker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = rich_rig
    crowd = agents(LIST_AFTER + 8, start=500)
    await known_agents(rig, crowd)
    listings: list[bool] = []
    real_list = rig.bridge.store.list_agents

    async def list_agents(*, enabled_only: bool = False) -> list[Agent]:
        listings.append(enabled_only)
        return await real_list(enabled_only=enabled_only)

    monkeypatch.setattr(rig.bridge.store, "list_agents", list_agents)

    async def burst(people: list[Agent], availability: str, activity: str) -> None:
        items = [rich_item(rig, certificate, a, availability, activity) for a in people]
        status, answer = await post(http, rig.notify_url, {"value": items, "validationTokens": [token(rig)]})
        assert status == 202 and answer == {"accepted": len(people)}

    await burst(crowd[:LIST_AFTER], "Busy", "InACall")
    assert lookups == [a.entra_object_id for a in crowd[:LIST_AFTER]]
    await rig.intake.agents.listed()
    assert listings == [True]  # one read of the enabled agents
    await burst(crowd[LIST_AFTER:], "Busy", "InACall")
    assert len(lookups) == LIST_AFTER  # the others came from the listing
    assert [await dynamics_value(rig, a) for a in crowd] == [BUSY] * len(crowd)
    strangers = agents(LIST_AFTER, start=900)  # more ids asked about within the period: no second listing
    await burst(strangers, "Busy", "InACall")
    await rig.intake.agents.listed()
    assert len(lookups) == 2 * LIST_AFTER and listings == [True]
    ticker.now += AGENT_TTL  # a new period: what was listed has expired and is asked again
    await burst(crowd[:1], "DoNotDisturb", "Presenting")
    assert lookups[-1] == crowd[0].entra_object_id and listings == [True]
    assert await dynamics_value(rig, crowd[0]) == DND
