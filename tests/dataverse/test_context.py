"""The RemoteExecutionContext parser on the two seed payloads as they are, and on variants built from
them: WCF dates, key/value lists, references, nulls, missing attributes, nesting, and every kind of
wrong shape, each refused with a reason that names what was wrong."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dataverse import context
from dataverse.context import MAX_NESTING, AgentStatusChange, ContextError, Message, parse_context, parse_wcf_date
from dataverse.registration import POST_IMAGE_ALIAS
from tests.dataverse.conftest import DATA, partial_update, seed
from tests.support import BUSY, OFFLINE

SEED_SHA256 = {
    "update-presence.json": "f2a7009f65d5e41a2135c5a27cb757efeb3908c0fb8c4879f7d1ecfa12091dac",
    "create-agent.json": "d81d5a28c79eb1696eaad3cd10571bb2c5bc723e945ce78ebdabfe492836ca1d",
}
UPDATE_AGENT = "97c90b02-4e38-ef11-a315-000d3a5a54dc"
UPDATE_STATUS = "3d1feef9-604d-ef11-bfe3-6045bd03d9d8"
CREATE_AGENT = "a7f9a9ed-b311-ef11-9f89-000d3a544b4c"
CREATE_STATUS = "4b1e3d75-a749-ef11-acce-00224802d26d"
MS = 1722582038000
AT = datetime(2024, 8, 2, 7, 0, 38, tzinfo=UTC)


# ---------------------------------------------------------------------------------------------- helpers


def target(ctx: dict[str, Any]) -> dict[str, Any]:
    value: dict[str, Any] = ctx["InputParameters"][0]["value"]
    return value


def get_attr(entity: dict[str, Any], key: str) -> Any:
    return next(p["value"] for p in entity["Attributes"] if p["key"] == key)


def set_attr(entity: dict[str, Any], key: str, value: Any) -> None:
    for pair in entity["Attributes"]:
        if pair["key"] == key:
            pair["value"] = value
            return
    entity["Attributes"].append({"key": key, "value": value})


def drop_attr(entity: dict[str, Any], key: str) -> None:
    entity["Attributes"] = [p for p in entity["Attributes"] if p["key"] != key]


def refused(ctx: Any) -> str:
    with pytest.raises(ContextError) as e:
        parse_context(ctx)
    assert str(e.value) == e.value.reason
    return e.value.reason


def update_only() -> dict[str, Any]:
    """The update seed without its ParentContext: only the top-level target can answer."""
    ctx = seed("update-presence")
    ctx["ParentContext"] = None
    return ctx


# ---------------------------------------------------------------------------------------------- the seeds


def test_update_seed_as_is() -> None:
    change = parse_context(seed("update-presence"))
    assert change.message is Message.UPDATE
    assert change.agent_status_id == UPDATE_STATUS
    assert change.agent_id == UPDATE_AGENT
    assert change.presence_id == BUSY == "efdeb843-c07a-e811-8162-000d3aa11f50"
    assert change.row_version == 5948260
    assert change.presence_modified_on == AT
    assert change.presence_modified_by == "AGENT"
    assert change.operation_created_on == datetime(2024, 8, 2, 7, 0, 39, tzinfo=UTC)
    assert change.correlation_id == "e1bcd028-ae87-4ca6-af27-a17ee680dbc9"
    assert change.depth == 1
    assert change.is_presence_change and change.ignored_reason is None


def test_create_seed_as_is() -> None:
    change = parse_context(seed("create-agent"))
    assert change.message is Message.CREATE
    assert change.agent_status_id == CREATE_STATUS
    assert change.agent_id == CREATE_AGENT
    assert change.presence_id == OFFLINE == "70139190-c07a-e811-8162-000d3aa11f50"
    assert change.row_version is None
    # The target's own value (second precision), not the parent's 1721816904678.
    assert change.presence_modified_on == datetime(2024, 7, 24, 10, 28, 24, tzinfo=UTC)
    assert change.presence_modified_by == "SYSTEM"
    assert change.operation_created_on == datetime(2024, 7, 24, 10, 28, 25, 786000, tzinfo=UTC)
    assert change.is_presence_change


def test_seed_fixtures_are_the_recorded_payloads_byte_for_byte() -> None:
    for name, digest in SEED_SHA256.items():
        mine = (DATA / name).read_bytes()
        assert hashlib.sha256(mine).hexdigest() == digest, f"tests/dataverse/data/{name} has drifted"
    assert {p.name for p in DATA.glob("*.json")} == set(SEED_SHA256)


def test_slashes_escaped_or_not_parse_the_same() -> None:
    raw = (DATA / "update-presence.json").read_text()
    assert "\\/Date(" in raw
    assert parse_context(json.loads(raw.replace("\\/", "/"))) == parse_context(json.loads(raw))


# ---------------------------------------------------------------------------------------------- dates


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"/Date({MS})/", AT),
        (f"/Date({MS}+0000)/", AT),
        # The number is UTC milliseconds; the offset only marks a Local DateTime (DataContractJsonSerializer
        # ignores its value when reading), so it must not move the instant.
        (f"/Date({MS}-0500)/", AT),
        (f"/Date({MS}+0530)/", AT),
        ("/Date(0)/", datetime(1970, 1, 1, tzinfo=UTC)),
        ("/Date(-86400000)/", datetime(1969, 12, 31, tzinfo=UTC)),
        (f" /Date({MS + 1})/ ", AT + timedelta(milliseconds=1)),
        # Either side of the limit of the short way (datetime.fromtimestamp), and past its 13 digits.
        ("/Date(7999999999999)/", datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=7999999999999)),
        ("/Date(8000000000000+0000)/", datetime(2223, 7, 6, 14, 13, 20, tzinfo=UTC)),
        (f"/Date(00{MS})/", AT),
        ("/Date(253402300799999)/", datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)),
    ],
)
def test_wcf_dates(text: str, expected: datetime) -> None:
    got = parse_wcf_date(text, "x")
    assert got == expected and got.utcoffset() == timedelta(0)


@pytest.mark.parametrize("date", [f"/Date({MS}-0500)/", f"/Date({MS}+0530)/"])
def test_offset_dates_in_a_context_give_the_utc_instant(date: str) -> None:
    ctx = update_only()
    set_attr(target(ctx), "msdyn_presencemodifiedon", date)
    ctx["OperationCreatedOn"] = date
    change = parse_context(ctx)
    assert change.presence_modified_on == AT
    assert change.operation_created_on == AT


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("2024-08-02T07:00:38Z", r"x: '2024-08-02T07:00:38Z' is not a date like"),
        ("/Date(abc)/", r"x: '/Date\(abc\)/' is not a date like"),
        (f"/Date({MS}+2500)/", r"x: offset \+2500 in .* is not a valid UTC offset"),
        (f"/Date({MS}+0075)/", r"x: offset \+0075 .* is not a valid UTC offset"),
        ("/Date(999999999999999)/", r"x: '/Date\(999999999999999\)/' is out of range"),
        (MS, r"x: expected a date like .*, got a number \(1722582038000\)"),
        (None, r"x: expected a date like .*, got null"),
    ],
)
def test_bad_dates_name_the_field(value: Any, reason: str) -> None:
    with pytest.raises(ContextError, match=reason):
        parse_wcf_date(value, "x")


def test_bad_date_in_a_context_names_the_attribute() -> None:
    ctx = seed("update-presence")
    set_attr(target(ctx), "msdyn_presencemodifiedon", "yesterday")
    assert refused(ctx) == (
        "context.InputParameters[Target].Attributes[msdyn_presencemodifiedon]: 'yesterday' is not a date like "
        "\\/Date(1722582038000)\\/"
    )


def test_bad_operation_created_on() -> None:
    ctx = seed("update-presence")
    ctx["OperationCreatedOn"] = 17
    assert "OperationCreatedOn: expected a date" in refused(ctx)


# ---------------------------------------------------------------------------------------------- key/value lists


def test_attribute_order_and_capitalised_pair_keys_do_not_matter() -> None:
    ctx = update_only()
    t = target(ctx)
    t["Attributes"] = [{"Key": p["key"], "Value": p["value"]} for p in reversed(t["Attributes"])]
    ctx["InputParameters"] = [{"Key": "Target", "Value": t}]
    change = parse_context(ctx)
    assert (change.agent_id, change.presence_id, change.presence_modified_by) == (UPDATE_AGENT, BUSY, "AGENT")


def test_first_occurrence_of_a_key_wins() -> None:
    ctx = update_only()
    t = target(ctx)
    t["Attributes"].insert(0, {"key": "msdyn_presencemodifiedby", "value": "SYSTEM"})
    assert parse_context(ctx).presence_modified_by == "SYSTEM"


def test_first_target_wins_in_a_short_list_too() -> None:
    ctx = update_only()
    other = copy.deepcopy(target(ctx))
    other["LogicalName"] = "contact"
    ctx["InputParameters"].append({"key": "Target", "value": other})
    assert parse_context(ctx).presence_id == BUSY
    ctx["InputParameters"].reverse()
    assert refused(ctx).endswith("is a 'contact'; this route handles msdyn_agentstatus only")


def test_other_input_parameters_are_ignored() -> None:
    ctx = seed("update-presence")
    ctx["InputParameters"].insert(0, {"key": "SuppressDuplicateDetection", "value": True})
    assert parse_context(ctx).presence_id == BUSY


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (
            lambda c: c.__setitem__("InputParameters", {"Target": target(c)}),
            "context.InputParameters: expected a list of {key, value} pairs, got an object",
        ),
        (
            lambda c: target(c).__setitem__("Attributes", {"msdyn_agentid": None}),
            "context.InputParameters[Target].Attributes: expected a list of {key, value} pairs, got an object",
        ),
        (
            lambda c: c["InputParameters"].insert(0, "Target"),
            "context.InputParameters[0]: expected a {key, value} pair, got the string 'Target'",
        ),
        (
            lambda c: target(c)["Attributes"].insert(0, {"key": 7, "value": 1}),
            "context.InputParameters[Target].Attributes[0].key: expected a string, got a number (7)",
        ),
        (
            lambda c: c.__setitem__("PostEntityImages", "none"),
            "context.PostEntityImages: expected a list of {key, value} pairs, got the string 'none'",
        ),
    ],
)
def test_wrong_list_shapes(mutate: Any, reason: str) -> None:
    ctx = seed("update-presence")
    mutate(ctx)
    assert refused(ctx) == reason


# ---------------------------------------------------------------------------------------------- references


def test_reference_ids_are_normalised_and_names_and_tags_are_optional() -> None:
    ctx = update_only()
    t = target(ctx)
    set_attr(
        t, "msdyn_agentid", {"Id": "{" + UPDATE_AGENT.upper() + "}", "LogicalName": "systemuser", "Name": "Alice Agent"}
    )
    set_attr(t, "msdyn_currentpresenceid", {"Id": BUSY.upper()})
    change = parse_context(ctx)
    assert (change.agent_id, change.presence_id) == (UPDATE_AGENT, BUSY)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (
            "msdyn_currentpresenceid",
            {"__type": "OptionSetValue:http://schemas.microsoft.com/xrm/2011/Contracts", "Value": 192360001},
            "Attributes[msdyn_currentpresenceid]: expected an EntityReference to msdyn_presence, got __type "
            "'OptionSetValue:http://schemas.microsoft.com/xrm/2011/Contrac'",
        ),  # tags are cut at 60 characters
        (
            "msdyn_currentpresenceid",
            BUSY,
            "Attributes[msdyn_currentpresenceid]: expected an EntityReference to msdyn_presence, got the string "
            f"'{BUSY}'",
        ),
        (
            "msdyn_currentpresenceid",
            [BUSY],
            "Attributes[msdyn_currentpresenceid]: expected an EntityReference to msdyn_presence, got an array",
        ),
        (
            "msdyn_currentpresenceid",
            {"Id": "Busy", "LogicalName": "msdyn_presence"},
            "Attributes[msdyn_currentpresenceid].Id: 'Busy' is not a GUID",
        ),
        (
            "msdyn_currentpresenceid",
            {"LogicalName": "msdyn_presence"},
            "Attributes[msdyn_currentpresenceid]: EntityReference without an Id",
        ),
        (
            "msdyn_agentid",
            {"Id": UPDATE_AGENT, "LogicalName": "contact"},
            "Attributes[msdyn_agentid]: refers to a 'contact', expected a systemuser",
        ),
        (
            "msdyn_agentid",
            {"Id": "00000000-0000-0000-0000-000000000000", "LogicalName": "systemuser"},
            "Attributes[msdyn_agentid]: the empty GUID is not a systemuser",
        ),
        (
            "msdyn_agentid",
            {"Id": 42, "LogicalName": "systemuser"},
            "Attributes[msdyn_agentid].Id: expected a GUID string, got a number (42)",
        ),
        (
            "msdyn_presencemodifiedby",
            1,
            'Attributes[msdyn_presencemodifiedby]: expected a string such as "AGENT" or "SYSTEM", got a number (1)',
        ),
    ],
)
def test_wrong_reference_types(key: str, value: Any, reason: str) -> None:
    ctx = seed("update-presence")
    set_attr(target(ctx), key, value)
    assert refused(ctx) == "context.InputParameters[Target]." + reason


def test_option_set_values_elsewhere_are_fine() -> None:
    ctx = seed("create-agent")
    assert get_attr(target(ctx), "statecode")["__type"].startswith("OptionSetValue:")
    set_attr(target(ctx), "statecode", {"__type": "OptionSetValue:x", "Value": 1})
    assert parse_context(ctx).presence_id == OFFLINE


# ---------------------------------------------------------------------------------------------- nulls and gaps


def test_null_presence_is_no_presence_change() -> None:
    ctx = seed("update-presence")
    set_attr(target(ctx), "msdyn_currentpresenceid", None)
    change = parse_context(ctx)
    assert change.presence_id is None and not change.is_presence_change
    assert change.ignored_reason == "msdyn_currentpresenceid is null: no presence to apply"
    assert change.agent_id == UPDATE_AGENT


def test_update_without_current_presence_is_not_a_presence_change() -> None:
    ctx = seed("update-presence")
    drop_attr(target(ctx), "msdyn_currentpresenceid")
    drop_attr(target(ctx), "msdyn_agentid")
    ctx["ParentContext"] = None
    change = parse_context(ctx)
    assert change.message is Message.UPDATE
    assert change.presence_id is None and change.agent_id is None
    assert change.ignored_reason == "Update without msdyn_currentpresenceid: not a presence change"


def test_null_modified_by_falls_back_to_the_parent_context() -> None:
    ctx = seed("update-presence")
    set_attr(target(ctx), "msdyn_presencemodifiedby", None)
    set_attr(target(ctx["ParentContext"]), "msdyn_presencemodifiedby", "system")
    assert parse_context(ctx).presence_modified_by == "SYSTEM"


def test_agent_missing_in_the_target_comes_from_the_parent_context() -> None:
    ctx = seed("update-presence")
    drop_attr(target(ctx), "msdyn_agentid")
    assert parse_context(ctx).agent_id == UPDATE_AGENT


def test_agent_missing_everywhere_leaves_it_to_the_lookup() -> None:
    """A real Update's Target carries only the columns the writer sent: no agent is no error, the
    route looks it up by the row's id."""
    ctx = update_only()
    drop_attr(target(ctx), "msdyn_agentid")
    change = parse_context(ctx)
    assert (change.agent_id, change.agent_status_id, change.presence_id) == (None, UPDATE_STATUS, BUSY)
    assert change.is_presence_change


