"""``dataverse.context.parse_context`` against the parser as it was before it was made cheaper: on every
generated input, valid or broken, the same ``AgentStatusChange`` (field by field, ``repr`` included) or
the same ``ContextError`` reason (the webhook route turns reason texts into quarantine reasons, so a
changed word is a changed answer), or the very same unexpected exception.

The oracle is the bottom half of this module: ``dataverse/context.py`` of commit f51570f, verbatim from
``AGENT_STATUS = ...`` down, frozen here and nowhere else. It is not to be edited; when the parser's
behaviour is changed on purpose, the oracle goes with the test that pinned the old behaviour.

Inputs come from two generators: contexts assembled from parts (GUIDs in every accepted and refused
spelling, WCF dates with and without offsets, references, key/value pairs in both capitalisations,
entities, images, ParentContext chains up to past ``MAX_NESTING``, Create/Update/other messages, with
any part missing or of the wrong type), and the seed payloads with a few random parts deleted or
replaced."""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st

from dataverse import context as new
from dataverse.webhook import quarantine_reason
from tests.dataverse.conftest import DATA, partial_update
from tests.support import BUSY, OFFLINE

ROW = "3d1feef9-604d-ef11-bfe3-6045bd03d9d8"
OTHER_ROW = "11111111-1111-1111-1111-111111111111"
AGENTS = ("97c90b02-4e38-ef11-a315-000d3a5a54dc", "a7f9a9ed-b311-ef11-9f89-000d3a544b4c")
ZERO = "00000000-0000-0000-0000-000000000000"
SEEDS = {name: (DATA / f"{name}.json").read_bytes() for name in ("update-presence", "create-agent")}
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------- outcomes


def outcome(parse: Callable[[Any], Any], error: type[Exception], body: Any) -> tuple[str, ...]:
    """What a parser made of ``body``: its result field by field, its refusal's reason, or whatever else
    it raised (type and text)."""
    try:
        change = parse(body)
    except error as e:
        assert str(e) == e.reason  # type: ignore[attr-defined]
        return ("refused", e.reason)  # type: ignore[attr-defined]
    except Exception as e:
        return ("raised", type(e).__name__, str(e))
    if not dataclasses.is_dataclass(change):
        return ("parsed", repr(change))
    return ("parsed", *(f"{f.name}={getattr(change, f.name)!r}" for f in dataclasses.fields(change)))


def assert_same(body: Any) -> None:
    before = copy.deepcopy(body)
    old = outcome(parse_context, ContextError, body)
    got = outcome(new.parse_context, new.ContextError, body)
    assert got == old
    if currently_in_test_context():  # hypothesis's statistics: how often each kind of outcome came
        event(old[0] if old[0] != "refused" else "refused: " + quarantine_reason(ContextError(old[1])))
    assert body == before, "the parser changed its input"


# ---------------------------------------------------------------------------------------------- parts


def rarely(draw: st.DrawFn, odds: int) -> bool:
    """One time in ``odds + 1``. (Hypothesis draws the lowest value of a range more often than the others,
    and the highest less: the rare case is the highest.)"""
    return bool(draw(st.integers(0, odds)) == odds)


def mostly(good: st.SearchStrategy[Any], *bad: st.SearchStrategy[Any], odds: int = 60) -> st.SearchStrategy[Any]:
    """``good`` ``odds`` times out of ``odds + 1``, else one of ``bad``: most parts right, so that the
    parser gets past them and a whole context often parses. (Not ``one_of(good, good, ..., bad)``:
    ``one_of`` drops repeated branches and flattens nested ones, so the bad ones would win.)"""
    wrong = st.one_of(*bad)
    return st.integers(0, odds).flatmap(lambda n: good if n < odds else wrong)


SCALARS = st.one_of(
    st.booleans(),
    st.integers(-3, 3),
    st.integers(),
    st.floats(),
    st.text(max_size=8),
    st.builds(dict),
    st.builds(dict, Id=st.just(ROW)),
)
"""Wrong-typed values that are neither null nor a list."""
NOT_NONE = st.one_of(SCALARS, st.builds(list), st.lists(st.integers(0, 2), min_size=1, max_size=2))
JUNK = st.one_of(st.none(), NOT_NONE)


