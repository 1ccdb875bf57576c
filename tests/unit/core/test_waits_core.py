"""The pure decisions of durable waits, as tables: answers, resolutions, activation, replay."""

from __future__ import annotations

from typing import Any

import pytest

from agentos.core.budgets import budget_warnings
from agentos.core.waits import (
    AnswerError,
    Discard,
    Repark,
    Resolution,
    Resume,
    WaitKind,
    WaitLog,
    WaitRecord,
    WaitRequested,
    WaitSpec,
    WaitTimeout,
    ask_spec,
    on_activation,
    resolve,
    validate_answer,
)


def wait(**kw: Any) -> WaitRecord:
    base: dict[str, Any] = {
        "agent": "a",
        "task_id": "t1",
        "park_id": "p1",
        "kind": WaitKind.ASK,
        "question": "deploy?",
        "choices": ("yes", "no"),
        "deadline": None,
        "default": None,
        "has_default": False,
        "since": 100.0,
        "seq": 0,
    }
    return WaitRecord(**{**base, **kw})


@pytest.mark.parametrize(
    ("record", "answer", "expected"),
    [
        (wait(), {"yes": True}, "yes"),
        (wait(), {"no": True}, "no"),
        (wait(), {"choice": "no"}, "no"),
        (wait(choices=("a", "b")), {"choice": "b"}, "b"),
        (wait(choices=None), {"text": "ship it"}, "ship it"),
        (wait(), {"choice": "maybe"}, "not one of the choices"),
        (wait(choices=("a", "b")), {"yes": True}, "not one of the choices"),
        (wait(), {"text": "yes"}, "use --choice"),
        (wait(choices=None), {"yes": True}, "answer with --text"),
        (wait(), {}, "exactly one answer"),
        (wait(), {"yes": True, "no": True}, "exactly one answer"),
        (None, {"yes": True}, "not waiting"),
        (wait(task_id="other"), {"yes": True}, "not waiting"),
        (wait(answer=Resolution("answered", "no", "bob")), {"yes": True}, "already answered"),
        (
            wait(kind=WaitKind.EVENT, question="go", choices=None),
            {"text": "x"},
            "send it the event",
        ),
        (wait(kind=WaitKind.SLEEP, choices=None), {"text": "x"}, "takes no answer"),
        (wait(choices=None), {"text": "x" * 20_000}, "characters"),
    ],
)
def test_answers_are_checked_against_the_question(
    record: WaitRecord | None, answer: dict[str, Any], expected: str
) -> None:
    if expected in ("yes", "no", "b", "ship it"):
        assert validate_answer(record, "t1", **answer) == expected
    else:
        with pytest.raises(AnswerError, match=expected):
            validate_answer(record, "t1", **answer)


@pytest.mark.parametrize(
    ("record", "now", "outcome"),
    [
        (wait(), 1e12, None),
        (wait(deadline=200.0), 199.0, None),
        (wait(deadline=200.0), 200.0, "timeout"),
        (wait(kind=WaitKind.SLEEP, deadline=200.0), 250.0, "woke"),
        (
            wait(deadline=200.0, answer=Resolution("answered", "yes", "al", 150.0)),
            300.0,
            "answered",
        ),
    ],
)
def test_what_a_wait_resolves_to(record: WaitRecord, now: float, outcome: str | None) -> None:
    r = resolve(record, now)
    assert (r.outcome if r else None) == outcome


@pytest.mark.parametrize(
    ("record", "committed", "consumed", "expected"),
    [
        (wait(), False, False, Discard),
        (wait(answer=Resolution("answered", "yes")), False, False, Resume),
        (wait(answer=Resolution("answered", "yes")), True, True, Discard),
        (wait(deadline=500.0), True, False, Repark),
        (wait(answer=Resolution("answered", "yes")), True, False, Resume),
        (wait(deadline=50.0), True, False, Resume),
    ],
)
def test_what_an_activation_does(
    record: WaitRecord, committed: bool, consumed: bool, expected: type
) -> None:
    assert isinstance(
        on_activation(record, committed=committed, consumed=consumed, now=100.0), expected
    )


def test_a_wait_record_round_trips_through_its_fields() -> None:
    record = wait(deadline=5.5, default="no", has_default=True, seq=2)
    fields = record.to_fields()
    fields["answer"] = '{"outcome": "answered", "value": "yes", "by": "al", "at": 7.0}'
    back = WaitRecord.from_fields(fields)
    assert back.answer == Resolution("answered", "yes", "al", 7.0, "ask")
    assert back.to_fields() == record.to_fields()


def test_the_log_replays_answers_in_order_then_parks() -> None:
    log = WaitLog(lambda: 0.0)
    log.begin([Resolution("answered", "yes"), Resolution("timeout")])
    ask = WaitSpec(WaitKind.ASK, "q", ("yes", "no"))
    assert log.wait(ask) == "yes"
    with pytest.raises(WaitTimeout):
        log.wait(ask)
    with pytest.raises(WaitRequested) as parked:
        log.wait(ask)
    assert parked.value.seq == 2
    log.begin([Resolution("timeout")])
    assert log.wait(WaitSpec(WaitKind.ASK, "q", None, None, "dflt", True)) == "dflt"


def test_waits_outside_a_task_are_an_error() -> None:
    log = WaitLog(lambda: 0.0)
    log.begin(enabled=False)
    with pytest.raises(RuntimeError, match="cannot park"):
        log.wait(WaitSpec(WaitKind.ASK, "q"))


def test_model_calls_replay_until_the_code_takes_another_path() -> None:
    log = WaitLog(lambda: 0.0)
    log.record("chat", "p1", {"text": "one"})
    log.record("chat", "p2", {"text": "two"})
    recorded = list(log.made)
    log.begin(calls=recorded)
    assert log.replayed("chat", "p1") == recorded[0]
    assert log.replayed("chat", "other") is None
    assert log.replayed("chat", "p2") is None  # off the recorded path: the model from here


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"question": ""}, "non-empty"),
        ({"question": "q", "choices": []}, "distinct"),
        ({"question": "q", "choices": ["a", "a"]}, "distinct"),
        ({"question": "q", "choices": ["a"], "default": "b", "has_default": True}, "not one"),
        ({"question": "q", "default": object(), "has_default": True}, "JSON"),
    ],
)
def test_ask_checks_what_it_is_given(kwargs: dict[str, Any], error: str) -> None:
    args = {"choices": None, "deadline": None, "default": None, "has_default": False, **kwargs}
    with pytest.raises(ValueError, match=error):
        ask_spec(**args)


@pytest.mark.parametrize(
    ("limits", "used", "expected"),
    [
        ({"c": (100, None)}, {"c": (79.0, 0.0)}, []),
        ({"c": (100, None)}, {"c": (80.0, 0.0)}, [("c", "dailyTokens")]),
        ({"c": (None, 10.0)}, {"c": (1e9, 9.0)}, [("c", "dailyAgentSeconds")]),
        (
            {"c": (100, 10.0)},
            {"c": (100.0, 10.0)},
            [("c", "dailyTokens"), ("c", "dailyAgentSeconds")],
        ),
        ({"c": (None, None)}, {"c": (1e9, 1e9)}, []),
        ({"c": (100, None)}, {}, []),
    ],
)
def test_budget_warnings_fire_at_80_percent(
    limits: dict[str, tuple[float | None, float | None]],
    used: dict[str, tuple[float, float]],
    expected: list[tuple[str, str]],
) -> None:
    got = budget_warnings(limits, used, {"c": "2026-03-10"})
    assert [(w.quota_class, w.limit) for w in got] == expected
