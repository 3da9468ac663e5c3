"""The Teams port: ``PresenceWriter`` and ``PresenceReader`` on Microsoft Graph.

Writes use the app's *session* (``setPresence`` with ``sessionId`` = the app's client id), so Teams
aggregates the bridge's state with the person's own clients and the bridge can step back with
``clearPresence`` (DESIGN rule 2). There is no user-preferred mode: Graph shows a preferred presence
only while the user has at least one presence session, else Offline, and a session the bridge kept
open for it would show whenever the bridge steps back (``docs/adapters.md``, "Presence mode").

One call per ``apply`` and no retries here: the outbox retries, backs off and honours
``Retry-After`` from the typed errors this module raises.

The calls send the JSON Graph documents themselves, on the raw side of the Graph client
(``graph_sync.client.GraphHttp.send_json``, aiohttp), not through msgraph-sdk's request builders
and models: the whole service runs on one event loop, and ``bench/graph_calls.py`` measured a
``setPresence`` through the SDK at 1.07 ms of CPU, 0.68 ms as a raw POST on the SDK's httpx client
and 0.17 ms on aiohttp; a 650-id read at 3.67 ms through the adapter as it was (SDK, bytes parsed
here) against 0.92 ms for the raw aiohttp POST and parse. Errors keep one mapping,
``graph_sync.client.graph_error``, for both.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

from graph_sync.client import DEFAULT_TIMEOUT, GRAPH_SCOPE, GraphHttp, graph_error, make_http_client
from mapping.clock import Clock, utcnow
from mapping.errors import ConfigError, PermanentError, UpstreamError
from mapping.model import CLEAR, Agent, PresenceObserved, System, TeamsPresence
from mapping.ports import AdapterRecords, TokenProvider
from mapping.ratelimit import UpstreamLimiter
from mapping.retry import RetryPolicy

log = logging.getLogger("presence_sync.graph")

MAX_IDS = 650
"""``getPresencesByUserId`` accepts at most 650 ids a call."""

SESSION_PAIRS = frozenset(
    {
        ("Available", "Available"),
        ("Busy", "InACall"),
        ("Busy", "InAConferenceCall"),
        ("Away", "Away"),
        ("DoNotDisturb", "Presenting"),
    }
)
"""What ``setPresence`` accepts (Graph answers 400 to anything else)."""

WRITE_PERMISSION = "Presence.ReadWrite.All (application)"
READ_PERMISSION = "Presence.Read.All (application)"
HEALTH_KIND = "graph.health"
READ_PATH = "/communications/getPresencesByUserId"


def _presence_path(agent: Agent, action: str = "") -> str:
    """``/users/{id}/presence[/action]``, the id percent-encoded as a path segment (as kiota's URI
    templates encode it)."""
    path = f"/users/{quote(agent.entra_object_id, safe='')}/presence"
    return f"{path}/{action}" if action else path


@dataclass(frozen=True)
class WriteRefusal:
    at: str
    error: str


@dataclass(frozen=True)
class TeamsReadCheck:
    """``shown`` ("Availability/Activity") when the read worked, else ``error``; ``refused_write``:
    the last Teams write Graph refused (a permission problem), if no write succeeded since."""

    shown: str | None
    error: UpstreamError | None
    refused_write: WriteRefusal | None = None


class TeamsPresenceClient:
    """``PresenceWriter`` + ``PresenceReader`` for ``System.TEAMS``.

    ``tokens`` gives the app token (scope ``https://graph.microsoft.com/.default``; in static mode the
    fixed token). ``store`` keeps a small health document (``graph.health``/``teams``) with the last
    permission problem, so ``doctor`` and ``graph subscriptions`` can say what is missing without
    waiting for the next failed write. ``limiter`` (the bridge's Graph bucket) and ``retry`` (the
    bridge's policy) apply to reads, which the outbox does not wrap; writes get both from the outbox.
    ``http``: a client from ``graph_sync.client.make_http_client`` to share (not closed here).
    """

    system = System.TEAMS

    def __init__(
        self,
        graph_url: str,
        tokens: TokenProvider,
        *,
        session_id: str,
        expiration_minutes: int = 60,
        store: AdapterRecords,
        limiter: UpstreamLimiter | None = None,
        retry: RetryPolicy | None = None,
        clock: Clock = utcnow,
        timeout: float = DEFAULT_TIMEOUT,
        http: GraphHttp | None = None,
    ) -> None:
        if not 5 <= expiration_minutes <= 240:
            raise ConfigError("Graph accepts a presence expiration from 5 to 240 minutes")
        if not session_id.strip():
            raise ConfigError("setPresence needs a sessionId: the app's client id")
        self.session_id = session_id.strip()
        self.expiration = f"PT{int(expiration_minutes)}M"
        self.tokens = tokens
        self._clear_body = json.dumps({"sessionId": self.session_id}).encode()
        self.store = store
        self.limiter = limiter
        self.retry = retry or RetryPolicy(max_attempts=4)
        self.clock = clock
        self._own_http = http is None
        self._http = http or make_http_client(graph_url, timeout=timeout)
        # Unknown at start (a 403 may be on record from an earlier run): the first success clears it.
        self._health_bad: set[str] = {"read", "write"}

    async def close(self) -> None:
        if self._own_http:
            await self._http.aclose()

    # ------------------------------------------------------------------ PresenceWriter

    async def apply(self, agent: Agent, value: str) -> None:
        """One Graph call making Teams show ``value`` (``Availability/Activity``, or ``CLEAR``)."""
        if value == CLEAR:
            try:
                await self._post(_presence_path(agent, "clearPresence"), self._clear_body)
            except Exception as e:
                raise await self._failed(e, f"clearPresence for {agent.label}", WRITE_PERMISSION, "write") from None
            await self._healthy("write")
            return
        state = TeamsPresence.parse(value)
        if (state.availability, state.activity) not in SESSION_PAIRS:
            raise PermanentError(
                f"setPresence for {agent.label}: Graph does not accept {value!r} for an app session; use one of "
                + ", ".join(f"{a}/{b}" for a, b in sorted(SESSION_PAIRS))
                + " in the mapping rules"
            )
        # expirationDuration in ISO 8601, as Graph wants it (kiota wrote str(timedelta), "1:00:00").
        body = {
            "activity": state.activity,
            "availability": state.availability,
            "sessionId": self.session_id,
            "expirationDuration": self.expiration,
        }
        try:
            await self._post(_presence_path(agent, "setPresence"), json.dumps(body).encode())
        except Exception as e:
            raise await self._failed(e, f"setPresence {value} for {agent.label}", WRITE_PERMISSION, "write") from None
        await self._healthy("write")

    async def _post(self, path: str, body: bytes) -> bytes:
        return await self._http.send_json("POST", path, token=await self.tokens.token(GRAPH_SCOPE), body=body)

    # ------------------------------------------------------------------ PresenceReader

    async def read(self, agents: Sequence[Agent]) -> list[PresenceObserved]:
        """Current Teams presence of ``agents`` via ``getPresencesByUserId``, 650 ids a call, each call
        retried by the bridge's policy. Users Graph does not return are left out."""
        by_entra: dict[str, Agent] = {}
        for agent in agents:
            if agent.entra_object_id:
                by_entra.setdefault(agent.entra_object_id.strip().lower(), agent)
        ids = list(by_entra)
        out: list[PresenceObserved] = []
        for start in range(0, len(ids), MAX_IDS):
            chunk = ids[start : start + MAX_IDS]
            presences = await self.retry.run(functools.partial(self._read_batch, chunk))
            at = self.clock()
            for pid, availability, activity in presences:
                found = by_entra.get(pid.lower())
                if found is None or not availability:
                    continue
                value = f"{availability}/{activity or availability}"
                out.append(
                    PresenceObserved(found.dynamics_user_id, System.TEAMS, value, at, None, None, "reconcile", True)
                )
        return out

    async def _read_batch(self, ids: list[str]) -> list[tuple[str, str | None, str | None]]:
        what = f"getPresencesByUserId for {len(ids)} users"
        body = json.dumps({"ids": ids}).encode()
        try:
            if self.limiter is not None:
                async with self.limiter.slot():
                    raw = await self._post(READ_PATH, body)
            else:
                raw = await self._post(READ_PATH, body)
            data = json.loads(raw or b"{}")
        except Exception as e:
            raise await self._failed(e, what, READ_PERMISSION, "read") from None
        await self._healthy("read")
        out: list[tuple[str, str | None, str | None]] = []
        for p in data.get("value") or [] if isinstance(data, dict) else []:
            if isinstance(p, dict) and isinstance(p.get("id"), str):
                out.append((p["id"], p.get("availability"), p.get("activity")))
        return out

    # ------------------------------------------------------------------ health

    async def _failed(self, exc: Exception, what: str, permission: str, kind: str) -> UpstreamError:
        error = graph_error(exc, what=what, permission=permission)
        if error.status == 403:
            self._health_bad.add(kind)
            try:
                await self.store.put_doc(
                    HEALTH_KIND, f"teams.{kind}", {"ok": False, "error": error.message, "at": self.clock().isoformat()}
                )
            except Exception:  # the health note is a convenience; the typed error is what matters
                log.exception("could not record Graph health")
        return error

    async def _healthy(self, kind: str) -> None:
        if kind in self._health_bad:
            self._health_bad.discard(kind)
            try:
                await self.store.put_doc(HEALTH_KIND, f"teams.{kind}", {"ok": True, "at": self.clock().isoformat()})
            except Exception:
                log.exception("could not record Graph health")

    async def check_read(self, agent: Agent) -> TeamsReadCheck:
        """doctor's Teams check, made here with the adapter's own client: one presence read for
        ``agent`` (never a write: that would change what the person shows), and the last refused
        write, if Graph refused one since the last successful write."""
        try:
            token = await self.tokens.token(GRAPH_SCOPE)
            presence = json.loads(await self._http.send_json("GET", _presence_path(agent), token=token) or b"{}")
        except Exception as e:
            return TeamsReadCheck(
                None, graph_error(e, what=f"reading the Teams presence of {agent.label}", permission=READ_PERMISSION)
            )
        if not isinstance(presence, dict):
            presence = {}
        shown = f"{presence.get('availability')}/{presence.get('activity')}"
        write = (await self.health()).get("write") or {}
        refused = None
        if write.get("ok") is False:
            refused = WriteRefusal(str(write.get("at", "?")), str(write.get("error", "")))
        return TeamsReadCheck(shown, None, refused)

    async def health(self) -> dict[str, dict[str, object]]:
        """The last recorded permission problem per kind (``read``/``write``), if any."""
        docs = await self.store.list_docs(HEALTH_KIND)
        return {k.removeprefix("teams."): v for k, v in docs.items() if k.startswith("teams.")}