NEAR_MISS_TEXTS = (
    *("Entity:x", "Entity", "entity:x", "EntityReference:x", "EntityReference", "OptionSetValue:x", ""),
    *("msdyn_agentstatus", "msdyn_presence", "systemuser", "contact", "Msdyn_AgentStatus", "Update", "Create"),
    *("Target", "PostImage", "key", "Key", "value", "Value", "msdyn_agentid", "msdyn_currentpresenceid"),
)
"""Right-looking strings in the wrong place: type tags, logical names, messages, keys."""
NEAR_MISSES = st.sampled_from(NEAR_MISS_TEXTS)


def spellings(guid: str) -> st.SearchStrategy[str]:
    """Ways a GUID may be written that ``uuid.UUID`` (after ``strip``) accepts."""
    bare = guid.replace("-", "")
    braced = ["{" + guid + "}", "{" + guid, guid + "}", "{{" + guid.upper() + "}}"]
    spaced = [f" {guid}\n", "\u2003" + guid]
    prefixed = ["urn:uuid:" + guid, "uuid:" + bare]
    return st.sampled_from([guid, guid, guid.upper(), bare, bare.upper(), *braced, *spaced, *prefixed])


BAD_GUIDS = st.one_of(
    st.sampled_from(
        [
            "",
            "row-1",
            "3d1feef9",
            "Busy",
            ROW + "0",
            ROW[:-1],
            ROW.replace("-", "", 1) + "-",
            "g" + ROW[1:],
            # int(x, 16) after uuid.UUID's own clean-up: a sign, 0x, underscores, Unicode digits and inner
            # spaces pass or fail there in ways a regular expression would have to copy exactly.
            "+" + ROW.replace("-", "")[1:],
            "-" + ROW.replace("-", "")[1:],
            "0x" + ROW.replace("-", "")[2:],
            ROW.replace("-", "")[:16] + "_" + ROW.replace("-", "")[17:],
            "{ " + ROW.replace("-", "")[1:] + "}",
            "\u0661" * 32,
            "\uff11" * 32,
            ROW.replace("-", "\u2010"),
            ROW + "\n\n",
            "urn:" + ROW,
            "\uff55rn:uuid:" + ROW,
            ROW.upper().replace("D", "\u0130"),
        ]
    ),
    st.text(alphabet="0123456789abcdefABCDEF-{} \n_+x:urnid", min_size=30, max_size=40),
    st.text(max_size=40),
)


def guid(*pool: str) -> st.SearchStrategy[Any]:
    return mostly(st.sampled_from(pool).flatmap(spellings), BAD_GUIDS, JUNK, odds=30)


MS = st.one_of(
    st.integers(-62135596800000, 253402300799999),
    st.sampled_from([0, -1, 1722582038000, 1721816904678, -62135596800000, 253402300799999]),
    st.sampled_from([7999999999999, 8000000000000, 8589934591999, 8589934592000, 9999999999999, 10**13]),
)
GOOD_DATES = st.one_of(
    MS.map(lambda ms: f"/Date({ms})/"),
    st.tuples(MS, st.sampled_from(["+0000", "-0500", "+0530", "+1400", "-1459", "+0059"])).map(
        lambda t: f"/Date({t[0]}{t[1]})/"
    ),
    st.sampled_from([" /Date(1722582038000)/ ", "/Date(1722582038000)/\n", "/Date(\u0661\u0662)/"]),
)
BAD_DATES = st.one_of(
    st.sampled_from(
        [
            "yesterday",
            "2024-08-02T07:00:38Z",
            "/Date(abc)/",
            "/Date()/",
            "/Date(1722582038000+2500)/",
            "/Date(1722582038000+0075)/",
            "/Date(1722582038000+1500)/",
            "/Date(1722582038000+000)/",
            "/Date(999999999999999)/",
            "/Date(-999999999999999)/",
            "/Date(1234567890123456)/",
            "/Date(1722582038000)/x",
            "\\/Date(1722582038000)\\/",
            "/date(1722582038000)/",
            "/Date(+1722582038000)/",
            "x" * 100,
        ]
    ),
    st.integers(-(10**15) + 1, 10**15 - 1).map(lambda ms: f"/Date({ms})/"),
    st.text(max_size=30),
    NOT_NONE,
)


