"""Tests for agentos.core.lifecycle: the phase machine, backoff arithmetic and crash loops."""

import pytest

from agentos.core.lifecycle import (
    IllegalTransition,
    Phase,
    PhaseEvent,
    RestartDecision,
    backoff_delay,
    on_failure,
    transition,
)

P = Phase
E = PhaseEvent

# Every edge of the machine except STOP and FAIL, which are tested for all phases below.
ALLOWED_EDGES = [
    (P.PENDING, E.START, P.IDLE),
    (P.STOPPED, E.START, P.IDLE),
    (P.FAILED, E.START, P.IDLE),
    (P.HIBERNATED, E.START, P.HIBERNATED),
    (P.IDLE, E.TASK, P.RUNNING),
    (P.RUNNING, E.TASK, P.RUNNING),
    (P.RUNNING, E.IDLE, P.IDLE),
    (P.IDLE, E.IDLE, P.IDLE),
    (P.IDLE, E.HIBERNATE, P.HIBERNATING),
    (P.HIBERNATING, E.HIBERNATED, P.HIBERNATED),
    (P.HIBERNATED, E.HIBERNATED, P.HIBERNATED),
    (P.HIBERNATED, E.WAKE, P.WAKING),
    (P.WAKING, E.WOKE, P.IDLE),
    (P.HIBERNATED, E.CRASH, P.HIBERNATED),
    (P.RUNNING, E.CRASH, P.PENDING),
    (P.IDLE, E.CRASH, P.PENDING),
    (P.HIBERNATING, E.CRASH, P.PENDING),
    (P.WAKING, E.CRASH, P.PENDING),
    (P.PENDING, E.CRASH, P.PENDING),
]


@pytest.mark.parametrize(
    ("phase", "event", "expected"),
    ALLOWED_EDGES,
    ids=[f"{p.value}-{e.value}" for p, e, _ in ALLOWED_EDGES],
)
def test_allowed_edge(phase: Phase, event: PhaseEvent, expected: Phase) -> None:
    assert transition(phase, event) is expected


ILLEGAL_EDGES = [
    (P.RUNNING, E.START),
    (P.IDLE, E.START),
    (P.WAKING, E.START),
    (P.HIBERNATING, E.START),
    (P.RUNNING, E.WAKE),
    (P.IDLE, E.WAKE),
    (P.FAILED, E.WAKE),
    (P.RUNNING, E.HIBERNATE),
    (P.FAILED, E.HIBERNATE),
    (P.HIBERNATED, E.HIBERNATE),
    (P.PENDING, E.TASK),
    (P.HIBERNATED, E.TASK),
    (P.FAILED, E.TASK),
    (P.STOPPED, E.TASK),
    (P.IDLE, E.WOKE),
    (P.HIBERNATED, E.WOKE),
    (P.IDLE, E.HIBERNATED),
    (P.PENDING, E.IDLE),
    (P.HIBERNATED, E.IDLE),
    (P.FAILED, E.CRASH),
    (P.STOPPED, E.CRASH),
    (P.STOPPED, E.FAIL),
]


@pytest.mark.parametrize(
    ("phase", "event"),
    ILLEGAL_EDGES,
    ids=[f"{p.value}-{e.value}" for p, e in ILLEGAL_EDGES],
)
def test_illegal_edge_raises_naming_event_and_phase(phase: Phase, event: PhaseEvent) -> None:
    with pytest.raises(IllegalTransition) as info:
        transition(phase, event)
    message = str(info.value)
    assert event.value in message
    assert phase.value in message


def test_illegal_transition_is_a_value_error() -> None:
    assert issubclass(IllegalTransition, ValueError)


def test_illegal_transition_exact_message() -> None:
    with pytest.raises(IllegalTransition, match=r"^cannot wake an agent that is Running$"):
        transition(P.RUNNING, E.WAKE)


@pytest.mark.parametrize("phase", list(Phase), ids=[p.value for p in Phase])
def test_stop_allowed_from_every_phase(phase: Phase) -> None:
    assert transition(phase, E.STOP) is P.STOPPED


@pytest.mark.parametrize("phase", [p for p in Phase if p is not P.STOPPED], ids=lambda p: p.value)
def test_fail_allowed_from_every_phase_but_stopped(phase: Phase) -> None:
    assert transition(phase, E.FAIL) is P.FAILED


