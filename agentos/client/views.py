"""What `agentos ps` and `agentos describe agent` show of an agent, as data.

:class:`AgentSummary` is one row of `ps` (and of ``GET /v1/agents``), :class:`AgentDetail`
everything `describe` shows; ``to_dict`` is their machine form (camelCase, numbers,
RFC 3339 times: :mod:`agentos.core.machine`). Built by the client's reports
(:mod:`agentos.client.reports`).

An agent that no live daemon may host (its ``spec.placement`` or a local Model's site
matches none of their labels) is shown ``Pending`` with reason ``Unschedulable`` and a
message naming what it needs and the live daemons' labels, whatever its stored status
says: it will not run until a daemon that matches joins. That is computed here, from
the daemons' heartbeats, since no daemon writes the status of an agent it may not host
(:func:`unschedulable_agents`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from agentos.core.machine import machine_record, rfc3339
from agentos.core.placement import (
    ANYWHERE,
    DEFAULT_MODEL,
    live_labels,
    model_resources,
    needs_of_body,
    unschedulable,
)
from agentos.store import Event, Store

__all__ = [
    "UNSCHEDULABLE",
    "AgentDetail",
    "AgentSummary",
    "mark_unschedulable",
    "unschedulable_agents",
    "unschedulable_rows",
]

UNSCHEDULABLE = "Unschedulable"


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
    message: str = ""  # why it is in this phase, when there is more to say than the reason

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
            "message": self.message,
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


async def unschedulable_agents(
    store: Store, specs: Mapping[str, Mapping[str, Any]]
) -> dict[str, str]:
    """The agents of ``specs`` (name -> stored Agent resource) that no live daemon may
    host, each with why (:func:`agentos.core.placement.unschedulable`). Empty when no
    daemon is live (then nothing runs, and no one agent is to blame); the Models are read
    only when an agent asks for one."""
    needs = {name: needs_of_body(body.get("spec") or {}) for name, body in specs.items()}
    asking = {n: x for n, x in needs.items() if x is not ANYWHERE}
    if not asking:  # nothing to read when no agent asks anything of its daemon
        return {}
    heartbeats = await store.heartbeats.daemons()
    if not heartbeats:
        return {}
    daemons = live_labels(heartbeats, await store.heartbeats.server_time())
    if not daemons:
        return {}
    named = any(m != DEFAULT_MODEL for x in asking.values() for m in x.models)
    models = model_resources(await store.models.read()) if named else {}
    out = {}
    for name, need in asking.items():
        why = unschedulable(daemons, need, models)
        if why:
            out[name] = why
    return out


def mark_unschedulable(status: Mapping[str, str], message: str | None) -> dict[str, str]:
    """``status`` shown as ``Pending`` / ``Unschedulable`` with ``message`` (unchanged
    when ``message`` is None or empty)."""
    if not message:
        return dict(status)
    return {**status, "phase": "Pending", "reason": UNSCHEDULABLE, "message": message}


def unschedulable_rows(rows: list[AgentSummary], notes: Mapping[str, str]) -> list[AgentSummary]:
    """``rows`` with those in ``notes`` (name -> why no daemon may host it) shown as
    ``Pending`` / ``Unschedulable``."""
    if not notes:
        return rows
    return [
        replace(r, phase="Pending", reason=UNSCHEDULABLE, message=notes[r.name])
        if r.name in notes
        else r
        for r in rows
    ]
