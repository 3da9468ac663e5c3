"""``dataverse register-webhook``: the webhook registration the seed does by hand in the Plug-in
Registration tool, over the Web API, idempotently.

What it makes (DESIGN, reference "The webhook"):

- one ``serviceendpoint`` named ``teams-presence-sync``: contract 8 (webhook), JSON, ``authtype`` 4
  (WebhookKey: Dataverse adds ``?code=<key>``), ``authvalue`` = the shared key, ``url`` = the route;
- two ``sdkmessageprocessingsteps`` bound to it (``eventhandler_serviceendpoint``) on
  ``msdyn_agentstatus``: Update with ``filteringattributes`` = ``msdyn_currentpresenceid`` (only
  presence changes call us) and Create (new agents); both ``mode`` 0 (synchronous), ``stage`` 40
  (post-operation), server deployment;
- on the Update step, one ``sdkmessageprocessingstepimage``: ``imagetype`` 1 (post),
  ``messagepropertyname`` ``Target``, ``name`` and ``entityalias`` ``PostImage``, ``attributes``
  ``msdyn_agentid,msdyn_currentpresenceid,msdyn_presencemodifiedby,msdyn_presencemodifiedon``. An
  Update's Target holds only the columns the writer sent, which need not include the agent; the image
  brings it (and the row as the change left it) with every presence change.

The message ids (``sdkmessages`` by name) and the table's message filters (``sdkmessagefilters`` for
``msdyn_agentstatus``) are looked up, as the Web API requires ``@odata.bind`` references to them.

Idempotent: the endpoint is found by name (then by URL), steps by their endpoint and message, the
image by its step and alias; what differs is patched, duplicates of our own steps are removed,
nothing else is touched. ``authvalue`` cannot be read back (Dataverse never returns it), so an
existing endpoint always gets the key again. ``dry_run`` does the same lookups and prints the plan,
and writes nothing.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dataverse.client import DataverseClient, odata_string
from edge.upstream import is_loopback
from mapping.errors import ConfigError

ENDPOINT_NAME = "teams-presence-sync"
TABLE = "msdyn_agentstatus"
FILTERING_ATTRIBUTES = "msdyn_currentpresenceid"
MESSAGES = ("Update", "Create")
POST_IMAGE_ALIAS = "PostImage"
"""``name`` and ``entityalias`` (the key in ``PostEntityImages``) of the Update step's post-image."""
POST_IMAGE_ATTRIBUTES = (
    "msdyn_agentid",
    "msdyn_currentpresenceid",
    "msdyn_presencemodifiedby",
    "msdyn_presencemodifiedon",
)
IMAGE_TYPE_POST = 1
_IMAGE_FIELDS = "sdkmessageprocessingstepimageid,name,entityalias,imagetype,messagepropertyname,attributes"
CONTRACT_WEBHOOK = 8
AUTH_WEBHOOK_KEY = 4
MESSAGE_FORMAT_JSON = 2
CONNECTION_NORMAL = 1
USER_CLAIM_NONE = 1
MODE_SYNCHRONOUS = 0
STAGE_POST_OPERATION = 40
DEPLOYMENT_SERVER = 0
_STEP_FIELDS = (
    "sdkmessageprocessingstepid,name,mode,stage,rank,supporteddeployment,filteringattributes,statecode,"
    "_sdkmessageid_value,_sdkmessagefilterid_value"
)
_ENDPOINT_FIELDS = "serviceendpointid,name,url,contract,authtype,messageformat,connectionmode,userclaim"


@dataclass
class RegistrationResult:
    dry_run: bool
    endpoint_id: str | None = None
    step_ids: dict[str, str] = field(default_factory=dict)
    actions: list[str] = field(default_factory=list)
    """What was done (or, in a dry run, would be done), one line each."""
    changed: bool = False

    def __str__(self) -> str:
        if self.dry_run:
            head = "dry run: nothing changed" + (
                "; the plan above would change the registration" if self.changed else "; the registration is up to date"
            )
        else:
            head = "webhook registered" if self.changed else "webhook registration already up to date"
        steps = ", ".join(f"{m} step {i}" for m, i in self.step_ids.items())
        return f"{head} (serviceendpoint {self.endpoint_id or '-'}{'; ' + steps if steps else ''})"