def date(nullable: bool = True) -> st.SearchStrategy[Any]:
    good = st.one_of(GOOD_DATES, st.none()) if nullable else GOOD_DATES
    return mostly(good, BAD_DATES)


def pair(key: st.SearchStrategy[Any], value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A DataContract key/value pair, mostly ``{"key", "value"}``, else every other spelling and shape."""
    kv = st.tuples(key, value)
    return mostly(
        kv.map(lambda t: {"key": t[0], "value": t[1]}),
        kv.map(lambda t: {"Key": t[0], "Value": t[1]}),
        kv.map(lambda t: {"key": t[0], "Value": t[1]}),
        kv.map(lambda t: {"Key": t[0], "value": t[1], "Value": "ignored"}),
        kv.map(lambda t: {"key": t[0], "Key": "ignored", "value": t[1]}),
        kv.map(lambda t: {"key": t[0]}),
        kv.map(lambda t: {"value": t[1]}),
        st.tuples(JUNK, value).map(lambda t: {"key": t[0], "value": t[1]}),
        st.tuples(key, value).map(lambda t: {"key": None, "Key": t[0], "value": t[1]}),
        NOT_NONE,
    )


def pairs(item: st.SearchStrategy[Any], max_size: int) -> st.SearchStrategy[Any]:
    return mostly(st.lists(item, max_size=max_size), st.none(), SCALARS)


def reference(logical_name: str, *ids: str) -> st.SearchStrategy[Any]:
    type_tag = mostly(
        st.just("EntityReference:http://schemas.microsoft.com/xrm/2011/Contracts"),
        st.just("OptionSetValue:http://schemas.microsoft.com/xrm/2011/Contracts"),
        NEAR_MISSES,
        NOT_NONE,
        odds=8,
    )
    name = mostly(st.just(logical_name), NEAR_MISSES, NOT_NONE, odds=8)
    ref = st.fixed_dictionaries(
        {"Id": guid(*ids, ZERO)},
        optional={"__type": type_tag, "LogicalName": name, "Name": st.none() | st.text(max_size=4)},
    )
    no_id = st.fixed_dictionaries({}, optional={"__type": type_tag, "LogicalName": name})
    return mostly(ref, st.none(), no_id, NOT_NONE)


ROW_VERSIONS = mostly(
    st.one_of(st.none(), st.integers(0, 10**9), st.integers(0, 10**9).map(str)),
    st.sampled_from(["v5948260", "-1", " 12 ", "\u0662\u0663", "\u00b2", "", "1.5", "+5", "0x10", "1_000"]),
    st.integers(max_value=-1),
    st.booleans(),
    st.floats(),
    JUNK,
)
ATTRIBUTE = st.one_of(
    pair(st.just("msdyn_agentid"), reference("systemuser", *AGENTS)),
    pair(st.just("msdyn_currentpresenceid"), reference("msdyn_presence", BUSY, OFFLINE)),
    pair(st.just("msdyn_presencemodifiedon"), date()),
    pair(
        st.just("msdyn_presencemodifiedby"),
        mostly(st.sampled_from(["AGENT", "SYSTEM", " system ", "agent\n", "", "\u00df"]), JUNK),
    ),
    pair(st.just("msdyn_agentstatusid"), mostly(guid(ROW, OTHER_ROW, ZERO), st.none())),
    pair(st.sampled_from(["modifiedby", "statecode", "modifiedon", "msdyn_isagentloggedin"]), JUNK),
)


def entity(logical_name: str = new.AGENT_STATUS) -> st.SearchStrategy[Any]:
    """An ``Entity``: the target, an image, a parent's target; of the right row mostly."""
    ent = st.fixed_dictionaries(
        {
            "LogicalName": mostly(st.just(logical_name), NEAR_MISSES, JUNK, odds=12),
            "Attributes": pairs(ATTRIBUTE, 5),
        },
        optional={
            "__type": mostly(
                st.just("Entity:http://schemas.microsoft.com/xrm/2011/Contracts"),
                NEAR_MISSES,
                NOT_NONE,
                odds=8,
            ),
            "Id": mostly(guid(ROW, ROW, OTHER_ROW, ZERO), st.none()),
            "RowVersion": ROW_VERSIONS,
        },
    )
    return mostly(ent, NOT_NONE)


IMAGES = pairs(
    pair(st.sampled_from(["PostImage", "AsynchronousStepPrimaryName", "pre", "PostImage"]), entity()), max_size=3
)


@st.composite
def input_parameters(draw: st.DrawFn) -> Any:
    """Mostly a list holding a Target among other parameters."""
    kind = draw(st.integers(0, 12))
    if kind == 12:
        return draw(st.none() | SCALARS)
    others = draw(
        st.lists(pair(st.sampled_from(["SuppressDuplicateDetection", "NotTarget", "Target"]), JUNK), max_size=2)
    )
    if kind < 11:
        others.insert(draw(st.integers(0, len(others))), draw(pair(st.just("Target"), entity())))
    return others


@st.composite
def level(draw: st.DrawFn) -> dict[str, Any]:
    """One context's own parts (the parser reads the same ones at every level)."""
    ctx: dict[str, Any] = {}
    for field, strategy, absent in (
        ("InputParameters", input_parameters(), 20),
        ("PostEntityImages", IMAGES, 2),
        ("PreEntityImages", IMAGES, 2),
        ("PrimaryEntityId", mostly(guid(ROW, OTHER_ROW, ZERO), st.none()), 3),
    ):
        if not rarely(draw, absent):
            ctx[field] = draw(strategy)
    return ctx


@st.composite
def contexts(draw: st.DrawFn) -> Any:
    top = draw(level())
    for field, strategy, absent in (
        (
            "MessageName",
            mostly(st.sampled_from(["Update", "Create"]), st.sampled_from(["Delete", "update", ""]), JUNK),
            40,
        ),
        ("PrimaryEntityName", mostly(st.sampled_from([new.AGENT_STATUS, None]), st.just("contact"), NOT_NONE), 3),
        ("Depth", mostly(st.integers(-1, 8), st.booleans(), st.just("1"), st.floats(), NOT_NONE), 3),
        ("CorrelationId", mostly(st.uuids().map(str) | st.none(), NOT_NONE), 3),
        ("OperationCreatedOn", date(), 3),
    ):
        if not rarely(draw, absent):
            top[field] = draw(strategy)
    parents = draw(st.sampled_from([0, 0, 1, 1, 1, 1, 2, 2, 3, -1]))
    if parents < 0:
        parents = draw(st.sampled_from([new.MAX_NESTING - 1, new.MAX_NESTING, new.MAX_NESTING + 1]))
    ctx = top
    for i in range(parents):
        # Past the second, a level is only a Target (all it takes to follow the chain to its end).
        parent = draw(level()) if i < 2 else {"InputParameters": [{"key": "Target", "value": draw(entity())}]}
        ctx["ParentContext"] = parent
        ctx = parent
    ending = draw(st.integers(0, 10))
    if ending == 10:
        ctx["ParentContext"] = draw(NOT_NONE)  # "", 0, False, [] are not "no parent"
    elif ending == 9:
        ctx["ParentContext"] = None
    if rarely(draw, 40):
        return draw(NOT_NONE | st.lists(st.just(top), max_size=1))
    return draw(faults(top))


@st.composite
def mutated_seeds(draw: st.DrawFn) -> Any:
    """A seed payload (or the partial Target the registered post-image completes) with a few parts
    deleted or replaced: real shapes with one or two faults."""
    kind = draw(st.sampled_from(["update-presence", "create-agent", "partial", "partial+image"]))
    if kind.startswith("partial"):
        body: Any = partial_update(BUSY, image_agent=AGENTS[0] if kind.endswith("image") else None)
    else:
        body = json.loads(SEEDS[kind])
    return draw(faults(body))


@st.composite
def faults(draw: st.DrawFn, body: Any) -> Any:
    """``body`` with none to three of its parts, anywhere, deleted, repeated or replaced by a wrong one."""
    body = copy.deepcopy(body)  # drawn parts may be shared (hypothesis hands out the same objects again)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))):
        slots = list(_slots(body))
        if not slots:
            break
        parent, key = slots[draw(st.integers(0, len(slots) - 1))]
        action = draw(st.integers(0, 9))
        if action == 0:
            del parent[key]
        elif action == 1 and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        else:
            parent[key] = draw(
                st.one_of(JUNK, NEAR_MISSES, BAD_GUIDS, BAD_DATES, GOOD_DATES, *map(spellings, (ROW, OTHER_ROW, ZERO)))
            )
    return body


def _slots(node: Any) -> Iterator[tuple[Any, Any]]:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield node, key
        yield from _slots(child)


# ---------------------------------------------------------------------------------------------- tests


@SETTINGS
@given(contexts())
@example(json.loads(SEEDS["update-presence"]))
@example(json.loads(SEEDS["create-agent"]))
def test_generated_contexts_parse_as_before(body: Any) -> None:
    assert_same(body)


@SETTINGS
@given(mutated_seeds())
def test_mutated_seeds_parse_as_before(body: Any) -> None:
    assert_same(body)


@SETTINGS
@given(st.one_of(BAD_GUIDS, spellings(ROW), spellings(ZERO), JUNK), st.sampled_from(["Id", "PrimaryEntityId"]))
def test_every_guid_spelling_is_read_as_before(value: Any, where: str) -> None:
    """Target Id or PrimaryEntityId of the update seed: the id comes back in the result or the reason."""
    body = json.loads(SEEDS["update-presence"])
    if where == "Id":
        body["InputParameters"][0]["value"]["Id"] = value
    else:
        del body["InputParameters"][0]["value"]["Id"]
        body["InputParameters"][0]["value"]["Attributes"] = []
        body["PrimaryEntityId"] = value
    assert_same(body)


@SETTINGS
@given(st.one_of(GOOD_DATES, BAD_DATES, st.none()))
def test_every_date_is_read_as_before(value: Any) -> None:
    old = outcome(lambda v: parse_wcf_date(v, "x"), ContextError, value)
    got = outcome(lambda v: new.parse_wcf_date(v, "x"), new.ContextError, value)
    assert got == old


def test_every_tag_name_and_key_of_the_seeds_replaced_by_a_near_miss() -> None:
    """Every ``__type``, ``LogicalName``, pair key and message field of the seeds, one at a time, set to
    each near miss (or null, or removed): too many pairs for the generators to hit each by chance."""
    names = {"__type", "LogicalName", "key", "MessageName", "PrimaryEntityName"}
    for seed in (json.loads(SEEDS["update-presence"]), partial_update(BUSY, image_agent=AGENTS[0])):
        for parent, key in [(p, k) for p, k in _slots(seed) if k in names]:
            kept = parent[key]
            for value in (*NEAR_MISS_TEXTS, None, 0, []):
                parent[key] = value
                assert_same(seed)
            del parent[key]
            assert_same(seed)
            parent[key] = kept


def test_the_public_constants_are_the_oracles() -> None:
    assert (new.AGENT_STATUS, new.MAX_NESTING) == (AGENT_STATUS, MAX_NESTING)
    assert [m.value for m in new.Message] == [m.value for m in Message]
    assert [f.name for f in dataclasses.fields(new.AgentStatusChange)] == [
        f.name for f in dataclasses.fields(AgentStatusChange)
    ]


# ---------------------------------------------------------------------------------------------- the oracle
# dataverse/context.py of commit f51570f, verbatim from here down. Do not edit.

AGENT_STATUS = "msdyn_agentstatus"
MAX_NESTING = 8
"""``ParentContext`` levels followed at most: real contexts nest once or twice; a deeper body is junk."""

_WCF_DATE = re.compile(r"^/Date\((-?\d{1,15})(?:([+-])(\d{2})(\d{2}))?\)/$")
_ZERO_GUID = "00000000-0000-0000-0000-000000000000"


class ContextError(ValueError):
    """The body is not a usable ``RemoteExecutionContext``; ``reason`` is safe to send back."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Message(enum.StrEnum):
    CREATE = "Create"
    UPDATE = "Update"


@dataclass(frozen=True)
class AgentStatusChange:
    """One ``msdyn_agentstatus`` Create or Update, as the bridge needs it."""

    message: Message
    agent_status_id: str
    agent_id: str | None
    """The agent's ``systemuserid`` (lower case). Always set for a Create; ``None`` for an Update whose
    Target, images and parent contexts do not carry it: the route looks it up by ``agent_status_id``."""
    presence_id: str | None
    """``msdyn_currentpresenceid`` (lower case); ``None`` when this is not a presence change."""
    row_version: int | None
    presence_modified_on: datetime | None
    presence_modified_by: str | None
    operation_created_on: datetime | None
    depth: int
    correlation_id: str | None = None
    ignored_reason: str | None = None
    """Why ``presence_id`` is ``None`` (for the answer and the logs)."""

    @property
    def is_presence_change(self) -> bool:
        return self.presence_id is not None


# ---------------------------------------------------------------------------------------------- values


def parse_wcf_date(value: Any, where: str) -> datetime:
    """``/Date(ms)/`` or ``/Date(ms±hhmm)/`` -> an aware UTC datetime (the offset does not move it)."""
    if not isinstance(value, str):
        raise ContextError(f"{where}: expected a date like \\/Date(1722582038000)\\/, got {_kind(value)}")
    m = _WCF_DATE.match(value.strip())
    if m is None:
        raise ContextError(f"{where}: {value[:60]!r} is not a date like \\/Date(1722582038000)\\/")
    ms, sign, hh, mm = m.groups()
    if sign is not None and (int(hh) > 14 or int(mm) > 59):
        raise ContextError(f"{where}: offset {sign}{hh}{mm} in {value[:60]!r} is not a valid UTC offset")
    try:
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=int(ms))
    except OverflowError:
        raise ContextError(f"{where}: {value[:60]!r} is out of range") from None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"the string {value[:60]!r}"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _guid(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ContextError(f"{where}: expected a GUID string, got {_kind(value)}")
    try:
        return str(uuid.UUID(value.strip())).lower()
    except ValueError:
        raise ContextError(f"{where}: {value[:60]!r} is not a GUID") from None


def _reference(value: Any, where: str, logical_name: str) -> str | None:
    """An ``EntityReference`` (``Name`` may be null) -> its lower-case Id; ``None`` for a null value."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ContextError(f"{where}: expected an EntityReference to {logical_name}, got {_kind(value)}")
    tag = value.get("__type")
    if isinstance(tag, str) and not tag.startswith("EntityReference:"):
        raise ContextError(f"{where}: expected an EntityReference to {logical_name}, got __type {tag[:60]!r}")
    name = value.get("LogicalName")
    if name is not None and name != logical_name:
        raise ContextError(f"{where}: refers to a {name!r}, expected a {logical_name}")
    if "Id" not in value:
        raise ContextError(f"{where}: EntityReference without an Id")
    ref = _guid(value["Id"], f"{where}.Id")
    if ref == _ZERO_GUID:
        raise ContextError(f"{where}: the empty GUID is not a {logical_name}")
    return ref


def _pairs(value: Any, where: str) -> dict[str, Any]:
    """A DataContract key/value list -> dict (first occurrence wins); a missing list is empty."""
    if value is None:
        return {}
    if not isinstance(value, list):
        raise ContextError(f"{where}: expected a list of {{key, value}} pairs, got {_kind(value)}")
    out: dict[str, Any] = {}
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise ContextError(f"{where}[{i}]: expected a {{key, value}} pair, got {_kind(item)}")
        key = item.get("key", item.get("Key"))
        if not isinstance(key, str):
            raise ContextError(f"{where}[{i}].key: expected a string, got {_kind(key)}")
        out.setdefault(key, item.get("value", item.get("Value")))
    return out


def _row_version(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.strip().isdecimal():  # isdigit() lets "²" through to int()
        return int(value.strip())
    raise ContextError(f"{where}: expected a RowVersion number (string of digits) or null, got {_kind(value)}")


# ---------------------------------------------------------------------------------------------- entities


@dataclass(frozen=True)
class _Entity:
    logical_name: str
    id: str | None
    attributes: dict[str, Any]
    row_version: int | None
    where: str


def _entity(value: Any, where: str) -> _Entity:
    if not isinstance(value, Mapping):
        raise ContextError(f"{where}: expected an Entity, got {_kind(value)}")
    tag = value.get("__type")
    if isinstance(tag, str) and not tag.startswith("Entity:"):
        raise ContextError(f"{where}: expected an Entity, got __type {tag[:60]!r}")
    name = value.get("LogicalName")
    if not isinstance(name, str):
        raise ContextError(f"{where}.LogicalName: expected a string, got {_kind(name)}")
    raw_id = value.get("Id")
    ident = None if raw_id is None else _guid(raw_id, f"{where}.Id")
    attrs = _pairs(value.get("Attributes"), f"{where}.Attributes")
    return _Entity(
        name,
        None if ident == _ZERO_GUID else ident,
        attrs,
        _row_version(value.get("RowVersion"), f"{where}.RowVersion"),
        where,
    )


@dataclass(frozen=True)
class _Level:
    """One context of the ``ParentContext`` chain: its target (if any) and its images."""

    target: _Entity | None
    post_images: list[_Entity]
    pre_images: list[_Entity]
    primary_id: str | None


def _level(ctx: Any, where: str) -> _Level:
    if not isinstance(ctx, Mapping):
        raise ContextError(f"{where}: expected a RemoteExecutionContext object, got {_kind(ctx)}")
    inputs = _pairs(ctx.get("InputParameters"), f"{where}.InputParameters")
    target = None
    if "Target" in inputs:
        target = _entity(inputs["Target"], f"{where}.InputParameters[Target]")
    images: dict[str, list[_Entity]] = {}
    for field in ("PostEntityImages", "PreEntityImages"):
        images[field] = []
        for key, image in _pairs(ctx.get(field), f"{where}.{field}").items():
            entity = _entity(image, f"{where}.{field}[{key}]")
            if entity.logical_name == AGENT_STATUS:
                images[field].append(entity)
    raw_primary = ctx.get("PrimaryEntityId")
    primary = None if raw_primary is None else _guid(raw_primary, f"{where}.PrimaryEntityId")
    return _Level(target, images["PostEntityImages"], images["PreEntityImages"], primary)


def _chain(body: Mapping[str, Any]) -> Iterator[tuple[_Level, str]]:
    ctx: Any = body
    where = "context"
    for _ in range(MAX_NESTING + 1):
        yield _level(ctx, where), where
        ctx = ctx.get("ParentContext")
        if ctx is None:
            return
        where += ".ParentContext"
    raise ContextError(f"ParentContext nested deeper than {MAX_NESTING} levels")


# ---------------------------------------------------------------------------------------------- parse


def parse_context(body: Any) -> AgentStatusChange:
    """Parses a decoded JSON body. Raises ``ContextError`` with the exact reason when it cannot."""
    if not isinstance(body, Mapping):
        raise ContextError(f"body is {_kind(body)}; expected a RemoteExecutionContext JSON object")
    raw_message = body.get("MessageName")
    if not isinstance(raw_message, str):
        raise ContextError(f"MessageName: expected a string, got {_kind(raw_message)}")
    try:
        message = Message(raw_message)
    except ValueError:
        raise ContextError(
            f"MessageName {raw_message[:40]!r} is not handled: only Create and Update of {AGENT_STATUS} "
            "(register the steps with `presence-sync dataverse register-webhook`)"
        ) from None
    primary = body.get("PrimaryEntityName")
    if primary is not None and primary != AGENT_STATUS:
        raise ContextError(f"PrimaryEntityName is {_kind(primary)}; this route handles {AGENT_STATUS} only")
    depth = body.get("Depth", 1)
    if not isinstance(depth, int) or isinstance(depth, bool):
        raise ContextError(f"Depth: expected an integer, got {_kind(depth)}")
    correlation = body.get("CorrelationId")
    if correlation is not None and not isinstance(correlation, str):
        raise ContextError(f"CorrelationId: expected a string, got {_kind(correlation)}")
    created = body.get("OperationCreatedOn")
    operation_created_on = None if created is None else parse_wcf_date(created, "OperationCreatedOn")

    levels = list(_chain(body))
    top = levels[0][0]
    target = top.target
    if target is None:
        target = next(iter(top.post_images), None)
        if target is None:
            raise ContextError(f"no Target in InputParameters and no {AGENT_STATUS} image in PostEntityImages")
        if message is Message.UPDATE and "msdyn_currentpresenceid" not in target.attributes:
            raise ContextError(
                f"no Target in InputParameters, and {target.where} has no msdyn_currentpresenceid: the new "
                "presence cannot be known (register the step with a post-image holding msdyn_currentpresenceid)"
            )
    if target.logical_name != AGENT_STATUS:
        raise ContextError(f"{target.where} is a {target.logical_name!r}; this route handles {AGENT_STATUS} only")
    status_id = target.id or _status_id_attr(target) or top.primary_id
    if status_id is None:
        raise ContextError(f"{target.where}: no Id, no msdyn_agentstatusid and no PrimaryEntityId")

    # Same row, same operation: the target first, then images, then the parent contexts' targets.
    # ``after``: the row as the change left it; ``sources`` adds the pre-images (the row before it),
    # good for the agent only.
    def same_row(e: _Entity) -> bool:
        return e is not target and e.logical_name == AGENT_STATUS and e.id in (None, status_id)

    after = [target]
    sources = [target]
    for level, _ in levels:
        post = [e for e in level.post_images if same_row(e)]
        after.extend(post)
        sources.extend(post)
        sources.extend(e for e in level.pre_images if same_row(e))
        if level.target is not None and same_row(level.target):
            after.append(level.target)
            sources.append(level.target)

    presence_id, ignored = _presence(target, message)
    agent_id = _first(sources, "msdyn_agentid", lambda v, w: _reference(v, w, "systemuser"))
    if agent_id is None and message is Message.CREATE:
        raise ContextError(
            f"no msdyn_agentid in the Target, images or ParentContext of {AGENT_STATUS} {status_id}: "
            "the agent cannot be known (register the step with a post-image holding msdyn_agentid)"
        )
    modified_on = _first(after, "msdyn_presencemodifiedon", parse_wcf_date)
    modified_by = _first(after, "msdyn_presencemodifiedby", _modified_by)
    row_version = next((s.row_version for s in after if s.row_version is not None), None)
    return AgentStatusChange(
        message=message,
        agent_status_id=status_id,
        agent_id=agent_id,
        presence_id=presence_id,
        row_version=row_version,
        presence_modified_on=modified_on,
        presence_modified_by=modified_by,
        operation_created_on=operation_created_on,
        depth=depth,
        correlation_id=correlation,
        ignored_reason=ignored,
    )


def _status_id_attr(target: _Entity) -> str | None:
    raw = target.attributes.get("msdyn_agentstatusid")
    return None if raw is None else _guid(raw, f"{target.where}.Attributes[msdyn_agentstatusid]")


def _presence(target: _Entity, message: Message) -> tuple[str | None, str | None]:
    key = "msdyn_currentpresenceid"
    where = f"{target.where}.Attributes[{key}]"
    if key not in target.attributes:
        what = "Update" if message is Message.UPDATE else "Create"
        return None, f"{what} without {key}: not a presence change"
    ref = _reference(target.attributes[key], where, "msdyn_presence")
    if ref is None:
        return None, f"{key} is null: no presence to apply"
    return ref, None


def _modified_by(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ContextError(f'{where}: expected a string such as "AGENT" or "SYSTEM", got {_kind(value)}')
    return value.strip().upper()


def _first(sources: list[_Entity], key: str, convert: Any) -> Any:
    """The first non-null value of ``key`` along ``sources``, converted (type errors raise)."""
    for s in sources:
        if key in s.attributes and s.attributes[key] is not None:
            return convert(s.attributes[key], f"{s.where}.Attributes[{key}]")
    return None
