"""Every Redis key agentos uses, in one place.

Keys of one agent carry the agent's name as a hash tag (``agentos:{repo-watcher}:status``)
so that all of them land in one slot on Redis Cluster and one Lua script may touch them
together. Fleet-wide keys share the ``{fleet}`` tag for the same reason: an apply that
touches the spec index, the specs and the generation counter is one transaction.
A namespace prefix lets several fleets (or tests) share one server.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["INBOX_GROUP", "Keys"]

INBOX_GROUP = "agentos"  # the consumer group every daemon reads agent inboxes through


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
    def generation(self) -> str:
        """Counter bumped by every apply and delete; daemons re-read specs when it moves."""
        return f"{self.namespace}:{{fleet}}:generation"

    @property
    def signals(self) -> str:
        """Stream of nudges for daemons: applied, message, wake, hibernate."""
        return f"{self.namespace}:{{fleet}}:signals"

    @property
    def fleet_events(self) -> str:
        """Stream: every agent event, with the agent's name, for `agentos events`."""
        return f"{self.namespace}:{{fleet}}:events"

    @property
    def deleted(self) -> str:
        """Set: deleted agents whose runtime keys are not yet removed (owner was busy or dead)."""
        return f"{self.namespace}:{{fleet}}:deleted"

    @property
    def daemons(self) -> str:
        """Hash: daemon id -> JSON heartbeat (host, pid, agents, last seen)."""
        return f"{self.namespace}:{{fleet}}:daemons"

    # one agent
    def _agent(self, name: str, what: str) -> str:
        return f"{self.namespace}:{{{name}}}:{what}"

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

    def agent_keys(self, name: str) -> list[str]:
        """Every key that belongs to one agent, for deletion.

        The fencing counter stays: a re-created agent of the same name must never
        hand out a token that a stale daemon still holds.
        """
        return [
            self.status(name),
            self.lease(name),
            self.events(name),
            self.state(name),
            self.inbox(name),
            self.kv_manifest(name),
            self.kv_pending(name),
            self.tasks(name),
            self.idempotency(name),
            self.schedule(name),
            self.usage_days(name),
        ]
