"""Tests for agentos.core.placement: the fair share of a fleet from the live daemons."""

import pytest

from agentos.core.placement import fair_share, live_daemons, share_limit

NOW = 1_000.0


@pytest.mark.parametrize(
    ("agents", "daemons", "share"),
    [(0, 3, 0), (1, 3, 1), (300, 3, 100), (301, 3, 101), (300, 1, 300), (5, 0, 5), (7, 2, 4)],
)
def test_fair_share(agents: int, daemons: int, share: int) -> None:
    assert fair_share(agents, daemons) == share


@pytest.mark.parametrize(
    ("agents", "daemons", "capacity", "limit"),
    [
        pytest.param(300, 3, None, 110, id="share-plus-ten-percent"),
        pytest.param(300, 2, None, 165, id="two-daemons"),
        pytest.param(300, 1, None, 330, id="alone-never-limited-by-share"),
        pytest.param(300, 3, 50, 50, id="max-agents-wins"),
        pytest.param(300, 3, 500, 110, id="share-wins"),
        pytest.param(4, 3, None, 3, id="margin-at-least-one"),
        pytest.param(0, 3, None, 1, id="empty-fleet"),
        pytest.param(21, 2, None, 13, id="margin-rounds-up"),
    ],
)
def test_share_limit(agents: int, daemons: int, capacity: int | None, limit: int) -> None:
    assert share_limit(agents, daemons, capacity=capacity) == limit


def test_share_limits_always_leave_room_for_every_agent() -> None:
    for agents in range(0, 400, 7):
        for daemons in range(1, 9):
            assert share_limit(agents, daemons) * daemons >= agents + daemons


def test_the_margin_is_a_parameter() -> None:
    assert share_limit(300, 3, margin=0.0) == 101
    assert share_limit(300, 3, margin=0.5) == 150


@pytest.mark.parametrize(
    ("heartbeats", "live"),
    [
        pytest.param({}, 1, id="alone-without-heartbeat"),
        pytest.param({"me": {"seen_at": NOW}}, 1, id="alone"),
        pytest.param({"me": {"seen_at": NOW}, "b": {"seen_at": NOW - 1}}, 2, id="two"),
        pytest.param({"b": {"seen_at": NOW - 15}}, 1, id="stale-exactly-fresh-s"),
        pytest.param({"b": {"seen_at": NOW - 14.9}}, 2, id="just-fresh"),
        pytest.param({"b": {"seen_at": NOW, "draining": True}}, 1, id="draining"),
        pytest.param({"b": {"seen_at": NOW, "draining": False}}, 2, id="not-draining"),
        pytest.param({"b": {"host": "x"}}, 1, id="no-seen-at"),
        pytest.param({"b": {"seen_at": "soon"}}, 1, id="garbled-seen-at"),
        pytest.param({"b": {"seen_at": NOW + 3}}, 2, id="clock-ahead"),
        pytest.param(
            {"me": {"seen_at": NOW}, "b": {"seen_at": NOW}, "c": {"seen_at": NOW}}, 3, id="three"
        ),
    ],
)
def test_live_daemons(heartbeats: dict[str, dict[str, object]], live: int) -> None:
    assert live_daemons(heartbeats, NOW, me="me", fresh_s=15.0) == live
