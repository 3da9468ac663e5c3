"""The console's JSON: what each view shows, built from the core's reads (no writes here).

Every string that may carry an upstream's words (an outbox row's last error, a quarantined body)
goes through ``mapping.redact`` once more on the way out: a page is a place secrets must not reach.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from console.reads import AgentPage, AgentRow
from mapping.explain import explain, presence_name, sync_view
from mapping.model import CLEAR, AgentSyncState, OutboxRow, OutboxStatus, Presence, QuarantinedItem, System
from mapping.redact import redact
from mapping.translation import Rules


def iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def outbox_json(row: OutboxRow, catalogue: Mapping[str, Presence]) -> dict[str, Any]:
    value = row.value
    shown = (
        presence_name(catalogue, value)
        if row.system is System.DYNAMICS
        else ("no session" if value == CLEAR else value)
    )
    return {
        "id": row.id,
        "agent_id": row.agent_id,
        "system": row.system.value,
        "value": shown,
        "status": row.status.value,
        "attempts": row.attempts,
        "next_attempt_at": iso(row.next_attempt_at),
        "error": redact(row.last_error) if row.last_error else None,
        "updated_at": iso(row.updated_at),
        "reason": row.reason,
    }


def _session(value: str | None) -> str:
    return "none" if value in (None, CLEAR) else str(value)


def agent_row_json(
    row: AgentRow,
    outbox: Mapping[tuple[str, System], OutboxRow],
    catalogue: Mapping[str, Presence],
    rules: Rules,
) -> dict[str, Any]:
    a = row.agent
    s = row.state
    out: dict[str, Any] = {
        "id": a.dynamics_user_id,
        "entra_id": a.entra_object_id,
        "name": a.display_name,
        "enabled": a.enabled,
        "changed_at": iso(row.changed_at),
    }
    pending = [
        r.system.value
        for system in System
        if (r := outbox.get((a.dynamics_user_id, system))) is not None
        and r.status in (OutboxStatus.PENDING, OutboxStatus.IN_FLIGHT)
    ]
    dead = [
        system.value
        for system in System
        if (r := outbox.get((a.dynamics_user_id, system))) is not None and r.status is OutboxStatus.DEAD
    ]
    if s is None:
        out.update(
            dynamics=None, dynamics_at=None, teams=None, teams_at=None, session="none", override=False,
            override_why=None, in_sync=None, sync="not seen yet", propagated_at=None, pending=pending, dead=dead,
        )  # fmt: skip
        return out
    ex = explain(s, catalogue, rules)
    view = sync_view(s, catalogue, rules)
    landed = [t for t in (s.dynamics_delivered_at, s.session_landed_at) if t is not None]
    if view.in_sync is None:
        sync = "not seen yet"
    elif view.in_sync:
        sync = "in sync"  # a dead letter left behind that a later write or the sweep made good is history
    elif pending:
        sync = "writing"
    else:
        sync = "dead letter" if dead else "out of sync"
    out.update(
        dynamics=presence_name(catalogue, s.dynamics_seen.value),
        dynamics_at=iso(s.dynamics_seen.at),
        teams=s.teams_seen.value,
        teams_at=iso(s.teams_seen.since or s.teams_seen.at),
        session=_session(s.session_delivered),
        override=ex.override,
        override_why=ex.why if ex.override else None,
        in_sync=view.in_sync,
        sync=sync,
        propagated_at=iso(max(landed)) if landed else None,
        pending=pending,
        dead=dead,
    )
    return out


def agents_json(
    page: AgentPage,
    outbox: Mapping[tuple[str, System], OutboxRow],
    catalogue: Mapping[str, Presence],
    rules: Rules,
    *,
    offset: int,
    limit: int,
) -> dict[str, Any]:
    return {
        "total": page.total,
        "offset": offset,
        "limit": limit,
        "rows": [agent_row_json(r, outbox, catalogue, rules) for r in page.rows],
    }


def timeline(
    state: AgentSyncState, outbox: Sequence[OutboxRow], catalogue: Mapping[str, Presence]
) -> list[dict[str, Any]]:
    """The recent story of one agent, newest first, from what the store keeps: the state document
    (the last Dynamics events judged, what each side showed last and since when, the last writes
    acknowledged) and the agent's outbox rows. Nothing is stored for it: it is as long as they are."""
    items: list[tuple[datetime, str, str]] = []

    def add(at: datetime | None, side: str, what: str) -> None:
        if at is not None:
            items.append((at, side, what))

    name = lambda pid: presence_name(catalogue, pid) or "?"  # noqa: E731
    for e in state.dynamics_recent:
        kind = "the bridge's own write coming back (echo)" if e.echo else "a change of its own"
        add(e.at, "dynamics", f"Dynamics showed {name(e.value)} (RowVersion {e.version}, by {e.by or '?'}): {kind}")
    if state.own_dynamics:
        add(state.own_dynamics_at, "dynamics", f"P, the agent's own presence, became {name(state.own_dynamics)} "
            f"(set by {state.own_dynamics_by or 'unknown'})")  # fmt: skip
    add(state.chose_at, "dynamics", "the agent chose a presence themselves")
    if state.dynamics_seen.value and not state.dynamics_recent:
        add(state.dynamics_seen.at, "dynamics", f"Dynamics showed {name(state.dynamics_seen.value)}")
    if state.dynamics_delivered:
        add(state.dynamics_delivered_at, "dynamics", f"the bridge wrote {name(state.dynamics_delivered)} to Dynamics "
            "(acknowledged)")  # fmt: skip
    if state.own_teams:
        add(state.own_teams_since, "teams", f"Teams began showing the person's own {state.own_teams} (Q)")
    if state.teams_seen.value:
        add(state.teams_seen.at, "teams", f"Teams reported {state.teams_seen.value}")
    if state.session_written is not None:
        add(state.session_landed_at, "teams", f"the bridge's Teams session became {_session(state.session_delivered)} "
            "(acknowledged)")  # fmt: skip
    for row in outbox:
        shown = outbox_json(row, catalogue)
        what = f"outbox: write {shown['value']} to {row.system.value}: {row.status.value}"
        if row.attempts:
            what += f" after {row.attempts} attempt(s)"
        if shown["error"] and row.status is not OutboxStatus.DELIVERED:
            what += f"; upstream said: {shown['error']}"
        add(row.updated_at, row.system.value, what)
    items.sort(key=lambda i: i[0], reverse=True)
    return [{"at": iso(at), "side": side, "what": what} for at, side, what in items]


