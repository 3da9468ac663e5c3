"""The subscription plan's health view (``graph_sync.coverage.health_of``), which doctor words."""

from __future__ import annotations

from graph_sync.coverage import ActiveSubscription, health_of

URL = "https://bridge.example/api/graph/notifications"
OK = {"account": "a", "subscription": "s", "ids": 1, "minutes_left": 45.0, "health": "ok"}


def problems(*rows):
    return health_of(list(rows), {}, URL).problems


def test_subscription_rows_expiring_soon_or_unhealthy_are_problems() -> None:
    assert problems(OK) == {}
    assert "expires in 9" in problems({**OK, "minutes_left": 9.0})["a"]
    assert problems({**OK, "health": "error: Forbidden"}) == {"a": "error: Forbidden"}
    assert problems({**OK, "minutes_left": "-"}) == {"a": "no expiry recorded"}


def test_active_misdirected_and_polled_are_told_apart() -> None:
    rows = [
        OK,
        {**OK, "account": "b", "ids": 3},
        {"account": "(polling)", "subscription": "-", "ids": 7, "minutes_left": "-", "health": "polled"},
    ]
    records = {
        "a": {"subscription_id": "s", "notification_url": URL},
        "b": {"subscription_id": "t", "notification_url": "https://old.example/api/graph/notifications"},
    }
    health = health_of(rows, records, URL)
    assert health.active == [ActiveSubscription("a", 1, 45.0), ActiveSubscription("b", 3, 45.0)]
    assert health.misdirected == {"b": "https://old.example/api/graph/notifications"}
    assert health.problems == {} and health.polled == 7
