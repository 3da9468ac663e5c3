"""A fake Bot Connector: what Teams' ``serviceUrl`` does for a bot, on a loopback port.

A bot answers Teams by POSTing activities to the ``serviceUrl`` of the activity it received:

- ``POST /v3/conversations/{conversationId}/activities/{replyToId}``: a reply (what ``send_activity``
  does inside a turn),
- ``POST /v3/conversations/{conversationId}/activities``: a message into the conversation (what a
  proactive message does when it is not a reply),
- ``POST /v3/conversations``: create a conversation (proactive messaging to someone the bot has no
  conversation with yet),
- ``PUT /v3/conversations/{conversationId}/activities/{activityId}``: update a message.

Every call is recorded (``sent``) and answered like the real connector (``201`` with
``{"id": ...}``), so tests and ``presence-sync demo`` can see exactly what an agent would read in
Teams. ``fail_next`` makes the next calls fail (the connector does return 429/5xx), to show that a
lost reply never loses a change.

``teams_message`` (and ``teams_install``) build inbound activities shaped as Teams sends them to a
bot's messaging endpoint, pointing their ``serviceUrl`` at this fake.

Small control API for the demo: ``GET /_emulator/activities`` (what was sent, as JSON),
``POST /_emulator/reset``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from emulators.serving import serve_app

ADAPTIVE_CARD = "application/vnd.microsoft.card.adaptive"
DEFAULT_TENANT_ID = "00000000-0000-0000-0000-0000000070e7"
DEFAULT_BOT_APP_ID = "00000000-0000-0000-0000-00000000b07b"
DEFAULT_BOT_NAME = "Presence Sync"


@dataclass
class SentActivity:
    """One activity the bot sent to the connector, with where it went."""

    conversation_id: str
    reply_to_id: str | None
    activity: dict[str, Any]
    method: str = "POST"
    path: str = ""
    authorization: str | None = None
    at: float = field(default_factory=time.monotonic)

    @property
    def type(self) -> str:
        return str(self.activity.get("type", ""))

    @property
    def text(self) -> str:
        return str(self.activity.get("text") or "")

    @property
    def cards(self) -> list[dict[str, Any]]:
        """The Adaptive Cards attached (their ``content``)."""
        return [
            a.get("content") or {}
            for a in self.activity.get("attachments") or []
            if isinstance(a, dict) and a.get("contentType") == ADAPTIVE_CARD
        ]

    @property
    def card(self) -> dict[str, Any] | None:
        cards = self.cards
        return cards[0] if cards else None


class BotConnectorEmulator:
    """The fake connector. ``start()`` on port 0; ``url`` is the ``serviceUrl`` to put in activities."""

    def __init__(self) -> None:
        self.sent: list[SentActivity] = []
        self.conversations: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._changed = asyncio.Condition()
        self._fail: list[tuple[int, float | None]] = []
        self._runner: web.AppRunner | None = None
        self._base = ""

    def make_app(self) -> web.Application:
        app = web.Application()
        r = app.router
        r.add_post("/v3/conversations", self._h_create)
        r.add_post("/v3/conversations/{cid}/activities", self._h_send)
        r.add_post("/v3/conversations/{cid}/activities/{reply_to}", self._h_send)
        r.add_put("/v3/conversations/{cid}/activities/{reply_to}", self._h_send)
        r.add_get("/_emulator/activities", self._h_list)
        r.add_post("/_emulator/reset", self._h_reset)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        if self._runner is not None:
            raise RuntimeError("BotConnectorEmulator already started")
        self._runner, self._base = await serve_app(self.make_app(), host, port)
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> BotConnectorEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """The ``serviceUrl`` (with the trailing slash Teams uses)."""
        if not self._base:
            raise RuntimeError("BotConnectorEmulator not started")
        return f"{self._base}/"

    # ------------------------------------------------------------------ faults and inspection
    def fail_next(self, n: int = 1, status: int = 503, retry_after: float | None = None) -> None:
        """The next ``n`` activity posts are answered ``status`` (and not recorded as delivered)."""
        self._fail.extend([(status, retry_after)] * n)

    def clear(self) -> None:
        self.sent.clear()
        self.conversations.clear()
        self._fail.clear()

    def messages(self, conversation_id: str | None = None) -> list[SentActivity]:
        """Sent activities of type ``message`` (typing indicators left out)."""
        return [
            s
            for s in self.sent
            if s.type == "message" and (conversation_id is None or s.conversation_id == conversation_id)
        ]

    async def wait_for(
        self, predicate: Callable[[SentActivity], bool], timeout: float = 5.0, *, since: int = 0
    ) -> SentActivity:
        """The first activity (from index ``since`` of ``sent``) matching ``predicate``; waits for it
        up to ``timeout`` seconds, then raises TimeoutError naming what was sent instead."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while True:
                for s in self.sent[since:]:
                    if predicate(s):
                        return s
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [f"{s.type}: {s.text[:80]!r}" for s in self.sent[since:]]
                    raise TimeoutError(f"no matching activity within {timeout:g} s; sent: {seen}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)

    # ------------------------------------------------------------------ handlers
    async def _h_send(self, request: web.Request) -> web.Response:
        if self._fail:
            status, retry_after = self._fail.pop(0)
            headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
            return web.json_response(
                {"error": {"code": "ServiceError", "message": "injected failure"}}, status=status, headers=headers
            )
        try:
            activity = await request.json()
        except ValueError:
            return web.json_response({"error": {"code": "BadArgument", "message": "body is not JSON"}}, status=400)
        if not isinstance(activity, dict) or not activity.get("type"):
            return web.json_response({"error": {"code": "BadArgument", "message": "no activity type"}}, status=400)
        cid = request.match_info["cid"]
        record = SentActivity(
            conversation_id=cid,
            reply_to_id=request.match_info.get("reply_to") if request.method == "POST" else None,
            activity=activity,
            method=request.method,
            path=request.path,
            authorization=request.headers.get("Authorization"),
        )
        async with self._changed:
            self.sent.append(record)
            self._changed.notify_all()
        return web.json_response({"id": f"1:{next(self._ids)}"}, status=200 if request.method == "PUT" else 201)

    async def _h_create(self, request: web.Request) -> web.Response:
        try:
            params = await request.json()
        except ValueError:
            return web.json_response({"error": {"code": "BadArgument", "message": "body is not JSON"}}, status=400)
        members = params.get("members") or []
        if not isinstance(members, list) or not members:
            return web.json_response({"error": {"code": "BadArgument", "message": "members required"}}, status=400)
        cid = f"a:1{uuid.uuid4().hex}"
        self.conversations.append({"id": cid, **params})
        return web.json_response({"id": cid, "serviceUrl": self.url, "activityId": None}, status=201)

    async def _h_list(self, request: web.Request) -> web.Response:
        return web.json_response(
            [
                {"conversationId": s.conversation_id, "replyToId": s.reply_to_id, "activity": s.activity}
                for s in self.sent
            ]
        )

    async def _h_reset(self, request: web.Request) -> web.Response:
        self.clear()
        return web.json_response({"status": "reset"})


# ---------------------------------------------------------------------------------------------- activities


_activity_seq = itertools.count(1)


def _stable(prefix: str, seed: str, n: int = 40) -> str:
    return prefix + hashlib.sha256(seed.encode()).hexdigest()[:n]


def teams_user_id(aad_object_id: str) -> str:
    """A Teams user id (``29:...``) stable per Entra object id, as Teams gives each user one per bot."""
    return _stable("29:1", aad_object_id)


def personal_conversation_id(aad_object_id: str, bot_app_id: str = DEFAULT_BOT_APP_ID) -> str:
    """The id of the 1:1 chat between a user and the bot (``a:...``), stable for the pair."""
    return _stable("a:1", f"{aad_object_id}|{bot_app_id}", 60)


def _base_activity(
    *,
    activity_type: str,
    service_url: str,
    aad_object_id: str | None,
    user_name: str,
    tenant_id: str,
    bot_app_id: str,
    bot_name: str,
    conversation_id: str | None,
    activity_id: str | None,
    locale: str,
) -> dict[str, Any]:
    now = datetime.now(UTC)
    seed = aad_object_id or user_name
    user: dict[str, Any] = {"id": teams_user_id(seed), "name": user_name}
    if aad_object_id is not None:
        user["aadObjectId"] = aad_object_id
    cid = conversation_id or personal_conversation_id(seed, bot_app_id)
    aid = activity_id or str(int(now.timestamp() * 1000) + next(_activity_seq))
    return {
        "type": activity_type,
        "id": aid,
        "timestamp": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "localTimestamp": now.isoformat(timespec="milliseconds"),
        "serviceUrl": service_url,
        "channelId": "msteams",
        "from": user,
        "conversation": {"conversationType": "personal", "tenantId": tenant_id, "id": cid},
        "recipient": {"id": f"28:{bot_app_id}", "name": bot_name},
        "entities": [
            {
                "locale": locale,
                "country": locale.split("-")[-1],
                "platform": "Web",
                "timezone": "Europe/Berlin",
                "type": "clientInfo",
            }
        ],
        "channelData": {"tenant": {"id": tenant_id}},
        "locale": locale,
        "localTimezone": "Europe/Berlin",
    }


def teams_message(
    *,
    service_url: str,
    aad_object_id: str | None,
    text: str | None = None,
    value: Any = None,
    user_name: str = "Test Agent",
    mention_bot: bool = False,
    reply_to_id: str | None = None,
    tenant_id: str = DEFAULT_TENANT_ID,
    bot_app_id: str = DEFAULT_BOT_APP_ID,
    bot_name: str = DEFAULT_BOT_NAME,
    conversation_id: str | None = None,
    activity_id: str | None = None,
    locale: str = "en-US",
) -> dict[str, Any]:
    """A message activity as Teams posts it to a bot in a personal (1:1) chat.

    ``text``: typed text (``mention_bot`` prefixes ``<at>bot name</at>`` and adds the mention entity,
    as when the user @mentions the bot). ``value``: a card ``Action.Submit`` (Teams then sends no
    text, the button's data as ``value``, and ``replyToId`` of the card's message).
    ``aad_object_id=None`` leaves ``from.aadObjectId`` out (not a Microsoft Entra user)."""
    act = _base_activity(
        activity_type="message",
        service_url=service_url,
        aad_object_id=aad_object_id,
        user_name=user_name,
        tenant_id=tenant_id,
        bot_app_id=bot_app_id,
        bot_name=bot_name,
        conversation_id=conversation_id,
        activity_id=activity_id,
        locale=locale,
    )
    if value is not None:
        act["value"] = value
        act["channelData"]["source"] = {"name": "message"}
        if reply_to_id:
            act["replyToId"] = reply_to_id
            act["channelData"]["legacy"] = {"replyToId": reply_to_id}
        return act
    mention = f"<at>{bot_name}</at>"
    if mention_bot:
        act["entities"].insert(
            0, {"mentioned": {"id": f"28:{bot_app_id}", "name": bot_name}, "text": mention, "type": "mention"}
        )
        text = f"{mention} {text}" if text else mention
    act["text"] = text if text is not None else ""
    act["textFormat"] = "plain"
    act["attachments"] = [{"contentType": "text/html", "content": f"<p>{act['text']}</p>"}]
    if reply_to_id:
        act["replyToId"] = reply_to_id
    return act


def teams_install(
    *,
    service_url: str,
    aad_object_id: str | None,
    user_name: str = "Test Agent",
    tenant_id: str = DEFAULT_TENANT_ID,
    bot_app_id: str = DEFAULT_BOT_APP_ID,
    bot_name: str = DEFAULT_BOT_NAME,
) -> dict[str, Any]:
    """The ``conversationUpdate`` Teams sends when a user adds the bot for themselves (personal scope)."""
    act = _base_activity(
        activity_type="conversationUpdate",
        service_url=service_url,
        aad_object_id=aad_object_id,
        user_name=user_name,
        tenant_id=tenant_id,
        bot_app_id=bot_app_id,
        bot_name=bot_name,
        conversation_id=None,
        activity_id=None,
        locale="en-US",
    )
    act["membersAdded"] = [{"id": f"28:{bot_app_id}"}]
    return act
