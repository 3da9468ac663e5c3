"""``POST /api/messages``: the Bot Framework endpoint Teams calls. The ONLY module that imports botbuilder.

Everything here is transport: check the request, let the SDK authenticate it and build the turn, find
the sender in the agent directory, hand the text or card value to ``bot.commands``, send the reply
back through the Bot Connector, and send follow-ups proactively (``bot.followups`` decides when).
botbuilder is archived upstream (successor: the Microsoft 365 Agents SDK); moving means rewriting
this file only.

Checks, in order, each answered with JSON ``{"error": ...}`` and counted as
``telemetry.rejected("bot_messages", reason)`` (never a 500):

1. No app id configured: the SDK then skips authentication, so only loopback callers are served
   (401 ``unauthenticated`` for others), and replies may only go to a loopback ``serviceUrl``
   (400 ``service_url``): an unauthenticated bot must not be made to post anywhere on a caller's behalf.
   With an app id, a request without ``Authorization`` is refused at once (401) and the SDK validates
   the Bot Connector JWT (401 when it fails), with signing keys from ``bot.keys``: fetched off the
   request path with a timeout and cached, so no caller can stall the event loop with forged tokens.
2. Body: 413 over ``MAX_BODY``; 415 when not JSON; 400 when not a JSON object or no activity ``type``.
3. Activity: 400 for a message without ``from``, ``conversation`` or ``serviceUrl`` (nothing can be
   answered) or whose ``from.aadObjectId`` is not a GUID; 403 ``wrong_tenant`` when ``BOT_TENANT_ID``
   is set and the activity is from another tenant. Activity types the bot has no use for (typing,
   reactions, invokes...) are ignored: 200, no reply (with an app id, only after the token was accepted).

The sender is ``activity.from.aadObjectId`` only (the Bot Connector vouches for it); nothing typed can
name another person. Unknown users are recorded by ``engine.agent_for`` and told their object id.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlparse

import aiohttp
from aiohttp import web
from botbuilder.core import TurnContext
from botbuilder.integration.aiohttp import CloudAdapter, ConfigurationBotFrameworkAuthentication
from botbuilder.schema import Activity, ActivityTypes, Attachment, ConversationReference
from botframework.connector.auth import AuthenticateRequestResult, jwt_token_extractor
from botframework.connector.auth.authentication_constants import AuthenticationConstants
from botframework.connector.auth.government_constants import GovernmentConstants

from bot.commands import SETTLE_SECONDS, Reply, handle
from bot.followups import FollowUps, remember_conversation
from bot.keys import OpenIdKeys
from bot.parsing import Kind, parse
from edge.body import read_json
from edge.intake import Rejected, answer
from edge.poison import PoisonHook
from edge.upstream import is_loopback
from mapping.api import CoreApi
from mapping.errors import ConfigError
from mapping.model import Agent, System
from mapping.ports import PresenceReader
from mapping.rules import Result

log = logging.getLogger("presence_sync.bot")

ROUTE = "bot_messages"
MAX_BODY = 512 * 1024
"""Teams activities are a few KB (message text is capped at about 28 KB); anything near this is not Teams."""
ADAPTIVE_CARD = "application/vnd.microsoft.card.adaptive"
_GUID = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_KNOWN_TYPES = frozenset(t.value for t in ActivityTypes)
_HANDLED = frozenset(
    t.value for t in (ActivityTypes.message, ActivityTypes.conversation_update, ActivityTypes.installation_update)
)
_NO_TYPING = (Kind.HELP, Kind.EMPTY, Kind.PRESENCES, Kind.INVALID)


METADATA_URLS = (
    AuthenticationConstants.TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL,
    AuthenticationConstants.TO_BOT_FROM_EMULATOR_OPENID_METADATA_URL,
    GovernmentConstants.TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL,
    GovernmentConstants.TO_BOT_FROM_EMULATOR_OPENID_METADATA_URL,
)
"""Every metadata document botbuilder may ask for (channel and emulator tokens, public and US Gov)."""


def bot_keys(source: str | None = None, *, timeout: float = 5.0, wait: float | None = None) -> list[OpenIdKeys]:
    """One ``OpenIdKeys`` per metadata URL botbuilder knows; ``source`` fetches all of them from one
    place instead (a loopback OpenID server in tests)."""
    return [OpenIdKeys(url, source=source, timeout=timeout, wait=wait) for url in METADATA_URLS]


def _any_url(url: str) -> OpenIdKeys:
    """Stands in for botbuilder's ``_OpenIdMetadata`` class for a URL not installed by name."""
    return OpenIdKeys(url)


