"""Every Redis key agentos uses, in one place.

Keys of one agent carry the agent's name as a hash tag (``agentos:{repo-watcher}:status``)
so that all of them land in one slot on Redis Cluster and one Lua script may touch them
together. The desired state shares the ``{fleet}`` tag for the same reason: an apply that
touches the spec index, the specs and the generation counter is one transaction.
Fleet-wide streams that every agent writes (the event feed, the daemons' signals) and
the due-time index are sharded over hash tags of their own (``{events:N}``,
``{signals:N}``, ``{due:N}``), so that no single cluster node carries the fleet's whole
control traffic. A namespace prefix lets several fleets (or tests) share one server.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

__all__ = ["DUE_SHARDS", "FEED_SHARDS", "INBOX_GROUP", "SIGNAL_SHARDS", "Keys", "event_fields"]

INBOX_GROUP = "agentos"  # the consumer group every daemon reads agent inboxes through
# The due-time index is split over this many hash tags ({due:0}..{due:15}) so that it
# spreads over a Redis Cluster; an agent's shard is fixed by its name. Changing the
# number moves agents between shards: it is part of the keyspace, like the prefix.
DUE_SHARDS = 16
# The fleet event feed is written by every event of every agent, so it is split the same
# way ({events:0}..{events:15}, an agent's events always in its own shard, in order).
FEED_SHARDS = 16
# Signals (nudges for the daemons) are read by every daemon: a few shards spread their
# writes over a cluster's masters while each daemon keeps one blocking reader per shard.
SIGNAL_SHARDS = 4


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names for one namespace. Agent names never contain braces (spec validates)."""

    namespace: str = "agentos"

    def __post_init__(self) -> None:
        if not self.namespace or any(c in self.namespace for c in "{}: \t\n"):
            raise ValueError(
                f"invalid namespace {self.namespace!r}: use letters, digits, '-', '_' or '.'"
            )

    # fleet-wide: desired state, signals and the fleet event feed
    @property
    def specs(self) -> str:
        """Hash: agent name -> canonical JSON of its Agent resource."""
        return f"{self.namespace}:{{fleet}}:specs"

    @property
    def index(self) -> str:
        """Hash: agent name -> "spec_hash priority", all the reconcile loop needs."""
        return f"{self.namespace}:{{fleet}}:index"

    @property
    def policies(self) -> str:
        """Hash: QuotaPolicy name -> canonical JSON."""
        return f"{self.namespace}:{{fleet}}:policies"

    @property
    def models(self) -> str:
        """Hash: Model name -> canonical JSON (with its hash under ``_hash``)."""
        return f"{self.namespace}:{{fleet}}:models"

    @property
    def toolservers(self) -> str:
        """Hash: ToolServer name -> canonical JSON (with its hash under ``_hash``)."""
        return f"{self.namespace}:{{fleet}}:toolservers"

    @property
    def model_throttle(self) -> str:
        """Hash: Model name -> epoch seconds until which its provider throttles calls."""
        return f"{self.namespace}:{{fleet}}:model-throttle"

    @property
    def generation(self) -> str:
        """Counter bumped by every apply and delete; daemons re-read specs when it moves."""
        return f"{self.namespace}:{{fleet}}:generation"

    @staticmethod
    def signal_shard(agent: str) -> int:
        """The signal stream that nudges about ``agent`` go to."""
        return zlib.crc32(agent.encode()) % SIGNAL_SHARDS

    def signals(self, shard: int) -> str:
        """Stream of nudges for daemons (applied, message, wake, hibernate, due...);
        every daemon reads every shard."""
        return f"{self.namespace}:{{signals:{shard}}}:stream"

    def signal_streams(self) -> list[str]:
        return [self.signals(i) for i in range(SIGNAL_SHARDS)]

    @staticmethod
    def feed_shard(agent: str) -> int:
        """The shard of the fleet event feed that ``agent``'s events are copied to."""
        return zlib.crc32(agent.encode()) % FEED_SHARDS

    def fleet_events(self, shard: int) -> str:
        """Stream: a shard of the fleet event feed (every agent event, with the agent's
        name), for `agentos events`."""
        return f"{self.namespace}:{{events:{shard}}}:feed"

    def feed_streams(self) -> list[str]:
        return [self.fleet_events(i) for i in range(FEED_SHARDS)]

    @property
    def layout(self) -> str:
        """String: the version of this key layout, for the one-time upgrade at daemon start."""
        return f"{self.namespace}:{{fleet}}:layout"

    @property
    def deleted(self) -> str:
        """Set: deleted agents whose runtime keys are not yet removed (owner was busy or dead)."""
        return f"{self.namespace}:{{fleet}}:deleted"

    @property
    def daemons(self) -> str:
        """Hash: daemon id -> JSON heartbeat (host, pid, agents, last seen)."""
        return f"{self.namespace}:{{fleet}}:daemons"

    @property
    def holders(self) -> str:
        """Set: ids of the daemons that hold agents (each has a :meth:`held` set), so that
        the agents of a daemon that died are found and activated again elsewhere."""
        return f"{self.namespace}:{{fleet}}:holders"

    def held(self, daemon_id: str) -> str:
        """Set: the agents one daemon holds (activated and not yet released)."""
        return f"{self.namespace}:{{held:{daemon_id}}}:agents"

    # quota governance: fleet-wide documents, then per-class counters
    @property
    def quota_effective(self) -> str:
        """String: JSON of every quota class's effective limits (written by the evaluator)."""
        return f"{self.namespace}:{{fleet}}:quota:effective"

    @property
    def quota_memory(self) -> str:
        """String: JSON of each rule's memory (since when it holds, steps, last change)."""
        return f"{self.namespace}:{{fleet}}:quota:memory"

    @property
    def quota_metrics(self) -> str:
        """Hash: daemon id -> JSON of its recent inference samples (for the evaluator)."""
        return f"{self.namespace}:{{fleet}}:quota:metrics"

    @property
    def quota_fleet_metrics(self) -> str:
        """String: JSON of the fleet metrics the evaluator last used, with their time."""
        return f"{self.namespace}:{{fleet}}:quota:fleet-metrics"

    @property
    def quota_lease(self) -> str:
        """String with a TTL: the daemon that evaluates quota policies now."""
        return f"{self.namespace}:{{fleet}}:quota:lease"

    @property
    def quota_fence(self) -> str:
        """Counter: fencing tokens of the evaluator lease."""
        return f"{self.namespace}:{{fleet}}:quota:fence"

    def quota(self, quota_class: str, what: str) -> str:
        """A counter of one quota class; all share the ``{quota:CLASS}`` hash tag so the
        admission script can touch the class's and its agents' counters together."""
        return f"{self.namespace}:{{quota:{quota_class}}}:{what}"

    def quota_admit_keys(self, quota_class: str, agent: str, day: str) -> list[str]:
        """KEYS of quota_admit.lua, in order."""
        q = self.quota
        return [
            q(quota_class, "tat"),
            q(quota_class, f"tat:{agent}"),
            q(quota_class, "holders"),
            q(quota_class, f"holders:{agent}"),
            q(quota_class, "waiters"),
            q(quota_class, "waiters:ttl"),
            q(quota_class, f"day:{day}"),
            q(quota_class, "sleepers"),
        ]

    # the due-time index: which agents must be activated when (see agentos.store.waits)
    @staticmethod
    def due_shard(name: str) -> int:
        """The shard of the due index (and of the wait records) that holds ``name``."""
        return zlib.crc32(name.encode()) % DUE_SHARDS

    def due(self, shard: int) -> str:
        """Sorted set: released agent -> when it must be activated (epoch seconds: its
        next trigger fire, a wait's deadline, now for a message; +inf: only on an event).
        One per shard, each its own hash tag. Agents a daemon holds are not in it."""
        return f"{self.namespace}:{{due:{shard}}}:at"

    def wait(self, name: str) -> str:
        """Hash: the agent's parked wait (task, question, choices, deadline, answer), in
        the agent's due shard so that an answer and its activation are one atomic step."""
        return f"{self.namespace}:{{due:{self.due_shard(name)}}}:wait:{name}"

    def wait_events(self, name: str) -> str:
        """Hash: event name -> JSON of an event sent while the agent was not waiting for it
        (the latest of each name), taken by the next ``wait_for`` of that name."""
        return f"{self.namespace}:{{due:{self.due_shard(name)}}}:events:{name}"

    # one agent
    def _agent(self, name: str, what: str) -> str:
        return f"{self.namespace}:{{{name}}}:{what}"

    def applied(self, name: str) -> str:
        """String "spec_hash priority inbox_max_bytes inbox_max_depth": the agent's entry
        of the fleet index, kept in the agent's own slot so that a send checks it in the
        same atomic step as it enqueues, and a purge never removes an agent applied again."""
        return self._agent(name, "applied")

    def status(self, name: str) -> str:
        """Hash: phase, owner, last activity, counters, last error."""
        return self._agent(name, "status")

    def lease(self, name: str) -> str:
        """String "daemon|token" with a TTL: who runs the agent."""
        return self._agent(name, "lease")

    def fence(self, name: str) -> str:
        """Counter: the fencing token handed out with each new lease."""
        return self._agent(name, "fence")

    def events(self, name: str) -> str:
        """Stream: the agent's own events."""
        return self._agent(name, "events")

    def logs(self, name: str) -> str:
        """Stream: the agent's log lines (capped, expiring; agentos.store.logs)."""
        return self._agent(name, "logs")

    def state(self, name: str) -> str:
        """String: the agent's durable state (msgspec JSON)."""
        return self._agent(name, "state")

    def inbox(self, name: str) -> str:
        """Stream: messages for the agent, read through the INBOX_GROUP consumer group."""
        return self._agent(name, "inbox")

    def kv_manifest(self, name: str) -> str:
        """String: the manifest (msgspec) of the agent's committed KV snapshot."""
        return self._agent(name, "kv")

    def kv_pending(self, name: str) -> str:
        """String: id and chunk count of a snapshot being written (for clean-up after a crash)."""
        return self._agent(name, "kv:pending")

    def kv_chunk(self, name: str, snapshot_id: str, index: int) -> str:
        """String: one chunk (about 1 MiB) of a KV snapshot."""
        return self._agent(name, f"kv:{snapshot_id}:{index}")

    def task(self, name: str, task_id: str) -> str:
        """Hash: one task record (trigger, times, attempt, status, error, tokens, result)."""
        return self._agent(name, f"task:{task_id}")

    def tasks(self, name: str) -> str:
        """Sorted set: the agent's task ids by creation time (for listing and retention)."""
        return self._agent(name, "tasks")

    def idempotency(self, name: str) -> str:
        """Sorted set: idempotency keys of completed messages, scored by completion time."""
        return self._agent(name, "idempotency")

    def schedule(self, name: str) -> str:
        """Hash: trigger index -> next fire time, so a restarted daemon continues the schedule."""
        return self._agent(name, "schedule")

    def usage(self, name: str, day: str) -> str:
        """Hash: metered usage of one UTC day (active_s, tokens_in/out, kv_byte_s, tasks_*)."""
        return self._agent(name, f"usage:{day}")

    def usage_days(self, name: str) -> str:
        """Set: the days that have a usage hash (for reports and deletion)."""
        return self._agent(name, "usage-days")

    def ops(self, name: str) -> str:
        """Sorted set with a TTL: ids of the agent's most recent fenced writes, so that a
        retried write is applied once."""
        return self._agent(name, "ops")

    def sent(self, name: str, send_id: str) -> str:
        """String with a TTL: "message_id digest" of the send with this send id (the
        digest of its body, when the sender gave one: a reuse with another body is a
        conflict)."""
        return self._agent(name, f"sent:{send_id}")

    def dead(self, name: str) -> str:
        """Hash: task id -> JSON of a dead letter (a message whose task failed or was
        interrupted too many times in a row: its fields, attempts, last error, when)."""
        return self._agent(name, "dead")

    def dead_order(self, name: str) -> str:
        """Sorted set: dead letters' task ids by when they died (listing and the bound)."""
        return self._agent(name, "dead:order")

    def agent_keys(self, name: str) -> list[str]:
        """Every key that belongs to one agent, for deletion.

        The fencing counter stays: a re-created agent of the same name must never
        hand out a token that a stale daemon still holds.
        """
        return [
            self.status(name),
            self.lease(name),
            self.events(name),
            self.logs(name),
            self.state(name),
            self.inbox(name),
            self.kv_manifest(name),
            self.kv_pending(name),
            self.tasks(name),
            self.idempotency(name),
            self.schedule(name),
            self.usage_days(name),
            self.ops(name),
            self.dead(name),
            self.dead_order(name),
        ]


def event_fields(
    agent: str, now: float, type_: str, reason: str, message: str, daemon: str
) -> dict[str, str]:
    """The fields of one entry of an event stream (an agent's own, or the fleet's)."""
    return {
        "agent": agent,
        "event": json.dumps(
            {"time": now, "type": type_, "reason": reason, "message": message, "daemon": daemon}
        ),
    }
