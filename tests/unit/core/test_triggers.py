"""Tests for agentos.core.triggers: next fire times and the per-agent trigger clock."""

from datetime import datetime
from typing import Any

import pytest

from agentos.core.spec import Trigger
from agentos.core.triggers import TriggerClock, next_fire


def _t(data: dict[str, Any]) -> Trigger:
    return Trigger.model_validate(data)


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


T0 = _ts("2024-01-01T00:00:00+00:00")  # 1_704_067_200


def test_reference_instant() -> None:
    assert T0 == 1_704_067_200.0


@pytest.mark.parametrize(
    ("data", "after", "expected"),
    [
        ({"heartbeat": "30s"}, T0, T0 + 30),
        ({"heartbeat": "500ms"}, T0 + 0.25, T0 + 0.75),
        ({"heartbeat": "1h"}, 0.0, 3600.0),
        ({"every": "5m"}, T0, T0 + 300),
        ({"every": "1d"}, T0 + 17.5, T0 + 17.5 + 86_400),
        ({"every": 90}, T0, T0 + 90),
    ],
    ids=[
        "heartbeat-30s",
        "heartbeat-ms",
        "heartbeat-from-zero",
        "every-5m",
        "every-1d",
        "every-int",
    ],
)
def test_interval_triggers_add_the_interval(
    data: dict[str, Any], after: float, expected: float
) -> None:
    assert next_fire(_t(data), after) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("at", "after", "expected"),
    [
        ("2024-01-01T00:10:00Z", T0, T0 + 600),
        ("2024-01-01T01:10:00+01:00", T0, T0 + 600),
        ("2024-01-01T00:00:00.500000Z", T0, T0 + 0.5),
        ("2024-01-01T00:10:00Z", T0 + 600, None),
        ("2024-01-01T00:10:00Z", T0 + 599.999, T0 + 600),
        ("2024-01-01T00:10:00Z", T0 + 601, None),
        ("2023-12-31T23:59:59Z", T0, None),
    ],
    ids=[
        "future-utc",
        "future-offset",
        "future-fraction",
        "exactly-now-is-passed",
        "just-before",
        "passed",
        "long-passed",
    ],
)
def test_at_fires_once(at: str, after: float, expected: float | None) -> None:
    result = next_fire(_t({"at": at}), after)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected, abs=1e-6)


CRON_CASES = [
    # UTC
    ("*/15 * * * *", "UTC", "2024-01-01T00:00:00+00:00", 1_704_068_100.0),
    ("*/15 * * * *", "UTC", "2024-01-01T00:14:59.999+00:00", 1_704_068_100.0),
    ("*/15 * * * *", "UTC", "2024-01-01T00:15:00+00:00", 1_704_069_000.0),
    ("0 0 * * *", "UTC", "2023-12-31T23:59:59+00:00", 1_704_067_200.0),
    ("0 9 * * 1", "UTC", "2024-01-01T09:00:00+00:00", _ts("2024-01-08T09:00:00+00:00")),
    # Europe/Paris, winter (UTC+1) and summer (UTC+2)
    ("0 9 * * *", "Europe/Paris", "2024-01-15T07:00:00+00:00", 1_705_305_600.0),
    ("0 9 * * *", "Europe/Paris", "2024-01-15T08:00:00+00:00", _ts("2024-01-16T08:00:00+00:00")),
    ("0 9 * * *", "Europe/Paris", "2024-07-15T00:00:00+00:00", 1_721_026_800.0),
    # across DST: spring forward on 2024-03-31, fall back on 2024-10-27
    ("0 9 * * *", "Europe/Paris", "2024-03-30T10:00:00+00:00", 1_711_868_400.0),
    ("0 9 * * *", "Europe/Paris", "2024-10-26T10:00:00+00:00", 1_730_016_000.0),
    ("0 9 * * *", "Europe/Paris", "2024-10-27T08:00:00+00:00", _ts("2024-10-28T08:00:00+00:00")),
    # the hour 02:00-03:00 does not exist on 2024-03-31 in Paris: 01:00 CET -> 03:00 CEST
    ("0 * * * *", "Europe/Paris", "2024-03-31T00:30:00+00:00", _ts("2024-03-31T01:00:00+00:00")),
    # a non-UTC zone on the far side of the date line
    ("0 9 * * *", "Asia/Tokyo", "2024-01-01T00:00:00+00:00", _ts("2024-01-02T00:00:00+00:00")),
    (
        "0 9 * * *",
        "America/New_York",
        "2024-01-01T00:00:00+00:00",
        _ts("2024-01-01T14:00:00+00:00"),
    ),
]


@pytest.mark.parametrize(
    ("schedule", "tz", "after", "expected"),
    CRON_CASES,
    ids=[
        "utc-quarter",
        "utc-just-before",
        "utc-exactly-on-is-strictly-after",
        "utc-midnight",
        "utc-weekly-on-fire-time",
        "paris-winter",
        "paris-winter-on-fire-time",
        "paris-summer",
        "paris-spring-forward",
        "paris-fall-back",
        "paris-after-fall-back",
        "paris-hourly-across-gap",
        "tokyo",
        "new-york",
    ],
)
def test_cron_next_fire(schedule: str, tz: str, after: str, expected: float) -> None:
    trigger = _t({"schedule": schedule, "timezone": tz})
    assert next_fire(trigger, _ts(after)) == expected


def test_cron_default_timezone_is_utc() -> None:
    assert next_fire(_t({"schedule": "0 9 * * *"}), T0) == T0 + 9 * 3600


