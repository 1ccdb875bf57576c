"""Tests for agentos.core.durations: parsing, canonical formatting and the pydantic types."""

import json
import math

import pytest
from pydantic import BaseModel, ValidationError

from agentos.core.durations import Duration, PositiveDuration, format_duration, parse_duration


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2d", 172_800.0),
        ("1h30m", 5400.0),
        ("1d2h3m4s5ms", 93_784.005),
        ("1s100ms", 1.1),
        ("1.5h", 5400.0),
        (".5s", 0.5),
        ("0s", 0.0),
        ("  30s ", 30.0),
        ("90", 90.0),
        ("1.25", 1.25),
        (90, 90.0),
        (0, 0.0),
        (1.5, 1.5),
    ],
)
def test_parse_duration_accepts(value: str | int | float, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "5x",
        "-5s",
        "-5",
        "30m1h",
        "1h1h",
        "1h 30m",
        "1h30",
        "s",
        "1e3",
        "ms",
        "nan",
        "inf",
        -1,
        -0.5,
        math.nan,
        math.inf,
        True,
        False,
        None,
        [1],
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=r'expected a duration like "30s", "5m", "1h30m"; got'):
        parse_duration(value)  # type: ignore[arg-type]


def test_parse_duration_message_shows_the_input() -> None:
    with pytest.raises(
        ValueError, match=r'^expected a duration like "30s", "5m", "1h30m"; got "5x"$'
    ):
        parse_duration("5x")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0, "0s"),
        (0.5, "500ms"),
        (0.001, "1ms"),
        (1.1, "1s100ms"),
        (30, "30s"),
        (60, "1m"),
        (90, "1m30s"),
        (3600, "1h"),
        (5400, "1h30m"),
        (86_400, "1d"),
        (93_784.005, "1d2h3m4s5ms"),
        (0.0005, "0.0005s"),
        (1e-05, "0.00001s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("seconds", [-1.0, math.nan, math.inf, True])
def test_format_duration_rejects(seconds: float) -> None:
    with pytest.raises(ValueError, match="expected"):
        format_duration(seconds)


def test_round_trip_whole_milliseconds() -> None:
    edges = [59_999, 60_001, 3_599_999, 86_399_999, 86_400_001, 10**12 + 7]
    for millis in [*range(0, 5_000), *edges]:
        seconds = millis / 1000
        assert parse_duration(format_duration(seconds)) == seconds, millis


class _Timings(BaseModel):
    wait: Duration = 0.0
    tick: PositiveDuration = 1.0


def test_duration_fields_parse_and_serialize() -> None:
    timings = _Timings.model_validate({"wait": "1h30m", "tick": 0.25})
    assert timings.wait == 5400.0
    assert timings.tick == 0.25
    assert timings.model_dump() == {"wait": 5400.0, "tick": 0.25}
    assert timings.model_dump(mode="json") == {"wait": "1h30m", "tick": "250ms"}
    assert json.loads(timings.model_dump_json()) == {"wait": "1h30m", "tick": "250ms"}
    assert _Timings.model_validate(timings.model_dump(mode="json")) == timings


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"wait": "5x"}, 'expected a duration like "30s", "5m", "1h30m"; got "5x"'),
        ({"wait": -1}, "expected a duration like"),
        ({"tick": "0s"}, 'expected a duration greater than 0, like "30s"; got "0s"'),
        ({"tick": 0}, "expected a duration greater than 0"),
    ],
)
def test_duration_fields_reject(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        _Timings.model_validate(data)
    assert message in caught.value.errors()[0]["msg"]


def test_duration_json_schema() -> None:
    properties = _Timings.model_json_schema()["properties"]
    for name in ("wait", "tick"):
        schema = properties[name]
        assert "description" in schema
        string, number = schema["anyOf"]
        assert string["type"] == "string"
        assert string["pattern"].startswith("^")
        assert number["type"] == "number"
    assert properties["tick"]["anyOf"][1] == {"type": "number", "exclusiveMinimum": 0}