def check_webhook_url(url: str) -> None:
    """Dataverse calls only ports 80 (http) and 443 (https), and the key travels in the URL: https,
    except for a loopback emulator."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "http" and is_loopback(parts.hostname):
        return
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(f"webhook URL {url!r} must be https (PRESENCE_SYNC_PUBLIC_URL): the key travels in it")
    if parts.port not in (None, 443):
        raise ConfigError(f"webhook URL {url!r}: Dataverse webhooks reach port 443 only (PRESENCE_SYNC_PUBLIC_URL)")


async def register_webhook(
    client: DataverseClient,
    *,
    url: str,
    key: str,
    dry_run: bool,
    progress: Callable[[str], None],
) -> RegistrationResult:
    """Creates or updates the endpoint and the two steps; see the module docstring."""
    if not key:
        raise ConfigError("PRESENCE_SYNC_DATAVERSE_WEBHOOK_KEY is empty: the webhook needs a shared key")
    check_webhook_url(url)
    result = RegistrationResult(dry_run)

    def act(line: str, change: bool = True) -> None:
        result.actions.append(line)
        result.changed |= change
        progress(("[dry run] would " if dry_run and change else "") + line)

    messages, filters = await _message_ids(client)
    endpoint_id = await _endpoint(client, url, key, act, dry_run)
    result.endpoint_id = endpoint_id
    existing = []
    if endpoint_id is not None:
        existing = await client.query(
            "sdkmessageprocessingsteps",
            select=_STEP_FIELDS,
            filter=f"_eventhandler_value eq {endpoint_id}",
            what="reading the webhook's sdkmessageprocessingsteps",
        )
    for message in MESSAGES:
        step_id = await _step(client, message, messages[message], filters[message], endpoint_id, existing, act, dry_run)
        if step_id is not None:
            result.step_ids[message] = step_id
        if message == "Update":
            await _post_image(client, step_id, act, dry_run)
    ours = set(messages.values())
    for step in existing:
        if str(step.get("_sdkmessageid_value") or "").lower() not in ours:
            act(
                f"delete step {step.get('name')!r} ({step['sdkmessageprocessingstepid']}): the webhook route "
                "handles Create and Update only"
            )
            if not dry_run:
                await client.delete(
                    "sdkmessageprocessingsteps",
                    step["sdkmessageprocessingstepid"],
                    what="deleting a foreign step on the presence-sync webhook",
                )
    return result


async def _message_ids(client: DataverseClient) -> tuple[dict[str, str], dict[str, str]]:
    messages: dict[str, str] = {}
    filters: dict[str, str] = {}
    for name in MESSAGES:
        rows = await client.query(
            "sdkmessages",
            select="sdkmessageid,name",
            filter=f"name eq {odata_string(name)}",
            what=f"looking up the {name} sdkmessage",
        )
        if not rows:
            raise ConfigError(f"Dataverse has no sdkmessage named {name!r}: is this a Dataverse environment?")
        messages[name] = str(rows[0]["sdkmessageid"]).lower()
        rows = await client.query(
            "sdkmessagefilters",
            select="sdkmessagefilterid,primaryobjecttypecode",
            filter=f"primaryobjecttypecode eq {odata_string(TABLE)} and _sdkmessageid_value eq {messages[name]}",
            what=f"looking up the {name} filter of {TABLE}",
        )
        if not rows:
            raise ConfigError(
                f"{TABLE} has no {name} message filter in this environment: is Dynamics 365 Contact "
                "Center (Omnichannel) installed?"
            )
        filters[name] = str(rows[0]["sdkmessagefilterid"]).lower()
    return messages, filters


async def _endpoint(client: DataverseClient, url: str, key: str, act: Callable[..., None], dry_run: bool) -> str | None:
    desired: dict[str, Any] = {
        "name": ENDPOINT_NAME,
        "description": "Teams presence sync: msdyn_agentstatus presence changes and new agents",
        "contract": CONTRACT_WEBHOOK,
        "url": url,
        "authtype": AUTH_WEBHOOK_KEY,
        "messageformat": MESSAGE_FORMAT_JSON,
        "connectionmode": CONNECTION_NORMAL,
        "userclaim": USER_CLAIM_NONE,
    }
    found = await client.query(
        "serviceendpoints",
        select=_ENDPOINT_FIELDS,
        filter=f"name eq {odata_string(ENDPOINT_NAME)}",
        what="looking up the webhook endpoint",
    )
    if not found:
        found = await client.query(
            "serviceendpoints",
            select=_ENDPOINT_FIELDS,
            filter=f"contract eq {CONTRACT_WEBHOOK} and url eq {odata_string(url)}",
            what="looking up the webhook endpoint by URL",
        )
    if not found:
        act(f"create serviceendpoint {ENDPOINT_NAME!r} (webhook, WebhookKey) -> {url}")
        if dry_run:
            return None
        return await client.create(
            "serviceendpoints", {**desired, "authvalue": key}, what="creating the webhook serviceendpoint"
        )
    row = found[0]
    endpoint_id = str(row["serviceendpointid"]).lower()
    if len(found) > 1:
        act(f"note: {len(found)} endpoints match; using {endpoint_id}, the others are left alone", change=False)
    diff = _differences(row, {k: v for k, v in desired.items() if k != "description"})
    if diff:
        act(f"update serviceendpoint {endpoint_id}: {', '.join(diff)}")
    else:
        act(f"serviceendpoint {endpoint_id} is up to date ({url})", change=False)
    act("re-send the webhook key (Dataverse never returns it, so it cannot be compared)", change=False)
    if not dry_run:
        body = {**(desired if diff else {}), "authvalue": key}
        await client.update("serviceendpoints", endpoint_id, body, what="updating the webhook serviceendpoint")
    return endpoint_id


async def _step(
    client: DataverseClient,
    message: str,
    message_id: str,
    filter_id: str,
    endpoint_id: str | None,
    existing: list[dict[str, Any]],
    act: Callable[..., None],
    dry_run: bool,
) -> str | None:
    desired: dict[str, Any] = {
        "name": f"{ENDPOINT_NAME}: {message} of {TABLE}",
        "mode": MODE_SYNCHRONOUS,
        "stage": STAGE_POST_OPERATION,
        "rank": 1,
        "supporteddeployment": DEPLOYMENT_SERVER,
        "filteringattributes": FILTERING_ATTRIBUTES if message == "Update" else None,
        "statecode": 0,
    }
    binds = {
        "sdkmessageid@odata.bind": f"/sdkmessages({message_id})",
        "sdkmessagefilterid@odata.bind": f"/sdkmessagefilters({filter_id})",
    }
    mine = [s for s in existing if str(s.get("_sdkmessageid_value") or "").lower() == message_id]
    if not mine:
        act(
            f"create step {desired['name']!r} (synchronous, post-operation"
            f"{', filtering ' + FILTERING_ATTRIBUTES if desired['filteringattributes'] else ''})"
        )
        if dry_run or endpoint_id is None:
            return None
        body = {
            **desired,
            **binds,
            "asyncautodelete": False,
            "eventhandler_serviceendpoint@odata.bind": f"/serviceendpoints({endpoint_id})",
        }
        body.pop("statecode")
        return await client.create("sdkmessageprocessingsteps", body, what=f"creating the {message} step")
    step, extra = mine[0], mine[1:]
    step_id = str(step["sdkmessageprocessingstepid"]).lower()
    diff = _differences(step, desired)
    if str(step.get("_sdkmessagefilterid_value") or "").lower() != filter_id:
        diff.append("sdkmessagefilterid")
    if diff:
        act(f"update step {step_id} ({message}): {', '.join(diff)}")
        if not dry_run:
            body = {**desired, "sdkmessagefilterid@odata.bind": binds["sdkmessagefilterid@odata.bind"]}
            if step.get("statecode") != 0:
                body["statuscode"] = 1
            await client.update("sdkmessageprocessingsteps", step_id, body, what=f"updating the {message} step")
    else:
        act(f"step {step_id} ({message}) is up to date", change=False)
    for dup in extra:
        act(f"delete duplicate {message} step {dup['sdkmessageprocessingstepid']} (it would call the webhook twice)")
        if not dry_run:
            await client.delete(
                "sdkmessageprocessingsteps",
                dup["sdkmessageprocessingstepid"],
                what=f"deleting a duplicate {message} step",
            )
    return step_id


async def _post_image(client: DataverseClient, step_id: str | None, act: Callable[..., None], dry_run: bool) -> None:
    """The Update step's post-image (``POST_IMAGE_ALIAS``): a Target holds only the columns the writer
    sent, and this image brings the agent with every presence change. Created when missing, patched
    when its columns or type differ, left alone when equal; images under other aliases are not ours."""
    desired: dict[str, Any] = {
        "name": POST_IMAGE_ALIAS,
        "entityalias": POST_IMAGE_ALIAS,
        "imagetype": IMAGE_TYPE_POST,
        "messagepropertyname": "Target",
        "attributes": ",".join(POST_IMAGE_ATTRIBUTES),
    }
    shown = f"post-image {POST_IMAGE_ALIAS!r} on the Update step ({desired['attributes']})"
    found: list[dict[str, Any]] = []
    if step_id is not None:
        found = await client.query(
            "sdkmessageprocessingstepimages",
            select=_IMAGE_FIELDS,
            filter=f"_sdkmessageprocessingstepid_value eq {step_id} "
            f"and entityalias eq {odata_string(POST_IMAGE_ALIAS)}",
            what="reading the Update step's post-image",
        )
    if not found:
        act(f"create {shown}")
        if dry_run or step_id is None:
            return
        body = {
            **desired,
            "description": "Teams presence sync: the agent and presence of every presence change",
            "sdkmessageprocessingstepid@odata.bind": f"/sdkmessageprocessingsteps({step_id})",
        }
        await client.create("sdkmessageprocessingstepimages", body, what="creating the Update step's post-image")
        return
    image = found[0]
    image_id = str(image["sdkmessageprocessingstepimageid"]).lower()
    diff = _differences(image, {k: v for k, v in desired.items() if k != "name"})
    if not diff:
        act(f"{shown} {image_id} is up to date", change=False)
        return
    act(f"update post-image {image_id} ({POST_IMAGE_ALIAS}): {', '.join(diff)}")
    if not dry_run:
        await client.update(
            "sdkmessageprocessingstepimages", image_id, desired, what="updating the Update step's post-image"
        )


def _differences(row: Mapping[str, Any], desired: Mapping[str, Any]) -> list[str]:
    out = []
    for name, want in desired.items():
        have = row.get(name)
        same = _attrs(have) == _attrs(want) if name in ("filteringattributes", "attributes") else have == want
        if not same:
            out.append(f"{name} {have!r} -> {want!r}")
    return out


def _attrs(value: Any) -> frozenset[str]:
    if not isinstance(value, str):
        return frozenset()
    return frozenset(a.strip().lower() for a in value.split(",") if a.strip())
