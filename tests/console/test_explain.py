"""``mapping.explain`` against the cases of rule 2 (``docs/rules.md``, "The two outputs"): each case
names its rule, and the outputs it reports are ``mapping.outputs``'s own."""

from __future__ import annotations

from datetime import timedelta

import pytest

from mapping.catalogue import Catalogue
from mapping.explain import Case, explain, sync_view
from mapping.model import AgentSyncState
from mapping.outputs import inputs_of, outputs
from mapping.translation import Rules
from tests.support import AVAILABLE, AWAY, BUSY, DND, OFFLINE, PRESENCES, T0

CAT = Catalogue(PRESENCES)
RULES = Rules()
LATER = T0 + timedelta(minutes=5)


def state(p: str | None, q: str | None, *, chose_at=None, q_since=T0, by="SYSTEM") -> AgentSyncState:
    s = AgentSyncState("a1", own_dynamics=p, own_dynamics_by=by, own_dynamics_at=T0, chose_at=chose_at)
    s.own_teams, s.own_teams_since = q, q_since if q else None
    return s


CASES = [
    # P, Q, chose_at, expected case, what Dynamics should show (name), override
    (None, "Busy/InAMeeting", None, Case.P_UNKNOWN, None, False),
    (AVAILABLE, "Available/Available", None, Case.Q_ASKS_NOTHING, "Available", False),
    (AVAILABLE, "Busy/Busy", None, Case.Q_ASKS_NOTHING, "Available", False),
    (OFFLINE, "Busy/InAMeeting", None, Case.P_OFFLINE, "Offline", False),
    (DND, "Busy/InACall", None, Case.P_KEEPS_AWAY_ALREADY, "Busy - DND", False),
    (BUSY, "Away/Away", None, Case.P_KEEPS_AWAY_ALREADY, "Busy", False),
    (AVAILABLE, "Busy/InAMeeting", LATER, Case.AGENT_CHOSE_SINCE, "Available", False),
    (AVAILABLE, "Busy/InAMeeting", T0 - timedelta(minutes=1), Case.TEAMS_OVERRIDES, "Busy", True),
    (AVAILABLE, "DoNotDisturb/Presenting", None, Case.TEAMS_OVERRIDES, "Busy - DND", True),
    (AWAY, "Busy/InACall", None, Case.TEAMS_OVERRIDES, "Busy", True),
    (AVAILABLE, "BeRightBack/BeRightBack", None, Case.TEAMS_OVERRIDES, "Away", True),
]


@pytest.mark.parametrize(("p", "q", "chose_at", "case", "dynamics", "override"), CASES)
def test_explanation_names_the_case_of_rule_2_and_reports_its_outputs(p, q, chose_at, case, dynamics, override):
    s = state(p, q, chose_at=chose_at)
    ex = explain(s, CAT, RULES)
    out = outputs(inputs_of(p, chose_at, q, s.own_teams_since, CAT), RULES)
    assert ex.case is case
    assert ex.rule.startswith("Rule 2")
    assert ex.dynamics == dynamics
    assert ex.override is override
    assert ex.why == out.why  # the sentence is the sync function's own, not a second opinion
    assert (out.override is not None) is override


def test_explanation_carries_both_inputs_and_who_set_p():
    s = state(AVAILABLE, "Busy/InAMeeting", by="AGENT")
    ex = explain(s, CAT, RULES)
    assert (ex.p, ex.p_by, ex.p_at) == ("Available", "AGENT", T0)
    assert (ex.q, ex.q_since, ex.asked) == ("Busy/InAMeeting", T0, "Busy")
    assert ex.session == "none"  # P Available: no session, the person's own state shows
    assert "override" in ex.rule.lower()


def test_busy_p_calls_for_the_busy_session():
    ex = explain(state(BUSY, None), CAT, RULES)
    assert ex.session == "Busy/InACall"
    assert ex.case is Case.Q_ASKS_NOTHING


def test_sync_view_says_what_differs():
    s = state(AVAILABLE, "Busy/InAMeeting")
    s.dynamics_seen.value = AVAILABLE  # the override was not written yet
    view = sync_view(s, CAT, RULES)
    assert view.in_sync is False
    assert any("calls for Busy" in d for d in view.differences)
    s.dynamics_seen.value = BUSY
    assert sync_view(s, CAT, RULES).in_sync is True


def test_sync_view_compares_the_session():
    s = state(BUSY, None)
    s.dynamics_seen.value = BUSY
    assert sync_view(s, CAT, RULES).in_sync is False  # the Busy/InACall session is not held yet
    s.session_delivered = "Busy/InACall"
    assert sync_view(s, CAT, RULES).in_sync is True


def test_unknown_p_has_nothing_to_compare():
    assert sync_view(state(None, None), CAT, RULES).in_sync is None
