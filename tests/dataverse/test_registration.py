"""``register_webhook`` (idempotent, dry run, updates in place, duplicates removed), the full loop
emulator -> webhook -> intake -> store once registered, and ``discover_agents`` against the emulator."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest
from aiohttp import web

from dataverse.client import DataverseClient
from dataverse.discovery import DISABLED, ENTRA_TAKEN, NO_ENTRA, discover_agents
from dataverse.registration import (
    ENDPOINT_NAME,
    POST_IMAGE_ALIAS,
    RegistrationResult,
    check_webhook_url,
    register_webhook,
)
from emulators.dataverse import AVAILABLE, BUSY, DataverseEmulator
from emulators.serving import serve_app
from mapping.bridge import Bridge
from mapping.errors import ConfigError, PermanentError
from mapping.model import Agent, System
from service.stack import agent_ids
from tests.dataverse.conftest import KEY, Served, seed
from tests.support import ALICE, BOB

CAROL = Agent("c0c0c0c0-0000-4000-8000-00000000c001", "0a1b2c3d-0000-4000-8000-000000000003", "Carol User")
DAVE = Agent("d0d0d0d0-0000-4000-8000-00000000d001", "0a1b2c3d-0000-4000-8000-000000000004", "Dave Disabled")
EVE = Agent("e0e0e0e0-0000-4000-8000-00000000e001", ALICE.entra_object_id, "Eve Sameid")
URL = "https://presence.contoso.example/api/dataverse/webhook"
WRITES = ("POST", "PATCH", "DELETE")
IMAGE_ATTRIBUTES = "msdyn_agentid,msdyn_currentpresenceid,msdyn_presencemodifiedby,msdyn_presencemodifiedon"
IMAGE_LINE = f"post-image {POST_IMAGE_ALIAS!r} on the Update step ({IMAGE_ATTRIBUTES})"


async def register(
    client: DataverseClient, *, url: str = URL, key: str = KEY, dry_run: bool = False
) -> tuple[RegistrationResult, list[str]]:
    lines: list[str] = []
    result = await register_webhook(client, url=url, key=key, dry_run=dry_run, progress=lines.append)
    return result, lines


def writes(emu: DataverseEmulator) -> list[tuple[str, str]]:
    return [(c.method, c.path) for c in emu.calls if c.method in WRITES]


def message_of(emu: DataverseEmulator, step: dict[str, object]) -> str:
    return str(emu.tables["sdkmessages"].rows[str(step["_sdkmessageid_value"])]["name"])


# ---------------------------------------------------------------------------------------------- register_webhook


async def test_register_twice_leaves_one_endpoint_and_two_steps(
    emu: DataverseEmulator, client: DataverseClient
) -> None:
    first, lines = await register(client)
    assert first.changed and not first.dry_run
    assert str(first).startswith("webhook registered (serviceendpoint ")
    assert lines[0] == f"create serviceendpoint {ENDPOINT_NAME!r} (webhook, WebhookKey) -> {URL}"
    (endpoint,) = emu.endpoints()
    assert first.endpoint_id == endpoint["serviceendpointid"]
    assert (
        endpoint["name"],
        endpoint["url"],
        endpoint["contract"],
        endpoint["authtype"],
        endpoint["authvalue"],
        endpoint["messageformat"],
    ) == (ENDPOINT_NAME, URL, 8, 4, KEY, 2)
    steps = {message_of(emu, s): s for s in emu.steps()}
    assert set(steps) == {"Update", "Create"} and len(emu.steps()) == 2
    for name, step in steps.items():
        assert (step["mode"], step["stage"], step["statecode"], step["supporteddeployment"]) == (0, 40, 0, 0)
        assert step["_eventhandler_value"] == endpoint["serviceendpointid"]
        flt = emu.tables["sdkmessagefilters"].rows[str(step["_sdkmessagefilterid_value"])]
        assert flt["primaryobjecttypecode"] == "msdyn_agentstatus"
        assert first.step_ids[name] == step["sdkmessageprocessingstepid"]
    assert steps["Update"]["filteringattributes"] == "msdyn_currentpresenceid"
    assert steps["Create"]["filteringattributes"] is None

    before = len(writes(emu))
    second, lines = await register(client)
    assert not second.changed
    assert str(second).startswith("webhook registration already up to date")
    assert (second.endpoint_id, second.step_ids) == (first.endpoint_id, first.step_ids)
    assert len(emu.endpoints()) == 1 and len(emu.steps()) == 2
    # The only write: the key again (Dataverse never returns authvalue, so it cannot be compared).
    assert writes(emu)[before:] == [("PATCH", f"serviceendpoints({first.endpoint_id})")]
    assert any("is up to date" in line for line in lines)


async def test_dry_run_writes_nothing_and_lists_the_plan(emu: DataverseEmulator, client: DataverseClient) -> None:
    result, lines = await register(client, dry_run=True)
    assert writes(emu) == [] and emu.endpoints() == [] and emu.steps() == []
    assert result.dry_run and result.changed and result.endpoint_id is None and result.step_ids == {}
    assert lines == [
        f"[dry run] would create serviceendpoint {ENDPOINT_NAME!r} (webhook, WebhookKey) -> {URL}",
        f"[dry run] would create step '{ENDPOINT_NAME}: Update of msdyn_agentstatus' (synchronous, post-operation, "
        "filtering msdyn_currentpresenceid)",
        f"[dry run] would create {IMAGE_LINE}",
        f"[dry run] would create step '{ENDPOINT_NAME}: Create of msdyn_agentstatus' (synchronous, post-operation)",
    ]
    assert str(result).startswith("dry run: nothing changed; the plan above would change the registration")

    await register(client)
    before = len(writes(emu))
    again, _ = await register(client, dry_run=True, url=URL + "2")
    assert len(writes(emu)) == before and emu.endpoints()[0]["url"] == URL
    assert again.changed and any(f"update serviceendpoint {again.endpoint_id}: url" in a for a in again.actions)


async def test_changed_url_and_key_are_updated_in_place(emu: DataverseEmulator, client: DataverseClient) -> None:
    first, _ = await register(client)
    second, lines = await register(client, url=URL.replace("presence", "presence2"), key="new-key-98765")
    assert second.changed and second.endpoint_id == first.endpoint_id and second.step_ids == first.step_ids
    (endpoint,) = emu.endpoints()
    assert endpoint["url"] == URL.replace("presence", "presence2") and endpoint["authvalue"] == "new-key-98765"
    assert any(line.startswith(f"update serviceendpoint {first.endpoint_id}: url ") for line in lines)
    assert len(emu.steps()) == 2


async def test_a_changed_step_is_patched_back(emu: DataverseEmulator, client: DataverseClient) -> None:
    first, _ = await register(client)
    update_id = first.step_ids["Update"]
    await client.update(
        "sdkmessageprocessingsteps", update_id, {"mode": 1, "filteringattributes": "statecode"}, what="test"
    )
    second, lines = await register(client)
    assert second.changed
    step = next(s for s in emu.steps() if s["sdkmessageprocessingstepid"] == update_id)
    assert (step["mode"], step["filteringattributes"]) == (0, "msdyn_currentpresenceid")
    assert any(line.startswith(f"update step {update_id} (Update): mode 1 -> 0") for line in lines)


async def test_duplicate_and_foreign_steps_are_removed(emu: DataverseEmulator, client: DataverseClient) -> None:
    first, _ = await register(client)
    msg = {emu.tables["sdkmessages"].rows[k]["name"]: k for k in emu.tables["sdkmessages"].rows}
    flt = {
        (r["_sdkmessageid_value"]): k
        for k, r in emu.tables["sdkmessagefilters"].rows.items()
        if r["primaryobjecttypecode"] == "msdyn_agentstatus"
    }
    for name in ("Update", "Delete"):
        await client.create(
            "sdkmessageprocessingsteps",
            {
                "name": f"copy of {name}",
                "mode": 0,
                "stage": 40,
                "rank": 1,
                "sdkmessageid@odata.bind": f"/sdkmessages({msg[name]})",
                "sdkmessagefilterid@odata.bind": f"/sdkmessagefilters({flt[msg[name]]})",
                "eventhandler_serviceendpoint@odata.bind": f"/serviceendpoints({first.endpoint_id})",
            },
            what="test",
        )
    assert len(emu.steps()) == 4
    second, lines = await register(client)
    assert second.changed and second.step_ids == first.step_ids
    assert sorted(s["sdkmessageprocessingstepid"] for s in emu.steps()) == sorted(first.step_ids.values())
    assert sum(line.startswith("delete duplicate Update step") for line in lines) == 1
    assert sum(line.startswith("delete step 'copy of Delete'") for line in lines) == 1
    third, _ = await register(client)
    assert not third.changed


async def test_bad_url_or_key_is_refused_before_any_call(emu: DataverseEmulator, client: DataverseClient) -> None:
    with pytest.raises(ConfigError, match="must be https"):
        await register(client, url="http://presence.contoso.example/api/dataverse/webhook")
    with pytest.raises(ConfigError, match="port 443 only"):
        await register(client, url="https://presence.contoso.example:8443/api/dataverse/webhook")
    with pytest.raises(ConfigError, match="WEBHOOK_KEY is empty"):
        await register(client, key="")
    assert list(emu.calls) == []
    check_webhook_url("http://127.0.0.1:3978/api/dataverse/webhook")  # the loopback emulator


async def test_the_update_step_gets_the_post_image_once(emu: DataverseEmulator, client: DataverseClient) -> None:
    first, lines = await register(client)
    assert f"create {IMAGE_LINE}" in lines
    (image,) = emu.images_of(first.step_ids["Update"])
    assert (
        image["name"],
        image["entityalias"],
        image["imagetype"],
        image["messagepropertyname"],
        image["attributes"],
    ) == (POST_IMAGE_ALIAS, POST_IMAGE_ALIAS, 1, "Target", IMAGE_ATTRIBUTES)
    assert emu.images_of(first.step_ids["Create"]) == []
    before = len(writes(emu))
    second, lines = await register(client)
    assert not second.changed
    assert f"{IMAGE_LINE} {image['sdkmessageprocessingstepimageid']} is up to date" in lines
    assert not [w for w in writes(emu)[before:] if "images" in w[1]]  # an equal image is left alone
    assert len(emu.images_of(first.step_ids["Update"])) == 1


async def test_a_differing_post_image_is_updated_in_place(emu: DataverseEmulator, client: DataverseClient) -> None:
    first, _ = await register(client)
    (image,) = emu.images_of(first.step_ids["Update"])
    image_id = image["sdkmessageprocessingstepimageid"]
    await client.update(
        "sdkmessageprocessingstepimages", image_id, {"attributes": "msdyn_currentpresenceid"}, what="test"
    )
    dry, lines = await register(client, dry_run=True)
    assert dry.changed
    assert any(
        line.startswith(f"[dry run] would update post-image {image_id} ({POST_IMAGE_ALIAS}): attributes ")
        for line in lines
    )
    assert emu.images_of(first.step_ids["Update"])[0]["attributes"] == "msdyn_currentpresenceid"
    second, lines = await register(client)
    assert second.changed
    (again,) = emu.images_of(first.step_ids["Update"])
    assert (again["sdkmessageprocessingstepimageid"], again["attributes"]) == (image_id, IMAGE_ATTRIBUTES)
    # The same columns in another order and case are equal: nothing to do.
    await client.update(
        "sdkmessageprocessingstepimages",
        image_id,
        {"attributes": "msdyn_presencemodifiedon, MSDYN_AGENTID,msdyn_currentpresenceid,msdyn_presencemodifiedby"},
        what="test",
    )
    third, _ = await register(client)
    assert not third.changed


async def test_a_missing_post_image_is_added_to_an_existing_step(
    emu: DataverseEmulator, client: DataverseClient
) -> None:
    first, _ = await register(client)
    (image,) = emu.images_of(first.step_ids["Update"])
    await client.delete("sdkmessageprocessingstepimages", image["sdkmessageprocessingstepimageid"], what="test")
    dry, lines = await register(client, dry_run=True)
    assert dry.changed and f"[dry run] would create {IMAGE_LINE}" in lines
    assert emu.images_of(first.step_ids["Update"]) == []
    second, _ = await register(client)
    assert second.changed and second.step_ids == first.step_ids
    assert [i["attributes"] for i in emu.images_of(first.step_ids["Update"])] == [IMAGE_ATTRIBUTES]


async def test_the_emulator_refuses_an_image_the_platform_would_refuse(
    emu: DataverseEmulator, client: DataverseClient
) -> None:
    first, _ = await register(client)
    bind = {"sdkmessageprocessingstepid@odata.bind": f"/sdkmessageprocessingsteps({first.step_ids['Create']})"}
    base = {"name": "x", "entityalias": "x", "imagetype": 1, "messagepropertyname": "Id", **bind}
    for body, reason in [
        ({**base, "imagetype": 0}, "no pre-image"),
        ({**base, "messagepropertyname": "Target"}, "must be 'Id'"),
        ({**base, "attributes": "msdyn_nosuchcolumn"}, "msdyn_nosuchcolumn do not exist"),
        ({**base, "imagetype": 7}, "Invalid imagetype"),
    ]:
        with pytest.raises(PermanentError, match=reason):
            await client.create("sdkmessageprocessingstepimages", body, what="test")
    await client.create("sdkmessageprocessingstepimages", base, what="test")  # a post-image of a Create is fine
    await client.delete("sdkmessageprocessingsteps", first.step_ids["Create"], what="test")
    assert emu.images_of(first.step_ids["Create"]) == []  # a step's images go with it


# ---------------------------------------------------------------------------------------------- the full loop


async def test_full_loop_emulator_to_intake_to_store(
    emu: DataverseEmulator, client: DataverseClient, served: Served, bridge: Bridge
) -> None:
    await register(client, url=served.url)
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", AVAILABLE)
    (created,) = await emu.wait_emissions()
    assert (created.message, created.status, created.error) == ("Create", 202, None), created.response
    assert list(created.body) == list(seed("create-agent"))  # the seed's shape, key for key
    await served.intake.wait_idle()
    assert await bridge.store.get_agent(ALICE.dynamics_user_id) == Agent(
        ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", True
    )

    emu.set_presence(ALICE.dynamics_user_id, BUSY, whole_row=True)  # the seed's writer sends every column
    created_too, updated = await emu.wait_emissions()
    assert created_too is created
    assert (updated.message, updated.status, updated.error) == ("Update", 200, None), updated.response
    assert list(updated.body) == list(seed("update-presence"))
    target = updated.body["InputParameters"][0]["value"]
    assert [p["key"] for p in target["Attributes"]] == [
        p["key"] for p in seed("update-presence")["InputParameters"][0]["value"]["Attributes"]
    ]
    status = emu.agent_status(ALICE.dynamics_user_id)
    assert status is not None
    state = (await bridge.store.load_states([ALICE.dynamics_user_id]))[ALICE.dynamics_user_id]
    assert (state.dynamics_seen.value, state.dynamics_seen.version) == (BUSY, status["versionnumber"])
    assert state.dynamics_seen.version == int(target["RowVersion"])
    row = await bridge.store.outbox_row(ALICE.dynamics_user_id, System.TEAMS)
    assert row is not None and row.value == "Busy/InACall"


async def test_a_wrong_registered_key_is_refused_by_the_intake(
    emu: DataverseEmulator, client: DataverseClient, served: Served, bridge: Bridge
) -> None:
    await bridge.store.upsert_agents([ALICE])
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", AVAILABLE)
    await register(client, url=served.url, key="not-the-key")
    emu.set_presence(ALICE.dynamics_user_id, BUSY)
    (sent,) = await emu.wait_emissions()
    assert sent.status == 401 and "wrong webhook key" in sent.response
    assert await bridge.store.load_states([ALICE.dynamics_user_id]) == {}


async def test_the_emitted_body_is_what_the_intake_parses(
    emu: DataverseEmulator, client: DataverseClient, served: Served, http: aiohttp.ClientSession, bridge: Bridge
) -> None:
    """The emulator escapes "/" as DataContractJsonSerializer does; the body must still parse."""
    await bridge.store.upsert_agents([ALICE])
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", AVAILABLE)
    await register(client, url=served.url)
    emu.set_presence(ALICE.dynamics_user_id, BUSY, "SYSTEM")
    (sent,) = await emu.wait_emissions()
    assert sent.status == 200
    state = (await bridge.store.load_states([ALICE.dynamics_user_id]))[ALICE.dynamics_user_id]
    assert state.dynamics_seen.value == BUSY


# ---------------------------------------------------------------------------------------------- discover_agents


@pytest.fixture
def org(emu: DataverseEmulator) -> DataverseEmulator:
    emu.add_agent(ALICE.dynamics_user_id, ALICE.entra_object_id.upper(), "Alice Agent")
    emu.add_agent(BOB.dynamics_user_id, None, "Bob Agent")
    emu.add_user(CAROL.dynamics_user_id, CAROL.entra_object_id, "Carol User")
    emu.add_agent(DAVE.dynamics_user_id, DAVE.entra_object_id, "Dave Disabled", disabled=True)
    emu.add_agent(EVE.dynamics_user_id, EVE.entra_object_id, "Eve Sameid")
    return emu


async def test_discover_adds_agents_and_says_why_others_were_skipped(
    org: DataverseEmulator, client: DataverseClient, bridge: Bridge
) -> None:
    lines: list[str] = []
    summary = await discover_agents(client, bridge, lines.append, page_size=2)
    users = len(org.tables["systemusers"].rows)  # five of ours and the three the org is seeded with
    assert users == 8
    assert (summary.added, summary.updated, summary.unchanged, summary.pages) == (1, 0, 0, 4)
    assert summary.not_agents == 4  # Carol, SYSTEM, the assignment engine, the application user
    assert summary.skipped == {
        NO_ENTRA: [f"Bob Agent ({BOB.dynamics_user_id})"],
        DISABLED: [f"Dave Disabled ({DAVE.dynamics_user_id})"],
        ENTRA_TAKEN: [f"Eve Sameid ({EVE.dynamics_user_id}) (held by {ALICE.dynamics_user_id})"],
    }
    assert await bridge.store.list_agents() == [Agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent")]
    assert lines[0] == "4 user(s) have an msdyn_agentstatus row (contact-center agents)"
    assert [line.split(":")[0] for line in lines[1:]] == ["page 1", "page 2", "page 3", "page 4"]
    assert all(" user(s) read; added " in line for line in lines[1:])
    text = str(summary)
    assert text.startswith("agents discovered: added 1, updated 0, unchanged 0, skipped 3 (4 page(s); 4 user(s)")
    assert f"  skipped, {NO_ENTRA}: 1: Bob Agent ({BOB.dynamics_user_id})" in text.splitlines()

    again = await discover_agents(client, bridge, lambda _: None, page_size=100)
    assert (again.added, again.updated, again.unchanged, again.pages) == (0, 0, 1, 1)


async def test_discover_updates_names_and_disables_agents_disabled_in_dataverse(
    org: DataverseEmulator, client: DataverseClient, bridge: Bridge
) -> None:
    await bridge.store.upsert_agents([Agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Old Name"), DAVE])
    summary = await discover_agents(client, bridge, lambda _: None)
    assert (summary.added, summary.updated, summary.unchanged) == (0, 2, 0)
    alice = await bridge.store.get_agent(ALICE.dynamics_user_id)
    dave = await bridge.store.get_agent(DAVE.dynamics_user_id)
    assert alice is not None and alice.display_name == "Alice Agent"
    assert dave is not None and not dave.enabled


async def test_discover_keeps_an_agent_disabled_by_hand(
    org: DataverseEmulator, client: DataverseClient, bridge: Bridge
) -> None:
    await bridge.store.upsert_agents([Agent(ALICE.dynamics_user_id, ALICE.entra_object_id, "Alice Agent", False)])
    summary = await discover_agents(client, bridge, lambda _: None)
    assert summary.unchanged == 1
    alice = await bridge.store.get_agent(ALICE.dynamics_user_id)
    assert alice is not None and not alice.enabled


async def test_discover_every_user_with_an_entra_id(
    org: DataverseEmulator, client: DataverseClient, bridge: Bridge
) -> None:
    summary = await discover_agents(client, bridge, lambda _: None, agents_only=False)
    ids = {a.dynamics_user_id for a in await bridge.store.list_agents()}
    assert CAROL.dynamics_user_id in ids and ALICE.dynamics_user_id in ids and summary.not_agents == 0
    assert BOB.dynamics_user_id not in ids and DAVE.dynamics_user_id not in ids


async def test_discover_retries_a_failed_page_from_its_own_link(
    org: DataverseEmulator, client: DataverseClient, bridge: Bridge
) -> None:
    org.fail_next(1, 503, path="systemusers")
    lines: list[str] = []
    summary = await discover_agents(client, bridge, lines.append, page_size=3)
    assert summary.added == 1 and summary.pages == 3
    pages = [c for c in org.calls if c.path == "systemusers"]
    assert [c.status for c in pages] == [503, 200, 200, 200]
    assert "$skiptoken" not in pages[1].query and "$skiptoken" in pages[2].query


async def test_webhooks_of_different_agents_are_sent_concurrently_and_one_agents_in_order(
    emu: DataverseEmulator, client: DataverseClient
) -> None:
    """Each agent's change is its own Dataverse operation, whose synchronous step runs inside it:
    changes of different agents reach the endpoint side by side, one agent's one after the other."""
    inside: list[str] = []
    most = 0
    seen: list[tuple[str, str]] = []
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        nonlocal most
        body = await request.json()
        entity = body["InputParameters"][0]["value"]
        status_id = entity["Id"]
        presence = next(p["value"]["Id"] for p in entity["Attributes"] if p["key"] == "msdyn_currentpresenceid")
        assert status_id not in inside, "two webhooks of one row were on their way at once"
        inside.append(status_id)
        most = max(most, len(inside))
        if len(inside) >= 3:
            release.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), 2.0)
        seen.append((status_id, presence))
        inside.remove(status_id)
        return web.json_response({}, status=200)

    app = web.Application()
    app.router.add_post("/hook", slow)
    runner, base = await serve_app(app, "127.0.0.1", 0)
    try:
        await register(client, url=f"{base}/hook")
        people = [agent_ids(i) for i in range(3)]
        for dynamics_id, entra_id in people:
            emu.add_agent(dynamics_id, entra_id, "Agent", AVAILABLE)
        await emu.wait_emissions()
        seen.clear()
        for presence in (BUSY, AVAILABLE, BUSY):
            for dynamics_id, _ in people:
                emu.set_presence(dynamics_id, presence)
        sent = await emu.wait_emissions(timeout=20)
        assert all(e.status == 200 for e in sent[-9:])
        assert most == 3  # three agents' steps ran side by side
        for dynamics_id, _ in people:
            status = emu.agent_status(dynamics_id)
            assert status is not None
            status_id = status["msdyn_agentstatusid"]
            assert [p for s, p in seen if s == status_id] == [BUSY, AVAILABLE, BUSY]
    finally:
        await runner.cleanup()
