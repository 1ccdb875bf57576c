"""What `agentos ps` and `agentos describe agent` show of an agent, as data.

:class:`AgentSummary` is one row of `ps` (and of ``GET /v1/agents``), :class:`AgentDetail`
everything `describe` shows; ``to_dict`` is their machine form (camelCase, numbers,
RFC 3339 times: :mod:`agentos.core.machine`). Built by :class:`agentos.client.Client`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from agentos.core.machine import machine_record, rfc3339
from agentos.store import Event

__all__ = ["AgentDetail", "AgentSummary"]


@dataclass(frozen=True, slots=True)
class AgentSummary:
    """One row of `agentos ps`."""

    name: str
    phase: str
    owner: str
    reason: str
    restarts: int
    tasks: int
    steps: int
    last_activity: float | None
    priority: int
    labels: dict[str, str]
    kv_bytes: int = 0
    tasks_failed: int = 0  # of ``tasks`` (those that ran: succeeded or failed)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for `-o json|yaml`."""
        return {
            "kvBytes": self.kv_bytes,
            "name": self.name,
            "phase": self.phase,
            "owner": self.owner,
            "reason": self.reason,
            "restarts": self.restarts,
            "tasks": self.tasks,
            "tasksFailed": self.tasks_failed,
            "steps": self.steps,
            "lastActivity": None if self.last_activity is None else rfc3339(self.last_activity),
            "priority": self.priority,
            "labels": self.labels,
        }


@dataclass(frozen=True, slots=True)
class AgentDetail:
    """Everything `agentos describe agent` shows."""

    name: str
    spec: dict[str, Any]
    status: dict[str, str]
    events: list[Event] = field(default_factory=list)
    inbox_depth: int = 0
    tasks: list[dict[str, str]] = field(default_factory=list)

    def stored(self) -> dict[str, Any]:
        """As stored (string fields, epoch times): what the describe text reads."""
        return {
            "name": self.name,
            "spec": self.spec,
            "status": self.status,
            "inboxDepth": self.inbox_depth,
            "tasks": self.tasks,
            "events": [asdict(e) for e in self.events],
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain data for `-o json|yaml`: camelCase, numbers, RFC 3339 times."""
        return {
            "name": self.name,
            "spec": self.spec,
            "status": machine_record(self.status),
            "inboxDepth": self.inbox_depth,
            "tasks": [machine_record(t) for t in self.tasks],
            "events": [e.to_dict() for e in self.events],
        }