def test_partial_target_without_an_image_parses_for_the_lookup() -> None:
    ctx = partial_update(BUSY)
    change = parse_context(ctx)
    assert change.message is Message.UPDATE
    assert (change.agent_id, change.agent_status_id, change.presence_id) == (None, UPDATE_STATUS, BUSY)
    assert (change.row_version, change.presence_modified_by, change.presence_modified_on) == (5948260, "AGENT", AT)


def test_partial_target_with_the_registered_post_image_gives_the_agent() -> None:
    ctx = partial_update(BUSY, image_agent=UPDATE_AGENT)
    assert [p["key"] for p in ctx["PostEntityImages"]] == [POST_IMAGE_ALIAS]
    change = parse_context(ctx)
    assert (change.agent_id, change.agent_status_id, change.presence_id) == (UPDATE_AGENT, UPDATE_STATUS, BUSY)
    assert change.presence_modified_by == "AGENT"


def test_a_post_image_of_another_row_does_not_give_the_agent() -> None:
    ctx = partial_update(BUSY, image_agent=UPDATE_AGENT)
    ctx["PostEntityImages"][0]["value"]["Id"] = "11111111-1111-1111-1111-111111111111"
    assert parse_context(ctx).agent_id is None


def test_missing_row_version_and_date_are_none_not_guessed() -> None:
    ctx = update_only()
    target(ctx)["RowVersion"] = None
    drop_attr(target(ctx), "msdyn_presencemodifiedon")
    change = parse_context(ctx)
    assert (change.row_version, change.presence_modified_on) == (None, None)


