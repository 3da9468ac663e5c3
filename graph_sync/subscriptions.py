"""Presence subscriptions: cover every enabled agent with Graph change notifications, within Graph's
rules (upstream-apis.md): a delegated token per subscription, **one** presence subscription per
account per app, at most **650** ids each, at most **60 minutes** of life.

So the directory is cut into chunks of at most 650 Entra ids, one chunk per subscriber account
(accounts in name order). Assignment is sticky: an id stays in the subscription that already covers
it, newcomers fill the first account with room; one new agent therefore changes one subscription, not
every chunk after it. Agents beyond ``accounts x 650`` are reported and *polled* with
``getPresencesByUserId`` instead, so nobody silently goes unwatched: the upkeep loop reads them on a
``coverage.PollSchedule`` (650 a call, spread over ``poll_interval``, through the Graph rate limiter
the outbox's writes share) and observes what changed since the last read, as a subscription would
notify; ``poll_uncovered`` reads and observes all of them at once.

A subscription's ``resource`` cannot be changed, and an account can hold only one, so a changed chunk
is a DELETE then a POST. Renewal is a PATCH of ``expirationDateTime`` when fewer than
``renew_before`` minutes are left (new expiry ``lifetime`` ahead); a 404 means Graph dropped it, and
it is created again. Lifecycle events (``graph_sync.notifications``) are first noted durably on the
subscription's record (``record_lifecycle``) and then acted on (``on_lifecycle``); a note left by a
crash is acted on by the next ``sync``.

Creation waits ``SUBSCRIPTION_CREATE_TIMEOUT`` (Graph validates both URLs before it answers) and
never duplicates: the account's subscriptions are listed first and one that is exactly what we would
create is *adopted* (a creation whose answer was lost, a record lost with a crash); at start-up each
account's unknown subscriptions for our notification URL are adopted or deleted (``_discover``).

State: docs kind ``graph.subscription`` keyed by account; the uncovered ids in ``graph.coverage``.
Only the leader (``store.try_lead("graph.subscriptions")``) runs the upkeep loop.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from kiota_abstractions.api_error import APIError
from msgraph import GraphServiceClient
from msgraph.generated.models.subscription import Subscription

from graph_sync.accounts import SubscriberAccounts
from graph_sync.client import (
    DEFAULT_TIMEOUT,
    SUBSCRIPTION_CREATE_TIMEOUT,
    graph_error,
    make_graph_client,
    make_http_client,
)
from graph_sync.coverage import (
    PollSchedule,
    SubscriptionHealth,
    SyncReport,
    agents_for,
    assign,
    health_of,
    parse_time,
    presence_resource,
    resource_ids,
    status_rows,
)
from graph_sync.teams import MAX_IDS, TeamsPresenceClient
from mapping.api import CoreApi
from mapping.errors import ConfigError, UpstreamError
from mapping.model import Agent, System
from mapping.ports import PresenceReader
from mapping.ratelimit import GRAPH_PRESENCE

log = logging.getLogger("presence_sync.graph")

KIND = "graph.subscription"
COVERAGE_KIND = "graph.coverage"
LEADERSHIP = "graph.subscriptions"
SUBSCRIBE_PERMISSION = "delegated Presence.Read.All consented for the subscriber account"
LIFECYCLE_EVENTS = ("reauthorizationRequired", "subscriptionRemoved", "missed")


class _AnyAccountTokens:
    """Reads for polling go out as the first subscriber account that has a token: delegated
    ``Presence.Read.All`` may read every user's presence, and it keeps the app's own write budget
    out of the polling path."""

    def __init__(self, accounts: SubscriberAccounts) -> None:
        self.accounts = accounts

    async def token(self, scope: str) -> str:
        last: UpstreamError | None = None
        for info in await self.accounts.accounts():
            try:
                return await self.accounts.tokens(info.name).token(scope)
            except UpstreamError as e:
                last = e
        if last is not None:
            raise last
        raise ConfigError("no subscriber account to read presence with: run `presence-sync graph login`")


class SubscriptionManager:
    def __init__(
        self,
        bridge: CoreApi,
        graph_url: str,
        accounts: SubscriberAccounts,
        *,
        notification_url: str,
        lifecycle_url: str,
        client_state: str,
        encryption_cert_pem: bytes | None,
        encryption_cert_id: str | None,
        owner: str,
        reader: PresenceReader | None = None,
        renew_before: timedelta = timedelta(minutes=15),
        lifetime: timedelta = timedelta(minutes=55),
        poll_interval: float | None = None,
        poll_clock: Callable[[], float] = time.monotonic,
        timeout: float = DEFAULT_TIMEOUT,
        create_timeout: float = SUBSCRIPTION_CREATE_TIMEOUT,
    ) -> None:
        if not client_state:
            raise ConfigError(
                "Graph subscriptions need PRESENCE_SYNC_GRAPH_CLIENT_STATE (a secret Graph echoes "
                "in every notification)"
            )
        if len(client_state) > 128:
            raise ConfigError("PRESENCE_SYNC_GRAPH_CLIENT_STATE must be at most 128 characters (Graph's limit)")
        if lifetime > timedelta(minutes=60) or renew_before >= lifetime:
            raise ConfigError("subscription lifetime must be at most 60 minutes and longer than renew_before")
        self.bridge = bridge
        self.records = bridge.records
        self.directory = bridge.directory
        self.graph_url = graph_url
        self.accounts = accounts
        self.notification_url = notification_url
        self.lifecycle_url = lifecycle_url
        self.client_state = client_state
        self.owner = owner
        self.renew_before = renew_before
        self.lifetime = lifetime
        self.poll_interval = poll_interval
        self.certificate_b64: str | None = None
        self.certificate_id: str | None = None
        if encryption_cert_pem is not None:
            try:
                cert = x509.load_pem_x509_certificate(encryption_cert_pem)
            except ValueError as e:
                raise ConfigError(f"Graph encryption certificate is not a PEM certificate: {e}") from None
            self.certificate_b64 = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
            self.certificate_id = encryption_cert_id or cert.fingerprint(hashes.SHA1()).hex().upper()
        self._http = make_http_client(graph_url, timeout=timeout)
        # Creation waits for Graph's two URL validations; every other call keeps ``timeout``.
        self._create_http = make_http_client(graph_url, timeout=create_timeout)
        self._clients: dict[str, GraphServiceClient] = {}
        self._create_clients: dict[str, GraphServiceClient] = {}
        self._discovered: set[str] = set()  # accounts listed at start-up (see ``_discover``)
        self.reader: PresenceReader = reader or TeamsPresenceClient(
            graph_url,
            _AnyAccountTokens(accounts),
            session_id="presence-sync-poll",
            store=bridge.records,
            limiter=bridge.limiters.get(System.TEAMS),
            retry=bridge.retry,
            clock=bridge.clock,
            http=self._http,
        )
        self._lock = asyncio.Lock()
        self._uncovered: list[str] | None = None
        self.schedule = PollSchedule(poll_interval or 30.0, poll_clock)
        """Each uncovered agent read once per ``poll_interval`` (default 30 s: within the minute)."""
        self._by_entra: dict[str, Agent] | None = None  # the enabled agents, as of the last sync
        self._resync = asyncio.Event()

    def directory_changed(self) -> None:
        """Asks the upkeep loop for a ``sync`` now instead of at its next round: an agent added by a
        Dataverse Create is then covered in a second or two, not up to a minute later. (Changes made
        by another process, `agents discover` or `agents import`, are picked up by the next round.)"""
        self._resync.set()

    @property
    def rich(self) -> bool:
        return self.certificate_b64 is not None

    async def close(self) -> None:
        await self._http.aclose()
        await self._create_http.aclose()

    def _client(self, account: str) -> GraphServiceClient:
        client = self._clients.get(account)
        if client is None:
            client = self._clients[account] = make_graph_client(
                self._http, self.graph_url, self.accounts.tokens(account)
            )
        return client

    def _create_client(self, account: str) -> GraphServiceClient:
        client = self._create_clients.get(account)
        if client is None:
            client = self._create_clients[account] = make_graph_client(
                self._create_http, self.graph_url, self.accounts.tokens(account)
            )
        return client

    # ------------------------------------------------------------------ the plan

    async def sync(self) -> SyncReport:
        """Brings Graph's subscriptions in line with the directory and the accounts (see module doc)."""
        async with self._lock:
            return await self._sync()

    async def _sync(self) -> SyncReport:
        agents = await self.directory.list_agents(enabled_only=True)
        self._by_entra = {a.entra_object_id.strip().lower(): a for a in agents if a.entra_object_id.strip()}
        wanted = sorted({a.entra_object_id.strip().lower() for a in agents if a.entra_object_id.strip()})
        accounts = [a.name for a in await self.accounts.accounts()]
        records = await self.records.list_docs(KIND)
        unknown = await self._discover([a for a in accounts if a not in self._discovered], records)
        current = {
            name: list(r.get("ids", [])) for name, r in records.items() if name in accounts and r.get("subscription_id")
        }
        for account, subs in unknown.items():
            if account not in current:  # keep what the unknown one covers there: it can then be adopted
                current[account] = sorted(resource_ids(subs[0].resource) or ())
        plan, uncovered = assign(wanted, accounts, current)
        report = SyncReport(agents=len(wanted), accounts=len(accounts))
        for account, subs in unknown.items():
            if not plan.get(account) or records.get(account, {}).get("subscription_id"):
                for sub in subs:  # it covers nothing we need (or the account has its own already)
                    await self._drop_unknown(account, sub)
        for account in accounts:
            target = plan.get(account, [])
            try:
                outcome = await self._converge(account, target, records.get(account))
            except UpstreamError as e:
                report.failed += 1
                report.errors.append(f"{account}: {e.message}")
                uncovered.extend(target)
                await self._note_error(account, target, records.get(account), e.message)
                log.warning(
                    "subscription upkeep failed",
                    extra={"fields": {"account": account, "ids": len(target), "error": e.message}},
                )
                continue
            if outcome:
                setattr(report, outcome, getattr(report, outcome) + 1)
        for name, rec in records.items():  # accounts signed out or removed from the static list
            if name not in accounts:
                await self._forget(name, rec)
                report.deleted += 1
        uncovered = sorted(set(uncovered))
        report.uncovered = uncovered
        report.covered = len(wanted) - len(uncovered)
        capacity = len(accounts) * MAX_IDS
        if len(wanted) > capacity:
            report.warning = (
                f"{len(wanted)} agents but {len(accounts)} subscriber account(s) cover at most {capacity} "
                f"({MAX_IDS} each, one subscription per account): {len(wanted) - capacity} agents are polled with "
                f"getPresencesByUserId instead; sign in {-(-(len(wanted) - capacity) // MAX_IDS)} more account(s) "
                "with `presence-sync graph login`"
            )
            log.warning(
                "agents exceed subscription capacity",
                extra={"fields": {"agents": len(wanted), "accounts": len(accounts), "polled": len(uncovered)}},
            )
        self._uncovered = uncovered
        self.schedule.set_ids(uncovered)
        if not self.schedule.fits(GRAPH_PRESENCE.requests, GRAPH_PRESENCE.period_seconds):
            log.warning(
                "polling uncovered agents takes more than its share of the Graph budget",
                extra={
                    "fields": {
                        "polled": len(uncovered),
                        "reads_per_30s": round(self.schedule.reads_per(GRAPH_PRESENCE.period_seconds), 1),
                        "budget_per_30s": GRAPH_PRESENCE.requests,
                    }
                },
            )
        await self.records.put_doc(
            COVERAGE_KIND, "uncovered", {"ids": uncovered, "at": self.bridge.clock().isoformat()}
        )
        return report

    async def _converge(self, account: str, target: list[str], rec: dict[str, Any] | None) -> str | None:
        """One account's subscription to ``target``; returns the report field to count it under."""
        now = self.bridge.clock()
        sub_id = rec.get("subscription_id") if rec else None
        if not target:
            if rec is not None:
                await self._forget(account, rec)
                return "deleted" if sub_id else None
            return None
        if not sub_id or rec is None:
            return await self._create(account, target)
        config_changed = (
            rec.get("notification_url") != self.notification_url
            or rec.get("lifecycle_url") != self.lifecycle_url
            or rec.get("certificate_id") != self.certificate_id
        )
        if sorted(rec.get("ids", [])) != target or config_changed:
            await self._delete(account, sub_id)
            return _as(await self._create(account, target), "updated")
        pending = rec.get("pending")
        if pending == "subscriptionRemoved":
            await self._delete(account, sub_id)
            return _as(await self._create(account, target), "recreated")
        expires = parse_time(rec.get("expires_at"))
        if pending == "reauthorizationRequired" or expires is None or expires - now < self.renew_before:
            if expires is not None and expires <= now:
                return _as(await self._create(account, target), "recreated")
            return await self._renew(account, target, rec)
        if rec.get("error"):  # an earlier failed attempt; the subscription itself is fine
            await self.records.put_doc(KIND, account, {**rec, "error": None})
        return "unchanged"

    async def _renew(self, account: str, target: list[str], rec: dict[str, Any]) -> str:
        sub_id = str(rec["subscription_id"])
        expires = self.bridge.clock() + self.lifetime
        try:
            result = (
                await self._client(account)
                .subscriptions.by_subscription_id(sub_id)
                .patch(Subscription(expiration_date_time=expires))
            )
        except APIError as e:
            if e.response_status_code == 404:
                log.info(
                    "subscription gone; creating it again",
                    extra={"fields": {"account": account, "subscription": sub_id}},
                )
                return _as(await self._create(account, target), "recreated")
            raise graph_error(
                e, what=f"renewing subscription {sub_id} of {account}", permission=SUBSCRIBE_PERMISSION
            ) from None
        except Exception as e:
            raise graph_error(
                e, what=f"renewing subscription {sub_id} of {account}", permission=SUBSCRIBE_PERMISSION
            ) from None
        rec = dict(rec)
        rec.update(
            expires_at=_iso(result.expiration_date_time if result and result.expiration_date_time else expires),
            renewed_at=self.bridge.clock().isoformat(),
            pending=None,
            error=None,
        )
        await self.records.put_doc(KIND, account, rec)
        return "renewed"

    def _body(self, target: list[str]) -> Subscription:
        body = Subscription(
            change_type="updated",
            notification_url=self.notification_url,
            lifecycle_notification_url=self.lifecycle_url,
            resource=presence_resource(target),
            expiration_date_time=self.bridge.clock() + self.lifetime,
            client_state=self.client_state,
            include_resource_data=self.rich,
            latest_supported_tls_version="v1_2",
        )
        if self.rich:
            body.encryption_certificate = self.certificate_b64
            body.encryption_certificate_id = self.certificate_id
        return body

    async def _create(self, account: str, target: list[str]) -> str:
        """Creates ``account``'s subscription for ``target``, unless Graph already holds it: a creation
        whose answer was lost (a timeout, a reset connection, a 5xx after Graph had made it) or a crash
        before the record was written left one the bridge never heard of, and a second would be
        refused (one per account) or, were it accepted, deliver every change twice. So the account's
        subscriptions are listed first and a match is adopted; one of ours that does not match is
        deleted. Returns ``created`` or ``adopted``."""
        what = f"creating the presence subscription of {account} ({len(target)} users)"
        listing = await self._list(account)
        found = self._matching(listing, target)
        if found is not None:
            await self._adopt(account, target, found)
            return "adopted"
        for sub in listing:
            if sub.id and _is_presence(sub) and sub.notification_url == self.notification_url:
                await self._delete(account, sub.id)
        client = self._create_client(account)
        try:
            try:
                result = await client.subscriptions.post(self._body(target))
            except APIError as e:
                if e.response_status_code != 409:
                    raise
                # The account already holds one: our own lost creation that Graph finished meanwhile
                # (adopted), or one made by a previous configuration, which ours replaces (Graph allows
                # one per account and app).
                found = self._matching(await self._list(account), target)
                if found is not None:
                    await self._adopt(account, target, found)
                    return "adopted"
                await self._clear_account(account)
                result = await client.subscriptions.post(self._body(target))
        except UpstreamError:
            raise
        except Exception as e:
            raise graph_error(e, what=what, permission=SUBSCRIBE_PERMISSION) from None
        if result is None or not result.id:
            raise graph_error(RuntimeError("Graph returned no subscription id"), what=what)
        await self._record(account, target, result)
        log.info(
            "subscription created",
            extra={"fields": {"account": account, "subscription": result.id, "ids": len(target), "rich": self.rich}},
        )
        return "created"

    async def _record(self, account: str, target: list[str], sub: Subscription, **extra: Any) -> None:
        now = self.bridge.clock()
        await self.records.put_doc(
            KIND,
            account,
            {
                "account": account,
                "subscription_id": sub.id,
                "ids": target,
                "expires_at": _iso(sub.expiration_date_time or now + self.lifetime),
                "created_at": now.isoformat(),
                "renewed_at": None,
                "notification_url": self.notification_url,
                "lifecycle_url": self.lifecycle_url,
                "certificate_id": self.certificate_id,
                "rich": self.rich,
                "pending": None,
                "error": None,
                **extra,
            },
        )

    async def _adopt(self, account: str, target: list[str], sub: Subscription) -> None:
        """Records a subscription Graph holds as if this instance had just created it."""
        await self._record(account, target, sub, adopted_at=self.bridge.clock().isoformat())
        log.info(
            "subscription adopted",
            extra={
                "fields": {
                    "account": account,
                    "subscription": sub.id,
                    "ids": len(target),
                    "expires_at": _iso(sub.expiration_date_time) if sub.expiration_date_time else None,
                }
            },
        )

    def _matching(self, listing: Sequence[Subscription], target: Sequence[str]) -> Subscription | None:
        """The listed subscription that is exactly what ``_body(target)`` asks for. ``clientState`` is
        not compared: Graph does not return it when listing."""
        want = frozenset(i.lower() for i in target)
        for sub in listing:
            if (
                sub.id
                and resource_ids(sub.resource) == want
                and (sub.change_type or "").lower() == "updated"
                and sub.notification_url == self.notification_url
                and (sub.lifecycle_notification_url or None) == (self.lifecycle_url or None)
                and bool(sub.include_resource_data) == self.rich
                and (not self.rich or sub.encryption_certificate_id == self.certificate_id)
            ):
                return sub
        return None

    async def _list(self, account: str) -> list[Subscription]:
        """The subscriptions this app holds for ``account`` (with a delegated token Graph lists only
        the signed-in user's, made by this app), every page of ``@odata.nextLink``."""
        builder = self._client(account).subscriptions
        out: list[Subscription] = []
        try:
            page = await builder.get()
            while page is not None:
                out.extend(page.value or [])
                if not page.odata_next_link:
                    break
                page = await builder.with_url(page.odata_next_link).get()
        except Exception as e:
            raise graph_error(
                e, what=f"listing the subscriptions of {account}", permission=SUBSCRIBE_PERMISSION
            ) from None
        return out

    async def _discover(
        self, accounts: Sequence[str], records: dict[str, dict[str, Any]]
    ) -> dict[str, list[Subscription]]:
        """Start-up: each account's presence subscriptions for our notification URL that the store
        does not know (a creation whose answer was lost, a record lost with the database). Where one
        stands and the record's own is not listed, the record is stale and is dropped here, so the
        plan keeps the unknown one's users on that account and ``_create`` adopts it. Accounts that
        cannot be listed now are tried again at the next ``sync``."""
        unknown: dict[str, list[Subscription]] = {}
        for account in accounts:
            try:
                listing = await self._list(account)
            except (UpstreamError, ConfigError) as e:
                log.info(
                    "could not list subscriptions at start-up",
                    extra={"fields": {"account": account, "error": str(e)}},
                )
                continue
            self._discovered.add(account)
            rec = records.get(account)
            known = rec.get("subscription_id") if rec else None
            ours = [
                sub
                for sub in listing
                if sub.id and _is_presence(sub) and sub.notification_url == self.notification_url and sub.id != known
            ]
            if not ours:
                continue
            unknown[account] = ours
            if rec is not None and known and known not in {sub.id for sub in listing}:
                records[account] = {**rec, "subscription_id": None}
        return unknown

    async def _drop_unknown(self, account: str, sub: Subscription) -> None:
        assert sub.id is not None
        try:
            await self._delete(account, sub.id)
        except UpstreamError as e:
            log.info(
                "could not delete an unknown subscription",
                extra={"fields": {"account": account, "subscription": sub.id, "error": e.message}},
            )
            return
        log.info(
            "unknown subscription deleted",
            extra={"fields": {"account": account, "subscription": sub.id, "why": "covers nothing this bridge needs"}},
        )

    async def _clear_account(self, account: str) -> None:
        for sub in await self._list(account):
            if sub.id and _is_presence(sub):
                await self._delete(account, sub.id)

    async def _delete(self, account: str, sub_id: str) -> None:
        try:
            await self._client(account).subscriptions.by_subscription_id(sub_id).delete()
        except APIError as e:
            if e.response_status_code == 404:
                return
            raise graph_error(
                e, what=f"deleting subscription {sub_id} of {account}", permission=SUBSCRIBE_PERMISSION
            ) from None
        except Exception as e:
            raise graph_error(e, what=f"deleting subscription {sub_id} of {account}") from None

    async def _forget(self, account: str, rec: dict[str, Any]) -> None:
        sub_id = rec.get("subscription_id")
        if sub_id:
            try:
                await self._delete(account, str(sub_id))
            except (UpstreamError, ConfigError) as e:  # no token any more: Graph expires it within the hour
                log.info(
                    "could not delete subscription of a departed account",
                    extra={"fields": {"account": account, "subscription": sub_id, "error": str(e)}},
                )
        await self.records.delete_doc(KIND, account)

    async def _note_error(self, account: str, target: list[str], rec: dict[str, Any] | None, error: str) -> None:
        doc = dict(rec or {"account": account, "subscription_id": None, "ids": target})
        doc["error"] = error
        doc["error_at"] = self.bridge.clock().isoformat()
        await self.records.put_doc(KIND, account, doc)

    # ------------------------------------------------------------------ lifecycle

    async def find(self, subscription_id: str) -> tuple[str, dict[str, Any]] | None:
        """The (account, record) holding ``subscription_id``, if it is one of ours."""
        for account, rec in (await self.records.list_docs(KIND)).items():
            if rec.get("subscription_id") == subscription_id:
                return account, rec
        return None

    async def ids_of(self, subscription_id: str) -> list[str]:
        found = await self.find(subscription_id)
        return list(found[1].get("ids", [])) if found else []

    async def record_lifecycle(self, event: str, subscription_id: str) -> bool:
        """Durably notes a lifecycle event on the subscription's record (before the route answers), so
        a crash before ``on_lifecycle`` finishes is repaired by the next ``sync``. False if unknown."""
        if event not in ("reauthorizationRequired", "subscriptionRemoved"):
            return (await self.find(subscription_id)) is not None
        found = await self.find(subscription_id)
        if found is None:
            return False
        account, rec = found
        if rec.get("pending") != "subscriptionRemoved":  # removal is the stronger need
            rec["pending"] = event
        await self.records.put_doc(KIND, account, rec)
        return True

    async def on_lifecycle(self, event: str, subscription_id: str) -> str:
        """Acts on a lifecycle event: ``reauthorizationRequired`` renews (a PATCH reauthorizes),
        ``subscriptionRemoved`` creates the subscription again, ``missed`` reads the covered users and
        feeds what Teams shows now to the engine. Returns what was done, for logs and tests.

        Only the leader changes subscriptions; elsewhere the durable note waits for the leader's sync."""
        if event not in LIFECYCLE_EVENTS:
            return f"ignored unknown lifecycle event {event!r}"
        found = await self.find(subscription_id)
        if found is None:
            log.info(
                "lifecycle event for an unknown subscription",
                extra={"fields": {"event": event, "subscription": subscription_id}},
            )
            return "unknown subscription"
        account, rec = found
        if event == "missed":
            n = await self.observe_ids(list(rec.get("ids", [])), intake="graph_missed")
            return f"reconciled {n}"
        if not await self.records.try_lead(LEADERSHIP, self.owner):
            return "noted for the leader"
        await self.record_lifecycle(event, subscription_id)
        async with self._lock:
            fresh = await self.records.get_doc(KIND, account)
            if fresh is None or fresh.get("subscription_id") != subscription_id:
                return "already replaced"
            try:
                outcome = await self._converge(account, sorted(fresh.get("ids", [])), fresh)
            except UpstreamError as e:
                await self._note_error(account, list(fresh.get("ids", [])), fresh, e.message)
                log.warning(
                    "lifecycle action failed",
                    extra={"fields": {"account": account, "event": event, "error": e.message}},
                )
                return f"failed: {e.message}"
        return outcome or "nothing to do"

    # ------------------------------------------------------------------ polling fallback

    async def uncovered(self) -> list[str]:
        if self._uncovered is None:
            doc = await self.records.get_doc(COVERAGE_KIND, "uncovered")
            self._uncovered = list(doc.get("ids", [])) if doc else []
        return list(self._uncovered)

    async def poll_uncovered(self) -> int:
        """Reads the agents no subscription covers and feeds their Teams presence to the engine.
        Returns how many observations were made."""
        ids = await self.uncovered()
        if not ids:
            return 0
        return await self.observe_ids(ids, intake="graph_poll")

    async def poll_due(self) -> int:
        """Reads the chunks of uncovered agents the schedule says are due, and observes the agents
        whose Teams presence is not what the bridge last saw of it (``teams_seen``; one state query
        per chunk). The others are what a subscription would not notify either (the sweep, rule 8,
        observes everything); at 49,350 polled agents they would be 49,350 transactions a period.
        Returns how many observations were made."""
        self.schedule.set_ids(await self.uncovered())
        made = 0
        for chunk in self.schedule.due():
            agents = await self._agents_of(chunk)
            if not agents:
                continue
            observed = await self.reader.read(agents)
            known = await self.bridge.teams_seen_many([o.agent_id for o in observed])
            fresh = [o for o in observed if known.get(o.agent_id) != o.value]
            if fresh:
                await self.bridge.observe_many(fresh, intake="graph_poll")
            made += len(fresh)
        return made

    async def _agents_of(self, entra_ids: Sequence[str]) -> list[Agent]:
        """The enabled agents of ``entra_ids`` from the last sync's directory listing (one listing
        per sync, not one of 50,000 rows per 650-id chunk), else from the directory."""
        if self._by_entra is None:
            return await agents_for(self.directory, entra_ids)
        return [a for e in entra_ids if (a := self._by_entra.get(e.lower())) is not None]

    async def observe_ids(self, entra_ids: Sequence[str], *, intake: str) -> int:
        """Reads ``entra_ids`` (batched by the reader) and observes what Teams shows for each."""
        agents = await agents_for(self.directory, entra_ids)
        if not agents:
            return 0
        observed = await self.reader.read(agents)
        await self.bridge.observe_many(observed, intake=intake)
        return len(observed)

    # ------------------------------------------------------------------ background

    async def run(self, stop: asyncio.Event, interval: float = 60.0) -> None:
        """Upkeep while ``stop`` is not set: ``sync`` every ``interval`` s (and at once after
        ``directory_changed``) and the uncovered agents' reads as ``schedule`` has them due (each
        agent once per ``poll_interval``, default 30 s), only while this instance holds the
        ``graph.subscriptions`` leadership."""
        next_sync = 0.0
        while not stop.is_set():
            leading = False
            try:
                if await self.records.try_lead(LEADERSHIP, self.owner):
                    leading = True
                    if time.monotonic() >= next_sync:
                        report = await self.sync()
                        next_sync = time.monotonic() + interval
                        if report.failed or report.warning:
                            log.warning("subscriptions", extra={"fields": {"report": str(report)}})
                    await self.poll_due()
            except Exception:  # keep the upkeep alive: the next round tries again
                log.exception("subscription upkeep round failed")
            if not self._resync.is_set():
                # Not leading: look again in a while (the leader may die); leading: wake for the next
                # sync or the next chunk due, whichever comes first.
                wait = min(interval, self.schedule.period)
                if leading:
                    wait = min(wait, max(0.0, next_sync - time.monotonic()))
                    due = self.schedule.next_in()
                    wait = min(wait, due) if due is not None else wait
                waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._resync.wait())]
                await asyncio.wait(waits, timeout=max(wait, 0.05), return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
            if self._resync.is_set():
                self._resync.clear()
                next_sync = 0.0

    async def health(self) -> SubscriptionHealth:
        """doctor's subscription check, from this adapter's own records."""
        records = await self.records.list_docs(KIND)
        return health_of(await self._rows(records), records, self.notification_url)

    async def status(self) -> list[dict[str, Any]]:
        """One row per account (and one for polled agents) for ``graph subscriptions``."""
        return await self._rows(await self.records.list_docs(KIND))

    async def _rows(self, records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        return status_rows(
            records,
            accounts=[a.name for a in await self.accounts.accounts()],
            health={row["account"]: row for row in await self.accounts.describe()},
            polled=await self.uncovered(),
            now=self.bridge.clock(),
            renew_before=self.renew_before,
        )


def _iso(value: datetime) -> str:
    return value.isoformat()


def _is_presence(sub: Subscription) -> bool:
    return (sub.resource or "").lstrip("/").lower().startswith("communications/presences")


def _as(outcome: str, label: str) -> str:
    """``label`` for a subscription made anew; ``adopted`` stays ``adopted``, so reports show it."""
    return outcome if outcome == "adopted" else label
