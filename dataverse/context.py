"""The webhook body: Dataverse's ``RemoteExecutionContext`` serialized by ``DataContractJsonSerializer``,
reduced to the few facts the bridge acts on (``AgentStatusChange``).

Why the parser looks the way it does:

- Every collection is a list of ``{"key", "value"}`` pairs (``InputParameters``, ``Attributes``,
  ``PostEntityImages``, ``FormattedValues``...), so attributes are looked up by key, never by position.
- Values carry ``__type`` tags (``Entity:``, ``EntityReference:``, ``OptionSetValue:`` + a contract
  namespace whose ``/`` may arrive escaped as ``\\/``); what matters is the shape, so references are
  read from their ``Id``/``LogicalName`` and the tag is only a hint.
- Dates are WCF dates, ``/Date(1722582038000)/`` or ``/Date(1722582039000+0000)/``. The number is
  always milliseconds since the epoch in UTC; the offset only says which zone the writer was in, so it
  is validated and does not move the instant.
- A target may carry only the attributes that changed. An ``Update`` whose target has no
  ``msdyn_currentpresenceid`` is not a presence change (``presence_id`` is ``None`` and
  ``ignored_reason`` says why). The agent (which never changes in a presence update) is looked up,
  in order, in the target, the post- and pre-images of the same row, and the targets of the
  ``ParentContext`` chain of the same operation. What changes with the presence
  (``msdyn_presencemodifiedon``/``by``, ``RowVersion``) is looked up the same way but never in a
  pre-image: that holds the row as it was *before* the change.
- A Target carries only the columns the writer sent, so an Update may hold no ``msdyn_agentid``
  anywhere. ``presence-sync dataverse register-webhook`` registers a post-image under the alias
  ``PostImage`` (``dataverse.registration.POST_IMAGE_ALIAS``) with the agent, the presence and its
  modified by/on, so a registered step always brings the agent. Without one (a step registered by
  hand) the change still parses, with ``agent_id`` ``None``, and the route looks the agent up by
  ``agent_status_id`` (``dataverse.agent_lookup``). A Create always carries the agent: without it the
  body is a ``ContextError``.
- With no target at all (a step registered without one), a ``msdyn_agentstatus`` post-image stands in
  (never a pre-image: its presence is the old one). Such an image holds the attributes the step's
  image was registered with, changed or not, so for an ``Update`` an image without
  ``msdyn_currentpresenceid`` does not say "not a presence change": it is a ``ContextError``.

Anything of the wrong shape or type raises ``ContextError`` whose message names the field, what was
expected and what came; the route answers it with 400 and that message.
"""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

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
    if isinstance(value, str) and value.strip().isdigit():
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
