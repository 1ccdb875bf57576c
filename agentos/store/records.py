"""The plain values the store takes and returns, and what its modules share.

Kept apart from the operations so that every store module (specs, writes, inbox, leases)
and every caller can name these types without importing the others: frozen dataclasses
for specs, changes, leases, events, task writes, inbox messages and the snapshot a new
owner reads, the retention settings, the bounds of the streams several modules write,
and the one helper that turns a redis reply into text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agentos.core.machine import rfc3339
from agentos.core.messages import Message
from agentos.store.raw import RawReply

__all__ = [
    "EVENTS_MAXLEN",
    "FLEET_EVENTS_MAXLEN",
    "SIGNALS_MAXLEN",
    "TASK_RETENTION_S",
    "USAGE_RETENTION_S",
    "AgentSnapshot",
    "AppliedChange",
    "Event",
    "InboxMessage",
    "LeaseInfo",
    "Retention",
    "SpecRecord",
    "StatusUpdate",
    "TaskWrite",
    "messages_of",
    "pairs_of",
]


USAGE_RETENTION_S = 400 * 86_400.0
TASK_RETENTION_S = 7 * 86_400.0
# Caps per shard: the fleet feed keeps about 16 x 1,000 events, the signals 4 x 2,500.
FLEET_EVENTS_MAXLEN = 1_000
EVENTS_MAXLEN = 1000  # per agent's own event stream
SIGNALS_MAXLEN = 2_500

InboxMessage = Message
"""A message waiting in an agent's inbox: the one message type (:mod:`agentos.core.messages`)."""


def _s(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class SpecRecord:
    """One validated resource ready to store: canonical JSON plus what the index needs."""

    kind: str  # "Agent" or "QuotaPolicy"
    name: str
    body: str  # canonical JSON
    spec_hash: str
    priority: int = 50
    max_message_bytes: int | None = None  # an Agent's inbox limit, checked by sends
    max_inbox_depth: int | None = None  # an Agent's inbox depth limit, checked by sends


@dataclass(frozen=True, slots=True)
class AppliedChange:
    """What apply did (or would do) to one resource: created, configured or unchanged."""

    kind: str
    name: str
    action: str
    fields: tuple[str, ...] = ()  # for "configured": the paths that changed


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """Who holds an agent's lease and for how many more milliseconds."""

    owner: str
    token: int
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of an agent's or the fleet's event stream."""

    id: str
    agent: str
    time: float
    type: str
    reason: str
    message: str
    daemon: str

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON and YAML output."""
        return {
            "time": rfc3339(self.time),
            "agent": self.agent,
            "type": self.type,
            "reason": self.reason,
            "message": self.message,
            "daemon": self.daemon,
        }


@dataclass(frozen=True, slots=True)
class TaskWrite:
    """A task record update that rides along with a fenced write.

    ``created_at`` (on the first write) indexes the task; ``idempotency_key`` marks the
    key as completed, in the same atomic step as the state and the inbox ack.
    """

    id: str
    fields: Mapping[str, object]
    created_at: float | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class AgentSnapshot:
    """What a daemon reads when it takes an agent: status, state, its pending messages."""

    status: dict[str, str]
    state: bytes | None
    pending: list[InboxMessage]
    claimed: int
    schedule: dict[str, float] = field(default_factory=dict)  # trigger index -> next fire
    unfinished: list[dict[str, str]] = field(default_factory=list)  # queued/running records
    # Messages no reader had seen yet (up to OPEN_NEW_MESSAGES): read in the same trip.
    new: list[InboxMessage] = field(default_factory=list)
    wait: dict[str, str] = field(default_factory=dict)  # its parked wait's fields, if any


StatusUpdate = tuple[str, str, Mapping[str, object], tuple[str, Mapping[str, float]], str | None]
"""One entry of :meth:`Store.fenced_status_batch`: (agent, lease, fields, usage, op id)."""


@dataclass(frozen=True, slots=True)
class Retention:
    """How long data with a lifetime lives in Redis, in seconds.

    Usage hashes and the usage-days set are kept ``usage_s`` after their last write; task
    records and idempotency keys ``tasks_s`` (trimming removes them earlier; the TTL is
    the bound when trimming never runs). The daemon sets it from its settings.
    """

    usage_s: float = USAGE_RETENTION_S
    tasks_s: float = TASK_RETENTION_S


def pairs_of(flat: RawReply) -> dict[RawReply, RawReply]:
    """A script's flat [field, value, ...] list as a dict (empty: deleted while pending)."""
    return dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}


def messages_of(reply: RawReply) -> list[InboxMessage]:
    """The messages of an XREADGROUP / XAUTOCLAIM-style reply (deleted entries left out)."""
    out = []
    for _stream, entries in reply or []:
        for entry_id, fields in entries:
            if not fields:  # deleted while pending
                continue
            f = {_s(a): _s(b) for a, b in fields.items()}
            out.append(
                InboxMessage(
                    id=_s(entry_id),
                    body=f.get("body", ""),
                    key=f.get("key"),
                    sent_at=float(f.get("sent_at", "0")),
                    traceparent=f.get("traceparent"),
                )
            )
    return out
