"""Proactive follow-ups: when a change the bot reported as *queued* finally lands or dies, tell the agent.

The reply to a command waits a few seconds for the outbox; when an upstream is throttled or down, the
reply honestly says "queued" and promises a follow-up. Keeping that promise must survive a restart and
must not depend on which instance delivers the row, so everything is durable in the store:

- ``bot.conversation`` / agent id: the agent's conversation reference (opaque JSON from the SDK
  module), refreshed on every message, so a proactive message can reach the agent's 1:1 chat.
- ``bot.followup`` / ``<agent id>:<system>``: one pending follow-up per outbox row (the row is
  per agent and system too, so a newer queued change simply replaces the older promise).

``FollowUps`` is a ``mapping.ports.DeliveryListener``: the outbox calls ``on_outcome`` after a row is
delivered or dead. It records the outcome first (durable), then sends on a task of its own, so a slow
Bot Connector never holds up an outbox worker. A periodic ``sweep`` catches what a crash or another
instance left behind: outcomes recorded but not sent, and rows that settled where no listener saw it.

The sending goes through ``ProactiveSender`` so that this module stays free of Bot Framework types.

One bad document never stops the book: a follow-up that cannot be understood (no agent, an unknown
system, a generation that is not a number) is taken out and handed to ``on_poison`` (``edge.poison``);
one whose check fails otherwise (the store) is left for the next sweep while the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from bot.commands import PendingChange
from bot.wording import SYSTEM_NAMES, value_label
from edge.poison import PoisonHook, encode_item, hand_off, log_poison
from mapping.api import CoreApi
from mapping.model import CLEAR, Delivery, OutboxStatus, System

log = logging.getLogger("presence_sync.bot")

FOLLOWUP_KIND = "bot.followup"
CONVERSATION_KIND = "bot.conversation"
ROUTE = "bot_followups"
"""The follow-up book, as a route label for its poison items."""
_OUTCOMES = (None, "delivered", "dead")
MAX_SEND_ATTEMPTS = 5
"""A follow-up the Bot Connector refuses this often is dropped (logged): the agent may have removed
the app, and retrying forever would only grow the store."""


class ProactiveSender(Protocol):
    """Sends ``text`` into the conversation ``reference`` (as stored by ``remember_conversation``)."""

    async def send(self, reference: Mapping[str, Any], text: str) -> None: ...


def followup_key(agent_id: str, system: System) -> str:
    return f"{agent_id}:{system.value}"


def malformed(doc: Any) -> str | None:
    """Why a stored follow-up cannot be acted on, or None when it can."""
    if not isinstance(doc, Mapping):
        return "not a JSON object"
    if not isinstance(doc.get("agent_id"), str) or not doc["agent_id"]:
        return "no agent_id"
    if doc.get("system") not in {s.value for s in System}:
        return f"unknown system {ascii(doc.get('system'))[:40]}"
    generation = doc.get("generation")
    if not isinstance(generation, int) or isinstance(generation, bool):
        return "generation is not a number"
    if doc.get("outcome") not in _OUTCOMES:
        return f"unknown outcome {ascii(doc.get('outcome'))[:40]}"
    if not isinstance(doc.get("send_attempts", 0), int):
        return "send_attempts is not a number"
    for name in ("value", "label", "error", "landed_value"):
        if doc.get(name) is not None and not isinstance(doc[name], str):
            return f"{name} is not text"
    return None


async def remember_conversation(bridge: CoreApi, agent_id: str, reference: Mapping[str, Any]) -> None:
    """Stores the agent's conversation reference; skips the write when nothing changed (most messages)."""
    ref = dict(reference)
    if await bridge.records.get_doc(CONVERSATION_KIND, agent_id) != ref:
        await bridge.records.put_doc(CONVERSATION_KIND, agent_id, ref)