@pytest.mark.parametrize(
    ("schedule", "start"),
    [
        ("0 * * * *", "2024-10-26T22:00:00+00:00"),
        ("0 * * * *", "2024-03-30T22:00:00+00:00"),
        ("*/30 * * * *", "2024-10-26T22:00:00+00:00"),
        ("0 9 * * *", "2024-10-20T00:00:00+00:00"),
        ("0 9 * * *", "2024-03-25T00:00:00+00:00"),
    ],
    ids=["hourly-fall", "hourly-spring", "half-hourly-fall", "daily-fall", "daily-spring"],
)
def test_cron_always_moves_forward_across_dst(schedule: str, start: str) -> None:
    trigger = _t({"schedule": schedule, "timezone": "Europe/Paris"})
    after = _ts(start)
    for _ in range(48):
        fire = next_fire(trigger, after)
        assert fire is not None
        assert fire > after
        after = fire


@pytest.mark.parametrize(
    "data", [{"inbox": None}, {"inbox": {}}], ids=["inbox-null", "inbox-empty"]
)
def test_inbox_never_fires(data: dict[str, Any]) -> None:
    trigger = _t(data)
    assert trigger.kind == "inbox"
    assert next_fire(trigger, T0) is None
    clock = TriggerClock([trigger], now=T0)
    assert clock.next_at is None
    assert clock.due(T0 + 10**9) == []


@pytest.mark.parametrize(
    ("triggers", "expected"),
    [
        ([], None),
        ([{"inbox": None}], None),
        ([{"at": "2023-01-01T00:00:00Z"}], None),
        ([{"heartbeat": "30s"}], T0 + 30),
        ([{"heartbeat": "30s"}, {"every": "10s"}, {"inbox": None}], T0 + 10),
        ([{"every": "1h"}, {"schedule": "*/15 * * * *"}], T0 + 900),
        ([{"every": "1h"}, {"at": "2024-01-01T00:00:05Z"}], T0 + 5),
        ([{"at": "2023-01-01T00:00:00Z"}, {"every": "1m"}], T0 + 60),
    ],
    ids=[
        "no-triggers",
        "inbox-only",
        "past-at-only",
        "single-heartbeat",
        "min-of-intervals",
        "cron-earliest",
        "at-earliest",
        "past-at-ignored",
    ],
)
def test_clock_next_at_is_the_min(triggers: list[dict[str, Any]], expected: float | None) -> None:
    clock = TriggerClock([_t(d) for d in triggers], now=T0)
    assert clock.next_at == expected


def test_due_returns_nothing_before_any_fire_time() -> None:
    clock = TriggerClock([_t({"heartbeat": "30s"}), _t({"every": "1m"})], now=T0)
    assert clock.due(T0 + 29.999) == []
    assert clock.next_at == T0 + 30


def test_due_fires_each_due_kind_once_and_reschedules_after_now() -> None:
    clock = TriggerClock(
        [_t({"heartbeat": "30s"}), _t({"every": "1m"}), _t({"schedule": "*/15 * * * *"})],
        now=T0,
    )
    assert clock.due(T0 + 30) == ["heartbeat"]
    assert clock.next_at == T0 + 60
    assert clock.due(T0 + 30) == []
    assert sorted(clock.due(T0 + 60)) == ["every", "heartbeat"]
    assert clock.next_at == T0 + 90


def test_due_after_many_missed_fire_times_fires_once() -> None:
    clock = TriggerClock(
        [_t({"heartbeat": "10s"}), _t({"schedule": "*/15 * * * *"}), _t({"every": "1m"})],
        now=T0,
    )
    late = T0 + 3600 + 7  # 360 heartbeats, 4 cron slots and 60 intervals missed
    assert clock.due(late) == ["heartbeat", "schedule", "every"]
    assert clock.next_at is not None
    assert clock.next_at > late
    assert clock.next_at == late + 10
    assert clock.due(late) == []
    # the cron slot is the next quarter hour after `late`, not a missed one
    assert clock.due(late + 59.5) == ["heartbeat"]
    assert clock.due(T0 + 4500) == ["heartbeat", "schedule", "every"]


def test_due_at_fires_once_then_never_again() -> None:
    clock = TriggerClock([_t({"at": "2024-01-01T00:05:00Z"})], now=T0)
    assert clock.next_at == T0 + 300
    assert clock.due(T0 + 299) == []
    assert clock.due(T0 + 300) == ["at"]
    assert clock.next_at is None
    assert clock.due(T0 + 10**6) == []


def test_due_at_missed_still_fires_once() -> None:
    clock = TriggerClock([_t({"at": "2024-01-01T00:05:00Z"}), _t({"every": "1h"})], now=T0)
    assert clock.due(T0 + 86_400) == ["at", "every"]
    assert clock.next_at == T0 + 86_400 + 3600


def test_due_cron_reschedules_to_next_slot_after_now() -> None:
    clock = TriggerClock([_t({"schedule": "0 9 * * *", "timezone": "Europe/Paris"})], now=T0)
    assert clock.next_at == _ts("2024-01-01T08:00:00+00:00")
    assert clock.due(_ts("2024-01-03T12:00:00+00:00")) == ["schedule"]
    assert clock.next_at == _ts("2024-01-04T08:00:00+00:00")


def test_daily_cron_in_repeated_hour_fires_once() -> None:
    trigger = _t({"schedule": "30 2 * * *", "timezone": "Europe/Paris"})
    first = next_fire(trigger, _ts("2024-10-26T12:00:00+00:00"))
    assert first == _ts("2024-10-27T00:30:00+00:00")  # 02:30 CEST
    assert next_fire(trigger, first) == _ts("2024-10-28T01:30:00+00:00")  # 02:30 CET next day