def test_status_id_from_the_attribute_or_primary_entity_id() -> None:
    ctx = update_only()
    target(ctx)["Id"] = "00000000-0000-0000-0000-000000000000"
    assert parse_context(ctx).agent_status_id == UPDATE_STATUS
    drop_attr(target(ctx), "msdyn_agentstatusid")
    ctx["PrimaryEntityId"] = UPDATE_STATUS.upper()
    assert parse_context(ctx).agent_status_id == UPDATE_STATUS
    ctx["PrimaryEntityId"] = None
    assert refused(ctx) == ("context.InputParameters[Target]: no Id, no msdyn_agentstatusid and no PrimaryEntityId")


# ---------------------------------------------------------------------------------------------- Create


def test_create_without_presence_is_still_a_create_for_the_agent() -> None:
    ctx = seed("create-agent")
    drop_attr(target(ctx), "msdyn_currentpresenceid")
    ctx["ParentContext"] = None
    change = parse_context(ctx)
    assert change.message is Message.CREATE and change.agent_id == CREATE_AGENT
    assert change.presence_id is None
    assert change.ignored_reason == "Create without msdyn_currentpresenceid: not a presence change"


def test_create_without_agent_is_refused() -> None:
    ctx = seed("create-agent")
    drop_attr(target(ctx), "msdyn_agentid")
    ctx["ParentContext"] = None
    assert "no msdyn_agentid in the Target, images or ParentContext" in refused(ctx)


