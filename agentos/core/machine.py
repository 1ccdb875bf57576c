"""Machine output (`-o json|yaml`): one key style, real numbers, RFC 3339 times.

Task records and agent status live in Redis hashes: snake_case field names, every value
a string, times as epoch seconds. A script reading `agentos tasks -o json` wants what it
reads from `get` (camelCase, as the specs), numbers it can compare and times it can
parse, so records pass through :func:`machine_record` on their way out. Which fields are
numbers, times or JSON is declared here, by name: a result or a message that happens to
look like a number stays text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic.alias_generators import to_camel

__all__ = ["machine_record", "rfc3339"]

_INTS = frozenset(
    {
        "attempt",
        "steps",
        "tokens_in",
        "tokens_out",
        "tokens_cached",
        "interrupted",
        "restarts",
        "tasks_succeeded",
        "tasks_failed",
        "consecutive_failures",
        "kv_bytes",
        "kv_tokens",
        "hibernate_ms",
        "wake_ms",
        "inbox_depth",
        "dead_letters",
    }
)
_FLOATS = frozenset({"waited_s", "cost"})
_TIMES = frozenset({"last_activity", "waiting_since", "wait_deadline"})
_JSON = frozenset(
    {"answers", "calls", "tools", "wait_choices", "answer", "outcome", "agent_outcome"}
)
_FLAGS = frozenset({"message_taken", "kv_kept"})


def rfc3339(epoch: float) -> str:
    """Epoch seconds as an RFC 3339 UTC time with milliseconds: ``2026-12-06T02:30:00.123Z``."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _value(key: str, raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    if raw == "":
        return None if key in _INTS | _FLOATS | _TIMES | _JSON or key.endswith("_at") else raw
    try:
        if key in _INTS:
            return int(float(raw))
        if key in _FLOATS:
            return float(raw)
        if key in _TIMES or key.endswith("_at"):
            return rfc3339(float(raw))
        if key in _JSON:
            return json.loads(raw)
    except (ValueError, OverflowError):
        return raw  # not what the field should hold: shown as stored
    if key in _FLAGS:
        return raw == "1"
    return raw


def machine_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A stored record (task, status) for machine output: camelCase keys, numbers as
    numbers, times as RFC 3339, JSON fields parsed, empty optional fields as null."""
    return {to_camel(k): _value(k, v) for k, v in record.items()}
