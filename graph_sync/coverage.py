"""The plan behind presence subscriptions, free of Graph calls: which account's subscription covers
which agents (a sticky split, at most 650 ids each), what a ``sync`` did, and the status view of
``graph subscriptions``. ``graph_sync.subscriptions`` carries the plan out against Graph."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import unquote

from graph_sync.teams import MAX_IDS
from mapping.model import Agent
from mapping.ports import AgentDirectory


def presence_resource(ids: Sequence[str]) -> str:
    """``/communications/presences?$filter=id in ('a','b')``: the bulk presence resource."""
    return "/communications/presences?$filter=id in ({})".format(",".join(f"'{i}'" for i in ids))


_SINGLE = re.compile(r"^communications/presences(?:/|\(')(?P<id>[^'/()?]+)'?\)?$")
_BULK = re.compile(r"^communications/presences\?\$filter=id\s+in\s*\((?P<ids>[^)]*)\)$")


def resource_ids(resource: str | None) -> frozenset[str] | None:
    """The user ids a presence subscription's ``resource`` covers (lower case), as Graph lists it
    back: what ``presence_resource`` wrote, URL-encoded or not, or the one-user form. None when it is
    not a presence resource."""
    text = unquote((resource or "").strip()).replace("+", " ").lstrip("/").strip()
    single = _SINGLE.match(text)
    if single:
        return frozenset({single.group("id").strip().lower()})
    bulk = _BULK.match(text)
    if bulk is None:
        return None
    return frozenset(p.strip().strip("'\"").strip().lower() for p in bulk.group("ids").split(",") if p.strip())


def assign(
    wanted: Sequence[str], accounts: Sequence[str], current: dict[str, list[str]]
) -> tuple[dict[str, list[str]], list[str]]:
    """Sticky split of ``wanted`` ids over ``accounts`` (at most ``MAX_IDS`` each): ids keep the
    account that covers them now; the rest, in sorted order, fill accounts in order. Returns the plan
    (each list sorted) and the ids no account can take."""
    wanted_set = set(wanted)
    plan: dict[str, list[str]] = {}
    taken: set[str] = set()
    for account in accounts:
        keep = sorted(i for i in set(current.get(account, ())) if i in wanted_set and i not in taken)[:MAX_IDS]
        plan[account] = keep
        taken.update(keep)
    rest = sorted(i for i in wanted_set if i not in taken)
    for account in accounts:
        room = MAX_IDS - len(plan[account])
        if room > 0 and rest:
            plan[account] = sorted(plan[account] + rest[:room])
            rest = rest[room:]
    return plan, rest


@dataclass
class SyncReport:
    """What one ``sync`` did, and what it could not cover."""

    agents: int = 0
    accounts: int = 0
    covered: int = 0
    uncovered: list[str] = field(default_factory=list)
    created: int = 0
    renewed: int = 0
    recreated: int = 0
    updated: int = 0
    adopted: int = 0
    deleted: int = 0
    unchanged: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    warning: str = ""

    @property
    def subscriptions(self) -> int:
        return self.created + self.renewed + self.recreated + self.updated + self.adopted + self.unchanged

    def __str__(self) -> str:
        line = (
            f"subscriptions {self.subscriptions} (created {self.created}, renewed {self.renewed}, "
            f"recreated {self.recreated}, updated {self.updated}, adopted {self.adopted}, deleted {self.deleted}, "
            f"unchanged {self.unchanged}, failed {self.failed}); agents {self.agents}, "
            f"covered {self.covered}, polled {len(self.uncovered)}"
        )
        if self.warning:
            line += f"\n  warning: {self.warning}"
        for e in self.errors:
            line += f"\n  error: {e}"
        return line


EXPIRY_MARGIN_MINUTES = 10.0
"""A subscription expiring sooner than this is unhealthy: the upkeep loop renews well before, so
being this close means renewal is not happening."""


@dataclass(frozen=True)
class ActiveSubscription:
    account: str
    ids: int
    minutes_left: float | None


@dataclass(frozen=True)
class SubscriptionHealth:
    """What ``doctor`` judges: the live subscriptions, those delivering to another URL than this
    instance's (account: URL), those unhealthy (account: why), and how many agents are polled."""

    active: list[ActiveSubscription]
    misdirected: dict[str, str]
    problems: dict[str, str]
    polled: int


def health_of(
    rows: Sequence[dict[str, Any]], records: Mapping[str, dict[str, Any]], notification_url: str
) -> SubscriptionHealth:
    """The health view of ``status_rows`` and the subscription records."""
    accounts = [r for r in rows if r.get("account") != "(polling)"]
    active = [
        ActiveSubscription(
            str(r["account"]),
            int(r["ids"]),
            float(r["minutes_left"]) if isinstance(r.get("minutes_left"), int | float) else None,
        )
        for r in accounts
        if r.get("subscription") not in (None, "-")
    ]
    misdirected = {
        account: str(rec.get("notification_url"))
        for account, rec in records.items()
        if rec.get("subscription_id") and rec.get("notification_url") != notification_url
    }
    problems = {str(r["account"]): why for r in accounts if (why := _problem(r))}
    polled = sum(int(r["ids"]) for r in rows if r.get("account") == "(polling)")
    return SubscriptionHealth(active, misdirected, problems, polled)