def test_fail_from_stopped_is_illegal() -> None:
    with pytest.raises(IllegalTransition, match=r"^cannot fail an agent that is Stopped$"):
        transition(P.STOPPED, E.FAIL)


@pytest.mark.parametrize(
    ("failures", "initial_s", "max_s", "expected"),
    [
        (1, 1.0, 60.0, 1.0),
        (2, 1.0, 60.0, 2.0),
        (3, 1.0, 60.0, 4.0),
        (4, 1.0, 60.0, 8.0),
        (6, 1.0, 60.0, 32.0),
        (7, 1.0, 60.0, 60.0),
        (8, 1.0, 60.0, 60.0),
        (3, 0.5, 10.0, 2.0),
        (5, 0.5, 10.0, 8.0),
        (6, 0.5, 10.0, 10.0),
        (1, 5.0, 3.0, 3.0),
        (63, 1.0, 1e30, 2.0**62),
        (64, 1.0, 1e30, 2.0**62),
        (1_000, 1.0, 300.0, 300.0),
        (10**9, 2.0, 300.0, 300.0),
        (10**18, 0.1, 5.0, 5.0),
        (0, 1.0, 60.0, 0.0),
        (-1, 1.0, 60.0, 0.0),
        (-(10**9), 1.0, 60.0, 0.0),
    ],
    ids=[
        "first",
        "second-doubles",
        "third",
        "fourth",
        "sixth-below-cap",
        "seventh-capped",
        "eighth-capped",
        "half-third",
        "half-fifth",
        "half-capped",
        "initial-above-cap",
        "exponent-at-limit",
        "exponent-capped",
        "thousand",
        "billion",
        "huge",
        "zero-failures",
        "negative",
        "very-negative",
    ],
)
def test_backoff_delay(failures: int, initial_s: float, max_s: float, expected: float) -> None:
    delay = backoff_delay(failures, initial_s, max_s)
    assert isinstance(delay, float)
    assert delay == expected


@pytest.mark.parametrize("failures", range(1, 80))
def test_backoff_delay_is_monotonic_and_bounded(failures: int) -> None:
    before = backoff_delay(failures - 1, 1.0, 120.0)
    now = backoff_delay(failures, 1.0, 120.0)
    assert before <= now <= 120.0


@pytest.mark.parametrize(
    ("previous", "crash_loop_after", "expected"),
    [
        (0, 5, RestartDecision(failed=False, delay_s=1.0, consecutive_failures=1)),
        (1, 5, RestartDecision(failed=False, delay_s=2.0, consecutive_failures=2)),
        (2, 5, RestartDecision(failed=False, delay_s=4.0, consecutive_failures=3)),
        (3, 5, RestartDecision(failed=False, delay_s=8.0, consecutive_failures=4)),
        (4, 5, RestartDecision(failed=True, delay_s=0.0, consecutive_failures=5)),
        (9, 5, RestartDecision(failed=True, delay_s=0.0, consecutive_failures=10)),
        (0, 1, RestartDecision(failed=True, delay_s=0.0, consecutive_failures=1)),
        (0, 2, RestartDecision(failed=False, delay_s=1.0, consecutive_failures=1)),
        (1, 2, RestartDecision(failed=True, delay_s=0.0, consecutive_failures=2)),
        (6, 100, RestartDecision(failed=False, delay_s=30.0, consecutive_failures=7)),
    ],
    ids=[
        "first-failure",
        "second",
        "third",
        "last-before-loop",
        "crash-loop-exactly-at-limit",
        "past-limit",
        "limit-one-fails-at-once",
        "limit-two-first",
        "limit-two-second",
        "delay-capped",
    ],
)
def test_on_failure(previous: int, crash_loop_after: int, expected: RestartDecision) -> None:
    decision = on_failure(previous, crash_loop_after=crash_loop_after, initial_s=1.0, max_s=30.0)
    assert decision == expected


def test_on_failure_delay_matches_backoff_delay() -> None:
    for previous in range(0, 9):
        decision = on_failure(previous, crash_loop_after=10, initial_s=0.25, max_s=20.0)
        assert not decision.failed
        assert decision.delay_s == backoff_delay(previous + 1, 0.25, 20.0)
