"""What each system shows right now, for a reply: read back live, or, when the read fails, taken from
what the core last observed or had acknowledged (and the reply says which)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from bot.wording import SYSTEM_NAMES, value_label
from mapping.api import CoreApi
from mapping.errors import UpstreamError
from mapping.model import CLEAR, Agent, System
from mapping.ports import PresenceReader

log = logging.getLogger("presence_sync.bot")

READ_SECONDS = 2.0
"""Budget for reading one system back for a reply (a failed read falls back to stored observations)."""


@dataclass(frozen=True)
class Seen:
    """What one system shows for the agent: read live, or from the bridge's last observation."""

    system: System
    value: str | None
    live: bool
    at: datetime | None = None
    problem: str | None = None
    how: str = "read"
    """``read`` (live), ``observed`` (the bridge's last observation) or ``accepted`` (the bridge's last
    write that the system acknowledged)."""


# ---------------------------------------------------------------------------------------------- reading


async def read_side(
    bridge: CoreApi,
    readers: Mapping[System, PresenceReader],
    agent: Agent,
    system: System,
    *,
    timeout: float = READ_SECONDS,
) -> Seen:
    """What ``system`` shows now. A failing or missing reader falls back to the bridge's stored
    observation, with the reason, so that the reply can say it is not a live read."""
    reader = readers.get(system)
    problem: str
    if reader is None:
        problem = f"{SYSTEM_NAMES[system]} is not connected to this bridge"
    else:
        try:
            seen = await asyncio.wait_for(reader.read([agent]), timeout)
        except UpstreamError as e:
            problem = e.message
        except TimeoutError:
            problem = f"{SYSTEM_NAMES[system]} did not answer within {timeout:g} s"
        except Exception as e:  # a reader bug must not cost the agent the reply
            log.exception("presence read failed", extra={"fields": {"agent": agent.dynamics_user_id}})
            problem = f"{type(e).__name__}: {e}"
        else:
            mine = [o for o in seen if o.agent_id == agent.dynamics_user_id]
            if mine:
                return Seen(system, mine[-1].value, True, mine[-1].observed_at)
            problem = f"{SYSTEM_NAMES[system]} did not return this agent"
    # Fallback: the newest of what the bridge last observed there and what the system last
    # acknowledged from the bridge (right after a change, that is newer than any observation).
    state = await bridge.last_known(agent.dynamics_user_id)
    if state is None:
        return Seen(system, None, False, None, problem)
    last = state.dynamics_seen if system is System.DYNAMICS else state.teams_seen
    candidates = [(last.at, last.value, "observed")]
    if system is System.DYNAMICS:
        candidates.append((state.dynamics_delivered_at, state.dynamics_delivered, "accepted"))
    elif state.session_delivered not in (None, CLEAR):
        candidates.append((state.session_landed_at, state.session_delivered, "accepted"))
    best = Seen(system, None, False, None, problem)
    for at, value, how in candidates:
        if at is not None and value is not None and (best.at is None or at > best.at):
            best = Seen(system, value, False, at, problem, how)
    return best


async def read_both(bridge: CoreApi, readers: Mapping[System, PresenceReader], agent: Agent) -> dict[System, Seen]:
    d, t = await asyncio.gather(
        read_side(bridge, readers, agent, System.DYNAMICS), read_side(bridge, readers, agent, System.TEAMS)
    )
    return {System.DYNAMICS: d, System.TEAMS: t}


def seen_line(bridge: CoreApi, seen: Seen) -> str:
    label = value_label(bridge, seen.system, seen.value)
    if seen.live:
        return f"{SYSTEM_NAMES[seen.system]} shows **{label}**."
    name = SYSTEM_NAMES[seen.system]
    when = f" at {seen.at:%H:%M} UTC" if seen.at else ""
    if seen.value is None:
        return f"{name}: unknown right now (could not read it: {seen.problem})."
    if seen.how == "accepted":
        return f"{name} accepted **{label}**{when} (could not read it back just now: {seen.problem})."
    return f"{name} showed **{label}** when the bridge last saw it{when} (could not read it just now: {seen.problem})."