def install_keys(keys: Iterable[OpenIdKeys]) -> None:
    """Puts ``keys`` in botbuilder's per-URL metadata cache, and makes any other URL it may build a
    cache for use ``OpenIdKeys`` too: no path of botbuilder's validation fetches with ``requests``."""
    jwt_token_extractor._OpenIdMetadata = _any_url
    cache = jwt_token_extractor.JwtTokenExtractor.metadataCache
    for url, current in list(cache.items()):
        if not isinstance(current, OpenIdKeys):
            cache[url] = OpenIdKeys(url)
    for k in keys:
        cache[k.url] = k


def uninstall_keys(keys: Iterable[OpenIdKeys]) -> None:
    """Takes ``keys`` out of botbuilder's cache again (another intake may have installed its own)."""
    cache = jwt_token_extractor.JwtTokenExtractor.metadataCache
    for k in keys:
        if cache.get(k.url) is k:
            del cache[k.url]


def _tenant_of(body: Mapping[str, Any]) -> str | None:
    conv = body.get("conversation")
    if isinstance(conv, Mapping) and isinstance(conv.get("tenantId"), str):
        return str(conv["tenantId"])
    data = body.get("channelData")
    tenant = data.get("tenant") if isinstance(data, Mapping) else None
    if isinstance(tenant, Mapping) and isinstance(tenant.get("id"), str):
        return str(tenant["id"])
    return None


class _SdkSender:
    """``bot.followups.ProactiveSender`` on the CloudAdapter: continues the stored conversation."""

    def __init__(self, intake: BotIntake) -> None:
        self.intake = intake

    async def send(self, reference: Mapping[str, Any], text: str) -> None:
        ref = ConversationReference().deserialize(dict(reference))
        if not self.intake.auth_enabled and not is_loopback(urlparse(ref.service_url or "").hostname):
            raise ValueError("no app id: proactive messages only go to a loopback serviceUrl")

        async def say(turn: TurnContext) -> None:
            await turn.send_activity(Activity(type=ActivityTypes.message, text=text, text_format="markdown"))

        await self.intake.adapter.continue_conversation(ref, say, self.intake.app_id)