class FollowUps:
    """The durable follow-up book (see the module docstring). ``sender`` may be set after construction
    (the SDK module creates its adapter first); without one, outcomes are recorded and sent later."""

    def __init__(
        self,
        bridge: CoreApi,
        sender: ProactiveSender | None = None,
        *,
        sweep_seconds: float = 30.0,
        on_poison: PoisonHook | None = None,
    ) -> None:
        self.bridge = bridge
        self.on_poison = log_poison(bridge.telemetry) if on_poison is None else on_poison
        self.sender = sender
        self.sweep_seconds = sweep_seconds
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    # ------------------------------------------------------------------ recording
    async def expect(self, pending: Sequence[PendingChange]) -> None:
        """Promises follow-ups for the changes a reply called queued. The row may have settled between
        the reply's last look and now; that is checked after recording, so nothing falls in between."""
        for p in pending:
            key = followup_key(p.agent_id, p.system)
            doc = {
                "agent_id": p.agent_id,
                "system": p.system.value,
                "generation": p.generation,
                "value": p.value,
                "label": p.label,
                "queued_at": self.bridge.clock().isoformat(),
                "outcome": None,
                "error": None,
                "landed_value": None,
                "send_attempts": 0,
            }
            await self.bridge.records.put_doc(FOLLOWUP_KIND, key, doc)
            await self._check_row(key, doc)

    async def on_outcome(self, delivery: Delivery, outcome: str, error: str | None) -> None:
        """DeliveryListener: called by the outbox after a row is delivered or dead."""
        key = followup_key(delivery.agent_id, delivery.system)
        doc = await self.bridge.records.get_doc(FOLLOWUP_KIND, key)
        if doc is None or await self._poisoned(key, doc):
            return
        if doc.get("outcome") or delivery.generation < int(doc["generation"]):
            return
        await self._record(key, doc, outcome, delivery.value, error)

    async def _record(self, key: str, doc: dict[str, Any], outcome: str, value: str, error: str | None) -> None:
        doc = {**doc, "outcome": outcome, "landed_value": value, "error": error}
        await self.bridge.records.put_doc(FOLLOWUP_KIND, key, doc)
        self._spawn(key)

    async def _check_row(self, key: str, doc: Mapping[str, Any]) -> bool:
        """Records the outcome if the row settled without a listener seeing it. True if it had."""
        row = await self.bridge.delivery(doc["agent_id"], System(doc["system"]))
        if row is None:
            await self.bridge.records.delete_doc(FOLLOWUP_KIND, key)
            return False
        if row.generation < int(doc["generation"]) or row.status not in (OutboxStatus.DELIVERED, OutboxStatus.DEAD):
            return False
        outcome = "delivered" if row.status is OutboxStatus.DELIVERED else "dead"
        await self._record(key, dict(doc), outcome, row.value, row.last_error)
        return True

    # ------------------------------------------------------------------ sending
    def _spawn(self, key: str) -> None:
        task = asyncio.create_task(self._send(key), name=f"bot-followup-{key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, key: str) -> None:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            store = self.bridge.records
            doc = await store.get_doc(FOLLOWUP_KIND, key)
            if doc is None or await self._poisoned(key, doc) or not doc.get("outcome"):
                return  # sent already (another task), replaced by a newer promise, or unusable
            if self.sender is None:
                return  # recorded; the sweep sends it once a sender exists
            reference = await store.get_doc(CONVERSATION_KIND, doc["agent_id"])
            if reference is None:
                log.warning("follow-up dropped: no conversation", extra={"fields": {"agent": doc["agent_id"]}})
                await store.delete_doc(FOLLOWUP_KIND, key)
                return
            text = self.text(doc)
            try:
                await self.sender.send(reference, text)
            except Exception as e:
                attempts = int(doc.get("send_attempts", 0)) + 1
                fields = {"agent": doc["agent_id"], "attempt": attempts, "error": f"{type(e).__name__}: {e}"}
                if attempts >= MAX_SEND_ATTEMPTS:
                    log.error("follow-up dropped after repeated send failures", extra={"fields": fields})
                    await store.delete_doc(FOLLOWUP_KIND, key)
                else:
                    log.warning("follow-up not sent; will retry", extra={"fields": fields})
                    await store.put_doc(FOLLOWUP_KIND, key, {**doc, "send_attempts": attempts})
                return
            # Delete only if no newer promise replaced this one while we were sending.
            current = await store.get_doc(FOLLOWUP_KIND, key)
            if current is not None and current.get("generation") == doc.get("generation") and current.get("outcome"):
                await store.delete_doc(FOLLOWUP_KIND, key)
            log.info(
                "follow-up sent",
                extra={"fields": {"agent": doc["agent_id"], "system": doc["system"], "outcome": doc["outcome"]}},
            )

    def text(self, doc: Mapping[str, Any]) -> str:
        """The follow-up message: what finally happened to the change the agent was told was queued."""
        system = System(doc["system"])
        name = SYSTEM_NAMES[system]
        label = doc.get("label") or value_label(self.bridge, system, doc.get("value"))
        landed = doc.get("landed_value")
        if doc.get("outcome") == "delivered":
            if landed == doc.get("value"):
                if system is System.DYNAMICS:
                    return f"Update: your change to **{label}** is now applied in Dynamics 365."
                if landed == CLEAR:
                    return f"Update: Teams now follows your change to **{label}**: it shows your own status again."
                return (
                    f"Update: Teams now follows your change to **{label}**: the bridge's Teams status is "
                    f"{value_label(self.bridge, system, landed)}."
                )
            return (
                f"Update: {name} now has **{value_label(self.bridge, system, landed)}**: a newer change "
                f"replaced your change to {label} before it was applied."
            )
        error = doc.get("error") or "no reason given"
        if system is System.DYNAMICS:
            return (
                f"Update: your change to **{label}** could **not** be applied in Dynamics 365: {error}. "
                "Teams is being set back to match what Dynamics 365 shows. Nothing more will be tried "
                "automatically; type **status** to see where you are, or ask your admin to retry it."
            )
        return (
            f"Update: Teams could **not** be updated to follow your change to **{label}**: {error}. "
            "Dynamics 365 is not affected; type **status** to see what each shows."
        )

    async def sweep(self) -> int:
        """Sends what is due: outcomes recorded but not sent (crash, connector down), and rows that
        settled unseen (another instance delivered them). Returns how many follow-ups it started."""
        started = 0
        for key, doc in (await self.bridge.records.list_docs(FOLLOWUP_KIND)).items():
            if await self._poisoned(key, doc):
                continue
            if doc.get("outcome"):
                self._spawn(key)
                started += 1
                continue
            try:
                if await self._check_row(key, doc):
                    started += 1
            except Exception:  # this one only (the store, most likely): the next sweep tries it again
                log.exception("follow-up not checked; will try again", extra={"fields": {"followup": key}})
        return started

    async def _poisoned(self, key: str, doc: Any) -> bool:
        """True (and the document taken out, handed to ``on_poison``) when it cannot be acted on."""
        problem = malformed(doc)
        if problem is None:
            return False
        await hand_off(
            self.on_poison,
            ROUTE,
            "malformed_followup",
            encode_item({"key": key, "doc": doc}),
            f"follow-up {ascii(key)[:80]} cannot be sent: {problem}; removed, the others go on",
        )
        await self.bridge.records.delete_doc(FOLLOWUP_KIND, key)
        return True

    async def drain(self, timeout: float = 5.0) -> None:
        """Waits for the sends under way (tests, shutdown)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._loop is None:
            self._stop.clear()
            self._loop = asyncio.create_task(self._run(), name="bot-followup-sweep")

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.sweep()
            except Exception:
                log.exception("follow-up sweep failed; will try again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.sweep_seconds)

    async def stop(self) -> None:
        self._stop.set()
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        await self.drain(timeout=2.0)
        for task in list(self._tasks):
            task.cancel()
