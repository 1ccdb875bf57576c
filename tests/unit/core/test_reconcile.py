"""Tests for agentos.core.reconcile: desired fleet + local agents + leases -> actions."""

import pytest

from agentos.core.lifecycle import StopReason
from agentos.core.reconcile import Desired, Lease, Local, Restart, Start, Stop, reconcile

ME = "daemon-a"
OTHER = "daemon-b"
NOW = 1_000.0


def _desired(*items: Desired) -> dict[str, Desired]:
    return {d.name: d for d in items}


def _local(*items: Local) -> dict[str, Local]:
    return {x.name: x for x in items}


CASES = [
    pytest.param(
        _desired(Desired("a", "h1")), {}, {}, None, [Start("a", "h1")], id="new-agent-no-lease"
    ),
    pytest.param(
        _desired(Desired("a", "h1")),
        {},
        {"a": Lease(OTHER, NOW + 10)},
        None,
        [],
        id="leased-by-other-live-daemon",
    ),
    pytest.param(
        _desired(Desired("a", "h1")),
        {},
        {"a": Lease(OTHER, NOW + 0.001)},
        None,
        [],
        id="lease-expires-just-after-now",
    ),
    pytest.param(
        _desired(Desired("a", "h1")),
        {},
        {"a": Lease(OTHER, NOW - 5)},
        None,
        [Start("a", "h1")],
        id="lease-expired",
    ),
    pytest.param(
        _desired(Desired("a", "h1")),
        {},
        {"a": Lease(OTHER, NOW)},
        None,
        [Start("a", "h1")],
        id="lease-expires-exactly-now",
    ),
    pytest.param(
        _desired(Desired("a", "h1")),
        {},
        {"a": Lease(ME, NOW + 30)},
        None,
        [Start("a", "h1")],
        id="own-leftover-lease",
    ),
    pytest.param(
        {},
        _local(Local("a", "h1")),
        {"a": Lease(ME, NOW + 30)},
        None,
        [Stop("a", StopReason.DELETE)],
        id="local-deleted",
    ),
    pytest.param(
        _desired(Desired("a", "h2")),
        _local(Local("a", "h1")),
        {"a": Lease(ME, NOW + 30)},
        None,
        [Restart("a", "h2")],
        id="spec-changed",
    ),
    pytest.param(
        _desired(Desired("a", "h1")),
        _local(Local("a", "h1")),
        {"a": Lease(ME, NOW + 30)},
        None,
        [],
        id="unchanged-local",
    ),
    pytest.param(
        _desired(Desired("a", "h1")),
        _local(Local("a", "h1")),
        {},
        None,
        [],
        id="unchanged-local-without-lease",
    ),
    pytest.param({}, {}, {}, None, [], id="empty"),
    pytest.param({}, {}, {}, 0, [], id="empty-zero-capacity"),
    pytest.param(_desired(Desired("a", "h1")), {}, {}, 0, [], id="zero-capacity-starts-nothing"),
    pytest.param(
        _desired(Desired("a", "h1"), Desired("b", "h1"), Desired("c", "h1")),
        {},
        {},
        2,
        [Start("a", "h1"), Start("b", "h1")],
        id="capacity-limits-starts-by-name",
    ),
    pytest.param(
        _desired(Desired("a", "h1", 10), Desired("b", "h1", 90), Desired("c", "h1", 50)),
        {},
        {},
        2,
        [Start("b", "h1"), Start("c", "h1")],
        id="capacity-prefers-priority",
    ),
    pytest.param(
        _desired(
            Desired("z", "h1", 50),
            Desired("m", "h1", 80),
            Desired("b", "h1", 50),
            Desired("a", "h1", 10),
        ),
        {},
        {},
        3,
        [Start("m", "h1"), Start("b", "h1"), Start("z", "h1")],
        id="capacity-priority-then-name",
    ),
    pytest.param(
        _desired(
            Desired("z", "h1", 50),
            Desired("m", "h1", 80),
            Desired("b", "h1", 50),
            Desired("a", "h1", 10),
        ),
        {},
        {},
        None,
        [Start("m", "h1"), Start("b", "h1"), Start("z", "h1"), Start("a", "h1")],
        id="unlimited-starts-in-priority-order",
    ),
    pytest.param(
        _desired(Desired("a", "h1"), Desired("b", "h1"), Desired("c", "h1")),
        _local(Local("a", "h1")),
        {"a": Lease(ME, NOW + 30)},
        2,
        [Start("b", "h1")],
        id="capacity-counts-running-agents",
    ),
    pytest.param(
        _desired(Desired("a", "h2"), Desired("b", "h1")),
        _local(Local("a", "h1")),
        {"a": Lease(ME, NOW + 30)},
        1,
        [Restart("a", "h2")],
        id="restart-keeps-its-slot",
    ),
    pytest.param(
        _desired(Desired("b", "h1")),
        _local(Local("a", "h1")),
        {"a": Lease(ME, NOW + 30)},
        1,
        [Stop("a", StopReason.DELETE), Start("b", "h1")],
        id="stop-frees-capacity-in-same-pass",
    ),
    pytest.param(
        _desired(Desired("c", "h1"), Desired("d", "h1"), Desired("e", "h1")),
        _local(Local("a", "h1"), Local("b", "h1")),
        {},
        2,
        [
            Stop("a", StopReason.DELETE),
            Stop("b", StopReason.DELETE),
            Start("c", "h1"),
            Start("d", "h1"),
        ],
        id="two-stops-free-two-slots",
    ),
    pytest.param(
        _desired(Desired("a", "h1"), Desired("b", "h1")),
        _local(Local("x", "h1"), Local("y", "h1"), Local("z", "h1")),
        {},
        2,
        [
            Stop("x", StopReason.DELETE),
            Stop("y", StopReason.DELETE),
            Stop("z", StopReason.DELETE),
            Start("a", "h1"),
            Start("b", "h1"),
        ],
        id="over-capacity-all-deleted",
    ),
    pytest.param(
        _desired(Desired("x", "h1"), Desired("y", "h1"), Desired("a", "h1")),
        _local(Local("x", "h1"), Local("y", "h1"), Local("z", "h1")),
        {},
        2,
        [Stop("z", StopReason.DELETE)],
        id="still-over-capacity-starts-nothing",
    ),
    pytest.param(
        _desired(Desired("a", "h1"), Desired("b", "h2"), Desired("new", "h1", 99)),
        _local(Local("b", "h1"), Local("gone", "h1")),
        {"a": Lease(OTHER, NOW - 1)},
        None,
        [Stop("gone", StopReason.DELETE), Restart("b", "h2"), Start("new", "h1"), Start("a", "h1")],
        id="stops-then-restarts-then-starts",
    ),
    pytest.param(
        _desired(
            Desired("taken", "h1", 99),
            Desired("expired", "h1", 10),
            Desired("mine", "h1", 20),
            Desired("free", "h1", 30),
        ),
        {},
        {
            "taken": Lease(OTHER, NOW + 60),
            "expired": Lease(OTHER, NOW - 60),
            "mine": Lease(ME, NOW + 60),
        },
        2,
        [Start("free", "h1"), Start("mine", "h1")],
        id="leased-elsewhere-does-not-use-capacity",
    ),
]