def explanation_json(state: AgentSyncState, catalogue: Mapping[str, Presence], rules: Rules) -> dict[str, Any]:
    ex = explain(state, catalogue, rules)
    view = sync_view(state, catalogue, rules)
    return {
        "case": ex.case.value,
        "rule": ex.rule,
        "why": ex.why,
        "p": ex.p,
        "p_by": ex.p_by,
        "p_at": iso(ex.p_at),
        "chose_at": iso(ex.chose_at),
        "q": ex.q,
        "q_since": iso(ex.q_since),
        "asked": ex.asked,
        "session": ex.session,
        "dynamics": ex.dynamics,
        "override": ex.override,
        "in_sync": view.in_sync,
        "differences": list(view.differences),
        "dynamics_shows": view.dynamics_shows,
        "session_holds": _session(view.session_holds),
    }


def quarantine_json(item: QuarantinedItem, *, body: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": item.id,
        "route": item.route,
        "reason": item.reason,
        "detail": redact(item.detail),
        "received_at": iso(item.received_at),
        "size": item.size,
    }
    if body:
        out["body"] = redact(item.body[: 64 * 1024].decode("utf-8", "replace"))
    return out


def metric_figures(text: str) -> list[dict[str, Any]]:
    """The samples behind ``/metrics``, one row per series (histogram buckets left out: the count and
    sum say enough on a page)."""
    rows: list[dict[str, Any]] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_bucket") or sample.name.endswith("_created"):
                continue
            labels = ", ".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            rows.append({"name": sample.name, "labels": labels, "value": sample.value, "help": family.documentation})
    return rows