# ---------------------------------------------------------------------------------------------- nesting


def test_agent_found_in_a_deeper_parent_context() -> None:
    ctx = seed("update-presence")
    parent = ctx["ParentContext"]
    grand = copy.deepcopy(parent)
    drop_attr(target(ctx), "msdyn_agentid")
    drop_attr(target(parent), "msdyn_agentid")
    parent["ParentContext"] = grand
    assert parse_context(ctx).agent_id == UPDATE_AGENT


def test_a_parent_about_another_row_is_not_used() -> None:
    ctx = seed("update-presence")
    drop_attr(target(ctx), "msdyn_agentid")
    target(ctx["ParentContext"])["Id"] = "11111111-1111-1111-1111-111111111111"
    assert parse_context(ctx).agent_id is None


def test_nesting_deeper_than_the_limit_is_refused() -> None:
    ctx: dict[str, Any] = update_only()
    for _ in range(MAX_NESTING + 1):
        inner = update_only()
        inner["ParentContext"] = ctx
        ctx = inner
    assert refused(ctx) == f"ParentContext nested deeper than {MAX_NESTING} levels"


def test_a_parent_context_of_the_wrong_type_is_refused() -> None:
    ctx = seed("update-presence")
    ctx["ParentContext"] = "none"
    assert refused(ctx) == ("context.ParentContext: expected a RemoteExecutionContext object, got the string 'none'")
    ctx["ParentContext"] = [seed("update-presence")]
    assert refused(ctx) == "context.ParentContext: expected a RemoteExecutionContext object, got an array"