class BotIntake:
    """The bot's inbound route and its proactive side (follow-ups, registered with the core when
    built). ``service`` calls ``start``/``stop`` with the runtime.

    ``keys``: the Bot Connector's signing keys (``bot.keys``; default: Microsoft's metadata URLs).
    ``warm_keys``: fetch them in the background at ``start`` so the first request finds them (the
    service does; tests that must not leave loopback do not). ``on_poison``: where unusable follow-up
    documents go (``edge.poison``)."""

    def __init__(
        self,
        bridge: CoreApi,
        readers: Mapping[System, PresenceReader],
        *,
        app_id: str,
        app_password: str,
        app_type: str,
        tenant_id: str,
        settle_seconds: float = SETTLE_SECONDS,
        keys: list[OpenIdKeys] | None = None,
        warm_keys: bool = False,
        on_poison: PoisonHook | None = None,
    ) -> None:
        self.bridge = bridge
        self.readers = readers
        self.app_id = app_id.strip()
        self.tenant_id = tenant_id.strip().lower()
        self.auth_enabled = bool(self.app_id)
        self.settle_seconds = settle_seconds
        kind = (app_type or "SingleTenant").strip()
        if self.auth_enabled:
            if not _GUID.match(self.app_id):
                raise ConfigError(
                    f"PRESENCE_SYNC_BOT_APP_ID must be the bot's Microsoft app id (a GUID), not {app_id!r}"
                )
            if kind.lower() in ("singletenant", "userassignedmsi") and not self.tenant_id:
                raise ConfigError(
                    f"PRESENCE_SYNC_BOT_APP_TYPE={kind} needs the bot's tenant: set PRESENCE_SYNC_BOT_TENANT_ID "
                    "(or PRESENCE_SYNC_TENANT_ID, its default), or PRESENCE_SYNC_BOT_APP_TYPE=MultiTenant for an "
                    "older multi-tenant registration"
                )
            if kind.lower() in ("singletenant", "multitenant") and not app_password:
                raise ConfigError(f"PRESENCE_SYNC_BOT_APP_TYPE={kind} needs PRESENCE_SYNC_BOT_APP_PASSWORD")
        else:
            kind = "MultiTenant"  # the only type the SDK accepts without an app id (auth disabled)
        config = SimpleNamespace(
            APP_ID=self.app_id, APP_PASSWORD=app_password, APP_TYPE=kind, APP_TENANTID=self.tenant_id or None
        )
        self.adapter = CloudAdapter(ConfigurationBotFrameworkAuthentication(config))
        self.keys = bot_keys() if keys is None else keys
        self.warm_keys = warm_keys
        install_keys(self.keys)  # no I/O: botbuilder asks these for keys instead of fetching with requests
        self.followups = FollowUps(bridge, _SdkSender(self), on_poison=on_poison)
        bridge.on_delivery(self.followups)  # follow-ups for changes a reply called queued

    async def start(self) -> None:
        install_keys(self.keys)
        if self.auth_enabled and self.warm_keys:
            for k in self.keys:
                k.refresh()  # in the background; a failure is logged and backed off
        await self.followups.start()

    async def stop(self) -> None:
        await self.followups.stop()
        for k in self.keys:
            await k.close()
        uninstall_keys(self.keys)

    # ------------------------------------------------------------------ the route
    async def handle(self, request: web.Request) -> web.StreamResponse:
        return await answer(
            ROUTE,
            self.bridge.telemetry,
            lambda: self._handle(request),
            unavailable="the bot could not process this activity now; send it again",
            remote=request.remote,
        )

    async def _handle(self, request: web.Request) -> web.Response:
        auth_header = request.headers.get("Authorization", "")
        if not self.auth_enabled:
            if not is_loopback(request.remote):
                raise Rejected(
                    401,
                    "unauthenticated",
                    "this bot has no app id (PRESENCE_SYNC_BOT_APP_ID), so it serves loopback callers only",
                )
        elif not auth_header:
            raise Rejected(401, "unauthenticated", "missing Authorization header (Bot Connector token)")
        body = await self._read_body(request)
        activity = self._activity(body)
        # With an app id, nothing is answered 2xx before the token is checked, ignored types included.
        auth = await self._authenticate(activity, auth_header) if self.auth_enabled else None
        if activity.type not in _HANDLED:
            if activity.type not in _KNOWN_TYPES:
                self.bridge.telemetry.rejected(ROUTE, "unsupported_type")
            return web.Response(status=200)
        if auth is None:
            auth = await self._authenticate(activity, auth_header)
        await self.adapter.process_activity(auth, activity, self._turn)
        return web.Response(status=200)

    async def _authenticate(self, activity: Activity, auth_header: str) -> AuthenticateRequestResult:
        """The SDK's check of the Bot Connector JWT (anonymous without an app id). A token it cannot
        accept is a 401 whatever the SDK raised (PermissionError, or a JWT decoding error), and so is a
        token whose signing key is not known (yet): ``bot.keys`` never lets a request wait on the key
        server for longer than its bounded wait, so no caller can hold the service up."""
        try:
            result: AuthenticateRequestResult = await self.adapter.bot_framework_authentication.authenticate_request(
                activity, auth_header
            )
        except PermissionError:
            raise Rejected(401, "unauthenticated", "the Bot Connector token was not accepted") from None
        except (aiohttp.ClientError, TimeoutError, OSError):
            raise
        except Exception:
            raise Rejected(401, "unauthenticated", "the Bot Connector token was not accepted") from None
        return result

    async def _read_body(self, request: web.Request) -> dict[str, Any]:
        body = await read_json(request, max_body=MAX_BODY, what="a Bot Framework activity", types=("application/json",))
        if not isinstance(body, dict):
            raise Rejected(400, "malformed", "body is not a JSON object (an activity)")
        if not isinstance(body.get("type"), str) or not body["type"]:
            raise Rejected(400, "malformed", "activity has no type")
        return body

    def _activity(self, body: dict[str, Any]) -> Activity:
        try:
            activity = Activity().deserialize(body)
        except Exception:
            raise Rejected(400, "malformed", "not a Bot Framework activity") from None
        if activity.type not in _HANDLED:
            return activity
        if activity.from_property is None or not activity.from_property.id:
            raise Rejected(400, "malformed", "activity has no from")
        aad = activity.from_property.aad_object_id
        if aad and (not isinstance(aad, str) or not _GUID.match(aad.strip())):
            # Teams sends the sender's Entra object id, a GUID; anything else names nobody, and an id
            # the store cannot hold (NUL, 200 characters) must not fail the request as a 503.
            raise Rejected(400, "malformed", "from.aadObjectId is not a Microsoft Entra object id (a GUID)")
        if activity.conversation is None or not activity.conversation.id:
            raise Rejected(400, "malformed", "activity has no conversation")
        if not activity.service_url:
            raise Rejected(400, "malformed", "activity has no serviceUrl")
        host = urlparse(activity.service_url).hostname
        if not self.auth_enabled and not is_loopback(host):
            raise Rejected(400, "service_url", "without an app id, serviceUrl must be a loopback address")
        tenant = _tenant_of(body)
        if self.tenant_id and tenant is not None and tenant.lower() != self.tenant_id:
            raise Rejected(403, "wrong_tenant", "this bot serves one Microsoft Entra tenant only")
        return activity

    # ------------------------------------------------------------------ the turn
    async def _turn(self, turn: TurnContext) -> None:
        activity = turn.activity
        if activity.type == ActivityTypes.message:
            await self._on_message(turn)
        elif activity.type == ActivityTypes.conversation_update:
            added = [m.id for m in activity.members_added or []]
            if activity.recipient is not None and activity.recipient.id in added:
                await self._on_install(turn)
        elif activity.type == ActivityTypes.installation_update:
            await self._remember(turn)

    async def _on_install(self, turn: TurnContext) -> None:
        agent = await self._remember(turn)
        if agent is None:
            await self._say(turn, self._unmapped(turn))
            return
        await self._say(turn, await handle(parse("help"), agent, self.bridge, self.readers))

    async def _remember(self, turn: TurnContext) -> Agent | None:
        aad = (turn.activity.from_property.aad_object_id or "").strip()
        if not aad:
            return None
        agent = await self.bridge.agent_for(System.TEAMS, aad)
        if agent is not None:
            ref = TurnContext.get_conversation_reference(turn.activity).serialize()
            await remember_conversation(self.bridge, agent.dynamics_user_id, ref)
        return agent

    async def _on_message(self, turn: TurnContext) -> None:
        activity = turn.activity
        if (activity.conversation.conversation_type or "personal") != "personal":
            # Replies carry presence details; a group chat or channel would show them to everyone.
            self.bridge.telemetry.rejected(ROUTE, "not_personal")
            await self._say(
                turn, Reply("I only work in a 1:1 chat with you: open a chat with me to set your presence.")
            )
            return
        if not (activity.from_property.aad_object_id or "").strip():
            self.bridge.telemetry.rejected(ROUTE, "no_aad_object_id")
            await self._say(
                turn,
                Reply(
                    "I can only help people signed in to Teams with a work account: your message came "
                    "without a Microsoft Entra object id."
                ),
            )
            return
        agent = await self._remember(turn)
        if agent is None:
            self.bridge.telemetry.event("bot", Result.UNKNOWN_AGENT)
            await self._say(turn, self._unmapped(turn))
            return
        command = parse(activity.text, activity.value)
        if command.kind not in _NO_TYPING:
            await self._typing(turn)
        reply = await handle(command, agent, self.bridge, self.readers, settle_seconds=self.settle_seconds)
        await self._say(turn, reply)
        if reply.pending:
            await self.followups.expect(reply.pending)
        log.info(
            "bot command",
            extra={
                "fields": {
                    "agent": agent.dynamics_user_id,
                    "command": str(command.kind),
                    "queued": len(reply.pending),
                }
            },
        )

    def _unmapped(self, turn: TurnContext) -> Reply:
        user = turn.activity.from_property
        aad = (user.aad_object_id or "").strip().lower()
        name = (user.name or "").split()[0] if (user.name or "").strip() else "there"
        return Reply(
            f"Hi {name}, I don't know you yet: your Teams account isn't in the presence directory, so I "
            f"can't change your presence. Ask your admin to add you; your Entra object id is `{aad}`."
        )

    async def _typing(self, turn: TurnContext) -> None:
        try:
            await turn.send_activity(Activity(type=ActivityTypes.typing))
        except Exception as e:  # cosmetic: never let it cost the reply
            log.warning("typing indicator not sent", extra={"fields": {"error": f"{type(e).__name__}: {e}"}})

    async def _say(self, turn: TurnContext, reply: Reply) -> None:
        """Sends the reply. A Bot Connector failure is logged, not raised: the change (if any) is
        durable already, and the follow-up or ``status`` will tell the agent."""
        message = Activity(type=ActivityTypes.message, text=reply.text, text_format="markdown")
        if reply.card is not None:
            message.attachments = [Attachment(content_type=ADAPTIVE_CARD, content=reply.card)]
        try:
            await turn.send_activity(message)
        except Exception as e:
            log.error(
                "reply not delivered to the Bot Connector",
                extra={"fields": {"service_url": turn.activity.service_url, "error": f"{type(e).__name__}: {e}"}},
            )


__all__ = ["ADAPTIVE_CARD", "MAX_BODY", "ROUTE", "BotIntake", "is_loopback"]
