"""TODO(#26 sweep): the old flat ``Store`` methods, until every call site names its repository.

Before the reshaping ``Store`` was one class assembled from mixins, and callers wrote
``store.send(...)``, ``store.fenced_write(...)``. Now each method lives on one
repository (``store.inbox.send(...)``). :data:`MOVED` says where each old name went; the
store's ``__getattr__`` forwards through it, and ``/tmp/store_sweep.py`` rewrites the
call sites from it. Three old calls changed shape and are adapted here:
``fenced_write`` (keyword fields, now one :class:`~agentos.store.writes.Write`) and
``save_snapshot`` / ``load_snapshot`` (an engine ``KVSnapshot``, now bytes and a header:
:mod:`agentos.store.legacy_kv`). This module goes once the sweep has run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from agentos.store.records import TaskWrite
from agentos.store.writes import Duplicate, Write, Writes

__all__ = ["MOVED", "SCRIPTS", "FencedWriteFields"]

MOVED: dict[str, tuple[str, str]] = {
    "acquire_lease": ("leases", "acquire_lease"),
    "acquire_leases": ("leases", "acquire_leases"),
    "agent_spec": ("specs", "agent_spec"),
    "agent_specs": ("specs", "agent_specs"),
    "agent_specs_of": ("specs", "agent_specs_of"),
    "append_logs": ("logs", "append_logs"),
    "apply": ("specs", "apply"),
    "budget_warn_once": ("quotas", "budget_warn_once"),
    "claim_inbox": ("inbox", "claim_inbox"),
    "daemons": ("heartbeats", "daemons"),
    "dead_letter": ("poison", "dead_letter"),
    "dead_letters": ("poison", "dead_letters"),
    "delete": ("specs", "delete"),
    "desired_index": ("specs", "desired_index"),
    "drop_message": ("poison", "drop_message"),
    "due_claim": ("waits", "due_claim"),
    "due_count": ("waits", "due_count"),
    "due_defer": ("waits", "due_defer"),
    "due_head": ("waits", "due_head"),
    "due_now": ("waits", "due_now"),
    "due_release": ("waits", "due_release"),
    "due_scan": ("waits", "due_scan"),
    "due_unclaim": ("waits", "due_unclaim"),
    "ensure_inbox": ("inbox", "ensure_inbox"),
    "events": ("events", "read"),
    "fenced_status_batch": ("writes", "fenced_status_batch"),
    "fenced_write": ("writes", "fenced_write"),
    "forget_daemon": ("heartbeats", "forget_daemon"),
    "generation": ("specs", "generation"),
    "heartbeat": ("heartbeats", "heartbeat"),
    "held_add": ("waits", "held_add"),
    "held_counts": ("waits", "held_counts"),
    "held_remove": ("waits", "held_remove"),
    "holders": ("waits", "holders"),
    "idempotency_done": ("tasks", "idempotency_done"),
    "inbox_depth": ("inbox", "inbox_depth"),
    "inbox_has": ("inbox", "inbox_has"),
    "inbox_lengths": ("inbox", "inbox_lengths"),
    "index_of": ("specs", "index_of"),
    "is_holder": ("waits", "is_holder"),
    "last_signal_id": ("signals", "last_signal_id"),
    "lease_keeper": ("leases", "lease_keeper"),
    "leases": ("leases", "read"),
    "leave_holders": ("waits", "leave_holders"),
    "load_state": ("agents", "load_state"),
    "logs": ("logs", "read"),
    "logs_after": ("logs", "logs_after"),
    "mark_cancel": ("tasks", "mark_cancel"),
    "model_throttle": ("models", "model_throttle"),
    "model_throttled_until": ("models", "model_throttled_until"),
    "models": ("models", "read"),
    "open_agent": ("takeover", "open_agent"),
    "open_agents": ("takeover", "open_agents"),
    "pending_purges": ("specs", "pending_purges"),
    "pending_waits": ("waits", "pending_waits"),
    "policies": ("specs", "policies"),
    "purge_agent": ("specs", "purge_agent"),
    "purge_waits": ("waits", "purge_waits"),
    "quota_add_cost": ("quotas", "quota_add_cost"),
    "quota_admit": ("quotas", "quota_admit"),
    "quota_admit_many": ("quotas", "quota_admit_many"),
    "quota_budget_used": ("quotas", "quota_budget_used"),
    "quota_charge_seconds": ("quotas", "quota_charge_seconds"),
    "quota_cost_used": ("quotas", "quota_cost_used"),
    "quota_effective": ("quotas", "quota_effective"),
    "quota_evaluator_lease": ("quotas", "quota_evaluator_lease"),
    "quota_evaluator_release": ("quotas", "quota_evaluator_release"),
    "quota_publish": ("quotas", "quota_publish"),
    "quota_renew": ("quotas", "quota_renew"),
    "quota_report": ("quotas", "quota_report"),
    "quota_reports": ("quotas", "quota_reports"),
    "quota_settle": ("quotas", "quota_settle"),
    "quota_state": ("quotas", "quota_state"),
    "quota_unqueue": ("quotas", "quota_unqueue"),
    "quota_usage": ("quotas", "quota_usage"),
    "read_inbox": ("inbox", "read_inbox"),
    "read_signals": ("signals", "read_signals"),
    "record_agent_event": ("events", "record_agent_event"),
    "record_fleet_event": ("events", "record_fleet_event"),
    "recover_held": ("waits", "recover_held"),
    "redrive": ("poison", "redrive"),
    "release_lease": ("leases", "release_lease"),
    "renew_leases": ("leases", "renew_leases"),
    "send": ("inbox", "send"),
    "server_time": ("heartbeats", "server_time"),
    "set_task_outcome": ("tasks", "set_task_outcome"),
    "signal": ("signals", "signal"),
    "signal_groups": ("signals", "signal_groups"),
    "snapshot_manifest": ("snapshots", "manifest"),
    "status": ("agents", "status"),
    "statuses": ("agents", "statuses"),
    "still_held": ("waits", "still_held"),
    "task": ("tasks", "task"),
    "tasks": ("tasks", "recent"),
    "toolservers": ("specs", "toolservers"),
    "trim_tasks": ("tasks", "trim_tasks"),
    "trim_tasks_many": ("tasks", "trim_tasks_many"),
    "upgrade_layout": ("specs", "upgrade_layout"),
    "usage": ("usage", "read"),
    "wait_answer": ("waits", "wait_answer"),
    "wait_arm": ("waits", "wait_arm"),
    "wait_clear": ("waits", "wait_clear"),
    "wait_event": ("waits", "wait_event"),
    "wait_get": ("waits", "wait_get"),
    "wait_park": ("waits", "wait_park"),
    "wake": ("waits", "wake"),
}
"""Old ``Store`` method -> (repository attribute, method name there)."""

SCRIPTS: dict[str, str] = {
    "_fenced": "fenced",
    "_send_once": "inbox_send",
    "_read_fenced": "inbox_read",
}
"""Old private script attributes of ``Store`` -> ``store.conn.scripts`` attribute."""


class FencedWriteFields:
    """The old ``Store.fenced_write``: its fields as keywords, made into one :class:`Write`."""

    def __init__(self, writes: Writes) -> None:
        self._writes = writes

    async def __call__(
        self,
        name: str,
        lease_value: str,
        *,
        status: Mapping[str, object] | None = None,
        clear: Sequence[str] = (),
        event: Mapping[str, str] | None = None,
        state: bytes | None = None,
        ack_id: str | None = None,
        task: TaskWrite | None = None,
        tasks: Sequence[TaskWrite] = (),
        schedule: Mapping[str, float] | None = None,
        usage: tuple[str, Mapping[str, float]] | None = None,
        release: bool = False,
        op_id: str | None = None,
        duplicate: Duplicate | None = None,
        prior: Sequence[Write] = (),
    ) -> int:
        write = Write(
            status=status,
            clear=clear,
            event=event,
            state=state,
            ack_id=ack_id,
            tasks=(task, *tasks) if task is not None else tasks,
            schedule=schedule,
            usage=usage,
        )
        return await self._writes.fenced_write(
            name, lease_value, write, release=release, op_id=op_id, duplicate=duplicate, prior=prior
        )