@pytest.mark.parametrize(("desired", "local", "leases", "capacity", "expected"), CASES)
def test_reconcile(
    desired: dict[str, Desired],
    local: dict[str, Local],
    leases: dict[str, Lease],
    capacity: int | None,
    expected: list[Start | Stop | Restart],
) -> None:
    assert reconcile(desired, local, leases, NOW, daemon_id=ME, capacity=capacity) == expected


def test_stops_are_ordered_before_starts_regardless_of_name() -> None:
    desired = _desired(Desired("a", "h1"), Desired("m", "h2"))
    local = _local(Local("m", "h1"), Local("z", "h1"))
    actions = reconcile(desired, local, {}, NOW, daemon_id=ME)
    kinds = [type(action) for action in actions]
    assert kinds == [Stop, Restart, Start]


def test_reconcile_does_not_mutate_inputs() -> None:
    desired = _desired(Desired("a", "h1", 1), Desired("b", "h1", 2))
    local = _local(Local("c", "h1"))
    leases = {"a": Lease(OTHER, NOW - 1)}
    snapshot = (dict(desired), dict(local), dict(leases))
    reconcile(desired, local, leases, NOW, daemon_id=ME, capacity=1)
    assert (desired, local, leases) == snapshot


def test_same_leases_seen_by_other_daemon() -> None:
    desired = _desired(Desired("a", "h1"))
    leases = {"a": Lease(ME, NOW + 30)}
    assert reconcile(desired, {}, leases, NOW, daemon_id=OTHER) == []