# ---------------------------------------------------------------------------------------------- images


def test_a_post_image_stands_in_for_a_missing_target() -> None:
    ctx = seed("update-presence")
    ctx["PostEntityImages"] = [{"key": "post", "value": target(ctx)}]
    ctx["InputParameters"] = []
    change = parse_context(ctx)
    assert (change.agent_id, change.presence_id, change.row_version) == (UPDATE_AGENT, BUSY, 5948260)


def test_missing_target_with_an_image_that_lacks_the_presence_is_refused() -> None:
    """The seed's asynchronous-step image holds only the id: it cannot say whether the presence changed."""
    ctx = seed("update-presence")
    del ctx["InputParameters"]
    assert refused(ctx) == (
        "no Target in InputParameters, and context.PostEntityImages[AsynchronousStepPrimaryName] has no "
        "msdyn_currentpresenceid: the new presence cannot be known (register the step with a post-image holding "
        "msdyn_currentpresenceid)"
    )


def test_missing_input_parameters_and_no_image_is_refused() -> None:
    ctx = seed("create-agent")
    del ctx["InputParameters"]
    assert refused(ctx) == "no Target in InputParameters and no msdyn_agentstatus image in PostEntityImages"
    ctx = seed("create-agent")
    ctx["InputParameters"] = [{"key": "NotTarget", "value": target(ctx)}]
    assert refused(ctx) == "no Target in InputParameters and no msdyn_agentstatus image in PostEntityImages"


