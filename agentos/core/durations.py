"""Human-friendly durations ("30s", "5m", "1h30m") for specs, settings and the CLI.

Operators write durations as short strings in YAML and on the command line; the rest of
agentos wants plain float seconds. This module is the one place that converts between the
two, so every field that takes a duration accepts and prints the same forms, and a value
written back out (``agentos get -o yaml``, stored specs) reads the way a person would
write it and parses back to exactly the same number.
"""

import functools
import math
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, PlainSerializer, WithJsonSchema

__all__ = [
    "DURATION_PATTERN",
    "Duration",
    "PositiveDuration",
    "format_duration",
    "parse_duration",
]

# Largest unit first: parsing insists on this order so "30m1h" is caught as a typo
# rather than silently meaning 90 minutes.
_UNITS: tuple[tuple[str, int], ...] = (
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
)
_UNIT_MS = dict(_UNITS)
_UNIT_RANK = {unit: rank for rank, (unit, _) in enumerate(_UNITS)}

_NUMBER = r"\d+(?:\.\d+)?|\.\d+"
# "ms" must be tried before "m" or "500ms" would split as "500m" + "s".
_PART = re.compile(rf"({_NUMBER})(ms|d|h|m|s)")
_PLAIN_NUMBER = re.compile(rf"(?:{_NUMBER})")

DURATION_PATTERN = rf"^\s*(?:(?:{_NUMBER})|(?:(?:{_NUMBER})(?:ms|d|h|m|s))+)\s*$"
"""Regular expression (JSON Schema flavour) for the string forms :func:`parse_duration` takes."""

_EXPECTED = 'expected a duration like "30s", "5m", "1h30m"'


def _fail(value: object) -> ValueError:
    shown = f'"{value}"' if isinstance(value, str) else repr(value)
    return ValueError(f"{_EXPECTED}; got {shown}")


def _check_seconds(seconds: float, original: object) -> float:
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise _fail(original)
    return seconds


def parse_duration(value: str | int | float) -> float:
    """Return ``value`` as a number of seconds.

    Accepts a number of seconds (``90``, ``1.5``, ``"90"``) or a string of one or more
    ``<number><unit>`` parts with units ``d``, ``h``, ``m``, ``s``, ``ms`` from largest to
    smallest, each at most once (``"500ms"``, ``"1h30m"``, ``"1.5h"``).

    Raises:
        ValueError: for negative, NaN or infinite values, booleans, empty strings, unknown
            or repeated units, or anything else that is not a duration. The message says
            what was expected and what was given.
    """
    # bool is an int subclass; "true" as a duration is always a mistake.
    if isinstance(value, bool):
        raise _fail(value)
    if isinstance(value, int):
        return _check_seconds(float(value), value)
    if isinstance(value, float):
        return _check_seconds(value, value)
    if not isinstance(value, str):
        raise _fail(value)

    return _parse_text(value)


@functools.lru_cache(maxsize=4096)
def _parse_text(value: str) -> float:
    # Fleets repeat the same few durations in every spec: parse each text once.
    text = value.strip()
    if _PLAIN_NUMBER.fullmatch(text):
        return float(Decimal(text))

    total = Fraction(0)
    position = 0
    last_rank = -1
    for match in _PART.finditer(text):
        unit = match.group(2)
        rank = _UNIT_RANK[unit]
        if match.start() != position or rank <= last_rank:
            raise _fail(value)
        try:
            amount = Fraction(Decimal(match.group(1)))
        except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
            raise _fail(value) from exc
        total += amount * _UNIT_MS[unit]
        position = match.end()
        last_rank = rank
    if position == 0 or position != len(text):
        raise _fail(value)
    # Summing exact fractions then rounding once keeps "1s100ms" equal to 1.1.
    return float(total / 1000)


def format_duration(seconds: float) -> str:
    """Return the canonical string for ``seconds``: ``90`` -> ``"1m30s"``, ``0.5`` -> ``"500ms"``.

    Whole milliseconds are split into ``d``/``h``/``m``/``s``/``ms`` parts with zero parts
    left out (``0`` is ``"0s"``), and ``parse_duration(format_duration(x)) == x``. Values
    finer than a millisecond are written as exact decimal seconds (``"0.0005s"``), which
    also parse back to the same float.

    Raises:
        ValueError: if ``seconds`` is negative, NaN, infinite or a bool.
    """
    if isinstance(seconds, bool):
        raise ValueError(f"expected a number of seconds; got {seconds!r}")
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ValueError(f"expected a non-negative, finite number of seconds; got {seconds!r}")

    millis = round(Fraction(seconds) * 1000)
    if float(Fraction(millis, 1000)) != seconds:
        # Not a whole number of milliseconds: fall back to exact decimal seconds. repr()
        # is the shortest string that round-trips; Decimal avoids its exponent notation.
        return f"{Decimal(repr(float(seconds))):f}s"
    if millis == 0:
        return "0s"
    parts: list[str] = []
    for unit, size in _UNITS:
        count, millis = divmod(millis, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _parse_any(value: Any) -> float:
    # Pydantic hands the raw input over untyped; parse_duration rejects anything odd.
    return parse_duration(value)


def _check_positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError(
            f'expected a duration greater than 0, like "30s"; got "{format_duration(seconds)}"'
        )
    return seconds


def _schema(description: str, exclusive_minimum: bool) -> dict[str, Any]:
    number: dict[str, Any] = {"type": "number"}
    number["exclusiveMinimum" if exclusive_minimum else "minimum"] = 0
    # YAML turns a bare `90` into a number, so the schema admits numbers too; otherwise
    # editors would flag values agentos itself accepts.
    return {
        "anyOf": [{"type": "string", "pattern": DURATION_PATTERN}, number],
        "description": description,
    }


_SERIALIZER = PlainSerializer(format_duration, return_type=str, when_used="json")

Duration = Annotated[
    float,
    BeforeValidator(_parse_any),
    _SERIALIZER,
    WithJsonSchema(
        _schema(
            'A duration: "500ms", "30s", "5m", "1h30m", "2d", or a number of seconds.',
            exclusive_minimum=False,
        )
    ),
]
"""Float seconds in Python; parsed from duration strings or numbers; written as a string in JSON."""

PositiveDuration = Annotated[
    float,
    BeforeValidator(_parse_any),
    AfterValidator(_check_positive),
    _SERIALIZER,
    WithJsonSchema(
        _schema(
            'A duration greater than zero: "500ms", "30s", "5m", "1h30m", "2d", or seconds.',
            exclusive_minimum=True,
        )
    ),
]
"""Like :data:`Duration`, but zero is rejected."""