def _problem(row: dict[str, Any]) -> str:
    """Why a status row is not healthy ('' when it is)."""
    health = str(row.get("health", ""))
    if health != "ok" and health != "renewing":
        return health
    left = row.get("minutes_left")
    if not isinstance(left, int | float):
        return "no expiry recorded"
    if left < EXPIRY_MARGIN_MINUTES:
        return f"expires in {left:g} min (renewal is not happening)"
    return ""


def status_rows(
    records: Mapping[str, dict[str, Any]],
    *,
    accounts: Sequence[str],
    health: Mapping[str, dict[str, Any]],
    polled: Sequence[str],
    now: datetime,
    renew_before: timedelta,
) -> list[dict[str, Any]]:
    """One row per account (in the accounts' order, then accounts gone), and one for polled agents."""
    names = list(accounts)
    rows: list[dict[str, Any]] = []
    for name in names + sorted(set(records) - set(names)):
        rec = records.get(name) or {}
        expires = parse_time(rec.get("expires_at"))
        left = (expires - now).total_seconds() / 60 if expires else None
        if name not in names:
            state = "account gone (subscription left to expire)"
        elif rec.get("error"):
            state = f"error: {rec['error']}"
        elif not rec.get("subscription_id"):
            state = "no subscription"
        elif rec.get("pending"):
            state = f"pending {rec['pending']}"
        elif left is not None and left <= 0:
            state = "expired"
        elif left is not None and left * 60 < renew_before.total_seconds():
            state = "renewing"
        else:
            state = "ok"
        account_health = health.get(name, {}).get("health", "ok")
        if account_health != "ok":
            state = f"{state}; account {account_health}"
        rows.append(
            {
                "account": name,
                "subscription": rec.get("subscription_id") or "-",
                "ids": len(rec.get("ids", [])) if rec.get("subscription_id") else 0,
                "expires": rec.get("expires_at") or "-",
                "minutes_left": round(left, 1) if left is not None else "-",
                "health": state,
            }
        )
    if polled:
        rows.append(
            {
                "account": "(polling)",
                "subscription": "-",
                "ids": len(polled),
                "expires": "-",
                "minutes_left": "-",
                "health": "not covered by a subscription: polled with getPresencesByUserId; sign in more accounts",
            }
        )
    return rows


async def agents_for(store: AgentDirectory, entra_ids: Sequence[str]) -> list[Agent]:
    """The enabled agents of ``entra_ids``: one directory query for many ids, one lookup each for few."""
    if len(entra_ids) > 50:
        by_entra = {a.entra_object_id.lower(): a for a in await store.list_agents(enabled_only=True)}
        return [by_entra[e.lower()] for e in dict.fromkeys(entra_ids) if e.lower() in by_entra]
    found = [await store.get_agent_by_entra(e) for e in dict.fromkeys(entra_ids)]
    return [a for a in found if a is not None and a.enabled]


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


GRAPH_BUDGET_SHARE = 0.5
"""The share of Graph's presence budget (1,500 requests per 30 s per tenant, reads and writes alike)
that polling may plan for; the rest stays for the outbox's writes, which an agent is waiting on."""


class PollSchedule:
    """When to read which uncovered agents, free of Graph calls. The ids are cut into chunks of
    ``MAX_IDS`` (one ``getPresencesByUserId`` each) and the chunks are spread evenly over ``period``
    seconds, so every id is read once per period and the reads are a steady trickle, not a burst of
    76 calls every period that would take the outbox's share of the shared rate limiter at once.
    ``clock`` is seconds (``time.monotonic``); tests hand in a fake one."""

    def __init__(self, period: float, clock: Callable[[], float]) -> None:
        if period <= 0:
            raise ValueError("the polling period must be positive")
        self.period = period
        self.clock = clock
        self._chunks: list[list[str]] = []
        self._due: list[float] = []
        self._ids: tuple[str, ...] = ()

    @property
    def chunks(self) -> int:
        return len(self._chunks)

    def reads_per(self, seconds: float) -> float:
        """The Graph requests this schedule makes in ``seconds``."""
        return len(self._chunks) * seconds / self.period

    def fits(self, budget: int, window: float) -> bool:
        """Whether the schedule stays inside ``GRAPH_BUDGET_SHARE`` of ``budget`` requests per ``window``."""
        return self.reads_per(window) <= budget * GRAPH_BUDGET_SHARE

    def set_ids(self, ids: Sequence[str]) -> None:
        """A new list of uncovered ids (after a ``sync``). Unchanged ids keep their slot; otherwise
        the new chunks start now, staggered over the period (new agents are read within it)."""
        ordered = tuple(sorted(dict.fromkeys(i.lower() for i in ids)))
        if ordered == self._ids:
            return
        self._ids = ordered
        self._chunks = [list(ordered[i : i + MAX_IDS]) for i in range(0, len(ordered), MAX_IDS)]
        now = self.clock()
        step = self.period / len(self._chunks) if self._chunks else 0.0
        self._due = [now + k * step for k in range(len(self._chunks))]

    def due(self) -> list[list[str]]:
        """The chunks due now; each is next due one period after its slot (not after now, so a late
        round does not push the whole schedule back)."""
        now = self.clock()
        out: list[list[str]] = []
        for k, at in enumerate(self._due):
            if at <= now:
                out.append(self._chunks[k])
                nxt = at + self.period
                self._due[k] = nxt if nxt > now else now + self.period
        return out

    def next_in(self) -> float | None:
        """Seconds until the next chunk is due (0 when one is due), None with nothing to poll."""
        if not self._due:
            return None
        return max(0.0, min(self._due) - self.clock())