def test_a_pre_image_never_stands_in_for_the_target() -> None:
    """A pre-image is the row before the change: its presence is the old one."""
    ctx = seed("update-presence")
    old = copy.deepcopy(target(ctx))
    set_attr(old, "msdyn_currentpresenceid", {"Id": OFFLINE, "LogicalName": "msdyn_presence"})
    ctx["PreEntityImages"] = [{"key": "pre", "value": old}]
    ctx["PostEntityImages"] = []
    ctx["InputParameters"] = []
    assert refused(ctx) == "no Target in InputParameters and no msdyn_agentstatus image in PostEntityImages"


def test_a_pre_image_gives_the_agent_but_not_the_version_or_modifier() -> None:
    ctx = update_only()
    t = target(ctx)
    drop_attr(t, "msdyn_agentid")
    drop_attr(t, "msdyn_presencemodifiedby")
    drop_attr(t, "msdyn_presencemodifiedon")
    t["RowVersion"] = None
    old = copy.deepcopy(seed("update-presence")["InputParameters"][0]["value"])
    old["RowVersion"] = "5948100"
    set_attr(old, "msdyn_presencemodifiedby", "SYSTEM")
    ctx["PreEntityImages"] = [{"key": "pre", "value": old}]
    change = parse_context(ctx)
    assert change.agent_id == UPDATE_AGENT
    assert (change.row_version, change.presence_modified_by, change.presence_modified_on) == (None, None, None)


def test_post_image_fills_in_version_and_modifier() -> None:
    ctx = update_only()
    t = target(ctx)
    drop_attr(t, "msdyn_presencemodifiedby")
    t["RowVersion"] = None
    post = {
        "LogicalName": "msdyn_agentstatus",
        "Id": UPDATE_STATUS,
        "RowVersion": "5948261",
        "Attributes": [{"key": "msdyn_presencemodifiedby", "value": "SYSTEM"}],
    }
    ctx["PostEntityImages"] = [{"key": "post", "value": post}]
    change = parse_context(ctx)
    assert (change.row_version, change.presence_modified_by) == (5948261, "SYSTEM")


# ---------------------------------------------------------------------------------------------- wrong shapes


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([], "body is an array; expected a RemoteExecutionContext JSON object"),
        ("Update", "body is the string 'Update'; expected a RemoteExecutionContext JSON object"),
        (None, "body is null; expected a RemoteExecutionContext JSON object"),
        (3, "body is a number (3); expected a RemoteExecutionContext JSON object"),
    ],
)
def test_not_an_object(body: Any, reason: str) -> None:
    assert refused(body) == reason