# ---------------------------------------------------------------------- handing over


def _mine(*names: str, busy: str = "", leaving: str = "") -> dict[str, Local]:
    return {n: Local(n, "h1", busy=n in busy.split(), leaving=n in leaving.split()) for n in names}


def _fleet(**priorities: int) -> dict[str, Desired]:
    return {n: Desired(n, "h1", p) for n, p in priorities.items()}


def _rebalance(*names: str) -> list[Start | Stop | Restart]:
    return [Stop(n, StopReason.REBALANCE) for n in names]


HANDOVER_CASES = [
    pytest.param(
        _fleet(a=50, b=50, c=50), _mine("a", "b", "c"), 3, 5, [], id="at-the-limit-keeps-all"
    ),
    pytest.param(
        _fleet(a=50, b=50, c=50),
        _mine("a", "b", "c"),
        2,
        0,
        [],
        id="handover-off-never-sheds",
    ),
    pytest.param(
        _fleet(a=50, b=10, c=90, d=50),
        _mine("a", "b", "c", "d"),
        2,
        5,
        _rebalance("b", "d"),
        id="lowest-priority-first-then-last-name",
    ),
    pytest.param(
        _fleet(a=50, b=10, c=90),
        _mine("a", "b", "c", busy="b"),
        2,
        5,
        _rebalance("a"),
        id="busy-agent-is-never-moved",
    ),
    pytest.param(
        _fleet(a=50, b=50),
        _mine("a", "b", busy="a b"),
        1,
        5,
        [],
        id="all-busy-nothing-moves",
    ),
    pytest.param(
        _fleet(a=1, b=2, c=3, d=4, e=5, f=6),
        _mine("a", "b", "c", "d", "e", "f"),
        1,
        2,
        _rebalance("a", "b"),
        id="a-few-per-pass",
    ),
    pytest.param(
        _fleet(a=1, b=2, c=3, d=4, e=5, f=6),
        _mine("a", "b", "c", "d", "e", "f", leaving="a"),
        1,
        2,
        _rebalance("b"),
        id="leaving-ones-count-against-the-batch",
    ),
    pytest.param(
        _fleet(a=1, b=2, c=3, d=4),
        _mine("a", "b", "c", "d", leaving="a b"),
        2,
        5,
        [],
        id="leaving-ones-bring-it-down-to-the-limit",
    ),
    pytest.param(
        _fleet(a=1, b=2, c=3, x=99),
        _mine("a", "b", "c", leaving="a"),
        3,
        5,
        [],
        id="nothing-starts-while-handing-over",
    ),
    pytest.param(
        {"a": Desired("a", "h2", 1), "b": Desired("b", "h1", 2), "c": Desired("c", "h1", 3)},
        _mine("a", "b", "c"),
        2,
        5,
        [Stop("b", StopReason.REBALANCE), Restart("a", "h2")],
        id="restarting-agent-stays",
    ),
    pytest.param(
        _fleet(b=2, c=3),
        _mine("a", "b", "c"),
        2,
        5,
        [Stop("a", StopReason.DELETE)],
        id="a-delete-brings-it-down-first",
    ),
    pytest.param(
        _fleet(a=50, b=50, x=99),
        _mine("a", "b"),
        3,
        5,
        [Start("x", "h1")],
        id="under-the-limit-takes-up-to-it",
    ),
]


@pytest.mark.parametrize(("desired", "local", "limit", "handover", "expected"), HANDOVER_CASES)
def test_handover_over_the_share(
    desired: dict[str, Desired],
    local: dict[str, Local],
    limit: int,
    handover: int,
    expected: list[Start | Stop | Restart],
) -> None:
    actions = reconcile(desired, local, {}, NOW, daemon_id=ME, capacity=limit, handover=handover)
    assert actions == expected


def test_a_shed_agent_is_not_taken_back_by_the_same_daemon() -> None:
    """The hysteresis: down to the limit by handing over, then no start from the same
    pass's view of the free agent (it would be over the limit again)."""
    desired = _fleet(a=1, b=2, c=3)
    after = reconcile(desired, _mine("b", "c"), {}, NOW, daemon_id=ME, capacity=2, handover=5)
    assert after == []