def test_a_list_of_contexts_is_refused() -> None:
    assert refused([seed("update-presence")]) == "body is an array; expected a RemoteExecutionContext JSON object"


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("MessageName", None, "MessageName: expected a string, got null"),
        (
            "MessageName",
            "Delete",
            "MessageName 'Delete' is not handled: only Create and Update of msdyn_agentstatus (register the steps "
            "with `presence-sync dataverse register-webhook`)",
        ),
        ("MessageName", "update", "MessageName 'update' is not handled"),
        (
            "PrimaryEntityName",
            "contact",
            "PrimaryEntityName is the string 'contact'; this route handles msdyn_agentstatus only",
        ),
        ("Depth", "1", "Depth: expected an integer, got the string '1'"),
        ("Depth", True, "Depth: expected an integer, got a boolean"),
        ("CorrelationId", 5, "CorrelationId: expected a string, got a number (5)"),
        ("PrimaryEntityId", "row-1", "context.PrimaryEntityId: 'row-1' is not a GUID"),
    ],
)
def test_wrong_top_level_fields(field: str, value: Any, reason: str) -> None:
    ctx = seed("update-presence")
    ctx[field] = value
    assert refused(ctx).startswith(reason)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (
            lambda t: t.__setitem__("LogicalName", "contact"),
            "context.InputParameters[Target] is a 'contact'; this route handles msdyn_agentstatus only",
        ),
        (
            lambda t: t.__setitem__("LogicalName", None),
            "context.InputParameters[Target].LogicalName: expected a string, got null",
        ),
        (
            lambda t: t.__setitem__("__type", "EntityReference:x"),
            "context.InputParameters[Target]: expected an Entity, got __type 'EntityReference:x'",
        ),
        (lambda t: t.__setitem__("Id", "3d1feef9"), "context.InputParameters[Target].Id: '3d1feef9' is not a GUID"),
        (
            lambda t: t.__setitem__("RowVersion", "v5948260"),
            "context.InputParameters[Target].RowVersion: expected a RowVersion number (string of digits) or null, got "
            "the string 'v5948260'",
        ),
        (
            lambda t: t.__setitem__("RowVersion", -1),
            "context.InputParameters[Target].RowVersion: expected a RowVersion number (string of digits) or null, got "
            "a number (-1)",
        ),
    ],
)
def test_wrong_target(mutate: Any, reason: str) -> None:
    ctx = seed("update-presence")
    ctx["PrimaryEntityName"] = None  # so the target's own check speaks
    mutate(target(ctx))
    assert refused(ctx) == reason


def test_target_of_the_wrong_type() -> None:
    ctx = seed("update-presence")
    ctx["InputParameters"][0]["value"] = "msdyn_agentstatus"
    assert refused(ctx) == "context.InputParameters[Target]: expected an Entity, got the string 'msdyn_agentstatus'"
    ctx["InputParameters"][0]["value"] = [seed("update-presence")]
    assert refused(ctx) == "context.InputParameters[Target]: expected an Entity, got an array"


def test_row_version_as_a_number_is_accepted() -> None:
    ctx = update_only()
    target(ctx)["RowVersion"] = 5948262
    assert parse_context(ctx).row_version == 5948262


def test_non_guid_agent_id() -> None:
    ctx = seed("update-presence")
    get_attr(target(ctx), "msdyn_agentid")["Id"] = "alice@contoso.com"
    assert refused(ctx) == (
        "context.InputParameters[Target].Attributes[msdyn_agentid].Id: 'alice@contoso.com' is not a GUID"
    )


def test_long_values_are_cut_in_reasons() -> None:
    ctx = seed("update-presence")
    ctx["MessageName"] = "x" * 5000
    assert len(refused(ctx)) < 300


# ---------------------------------------------------------------------------------------------- the result


def test_the_result_is_an_ordinary_frozen_agent_status_change() -> None:
    """``parse_context`` fills the dataclass's fields at once (``context._change``): the object must be
    the one its own constructor makes, every field set, equal, same hash, still frozen."""
    assert list(inspect.signature(context._change).parameters) == [
        f.name for f in dataclasses.fields(AgentStatusChange)
    ]
    change = parse_context(seed("update-presence"))
    same = AgentStatusChange(**{f.name: getattr(change, f.name) for f in dataclasses.fields(AgentStatusChange)})
    assert change == same and hash(change) == hash(same) and repr(change) == repr(same)
    assert vars(change) == vars(same)
    with pytest.raises(dataclasses.FrozenInstanceError):
        change.agent_id = None  # type: ignore[misc]


def test_the_memo_of_guids_stays_bounded_and_changes_nothing() -> None:
    ctx = update_only()
    for _ in range(context._GUIDS_KEPT + 10):
        status = str(uuid.uuid4()).upper()
        target(ctx)["Id"] = status
        assert parse_context(ctx).agent_status_id == status.lower()
        assert len(context._GUIDS) <= context._GUIDS_KEPT
