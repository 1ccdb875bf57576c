"""The desired state in Redis: apply, delete and purge, and reading specs and policies back.

Everything `agentos apply` and `agentos delete` change, and everything a daemon reads to
decide what should run: the Agent specs and their index (hash and priority), the
QuotaPolicy documents, the fleet generation that moves on every change, and the set of
deleted agents whose runtime keys still have to go. Apply and purge are WATCHed
transactions, each within one hash slot (so they run on Redis Cluster), ordered so that
an agent deleted and applied again never starts on the old one's state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from redis import exceptions as rexc

from agentos.store import steps
from agentos.store.conn import Conn
from agentos.store.errors import translate
from agentos.store.keys import event_fields as _event_fields
from agentos.store.kvformat import snapshot_keys
from agentos.store.raw import RawClient
from agentos.store.records import (
    FLEET_EVENTS_MAXLEN,
    SIGNALS_MAXLEN,
    AppliedChange,
    SpecRecord,
    _s,
)

__all__ = ["LAYOUT", "Specs"]

LAYOUT = "3"  # see upgrade_layout


class Specs:
    """The desired state (``store.specs``): Agent specs, their index, policies, the
    fleet generation and the agents still to purge."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._r = conn.r
        self.keys = conn.keys

    @translate
    async def apply(
        self, records: Sequence[SpecRecord], *, dry_run: bool = False
    ) -> list[AppliedChange]:
        """Store every record in one transaction, or none of them.

        Returns, per record, whether it was created, configured (changed) or left
        unchanged. With ``dry_run`` nothing is written. Bumps the fleet generation and
        signals the daemons when anything changed.

        The desired state (specs, index, policies, generation) is one transaction in the
        ``{fleet}`` slot. Each agent's applied marker, in its own slot, is written just
        before it, so a message sent right after apply returns is accepted; the fleet
        events and the daemons' signal follow it (daemons also notice the generation).
        """
        k = self.keys
        agents = [r for r in records if r.kind == "Agent"]
        policies = [r for r in records if r.kind != "Agent"]  # QuotaPolicy, Model, ToolServer
        hashes = {"QuotaPolicy": k.policies, "Model": k.models, "ToolServer": k.toolservers}
        while True:
            async with self._r.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(k.generation, k.deleted)
                    current_agents = (
                        await pipe.hmget(k.index, [r.name for r in agents]) if agents else []
                    )
                    current_policies = [await pipe.hget(hashes[r.kind], r.name) for r in policies]
                    changes: list[AppliedChange] = []
                    for rec, cur in zip(agents, current_agents, strict=True):
                        old_hash = _s(cur).split(" ")[0] if cur else None
                        changes.append(
                            AppliedChange(rec.kind, rec.name, _verdict(old_hash, rec.spec_hash))
                        )
                    for rec, cur in zip(policies, current_policies, strict=True):
                        old_hash = json.loads(cur).get("_hash") if cur else None
                        changes.append(
                            AppliedChange(rec.kind, rec.name, _verdict(old_hash, rec.spec_hash))
                        )
                    touched = [c for c in changes if c.action != "unchanged"]
                    if dry_run:
                        await pipe.unwatch()
                        return changes
                    # An agent deleted and created again starts afresh, not with the old
                    # one's state: its old keys go before its new spec is written, and
                    # no daemon starts a deleted agent in between.
                    created = {
                        c.name for c in touched if c.kind == "Agent" and c.action == "created"
                    }
                    stale = created & {_s(n) for n in await pipe.smembers(k.deleted)}
                    for name in sorted(stale):
                        await self._purge_agent_keys(name, guard=False)
                    # Markers of unchanged agents too: a repair after an interrupted apply.
                    await self._write_markers(agents)
                    if not touched:
                        await pipe.unwatch()
                        return changes
                    pipe.multi()
                    if stale:
                        pipe.srem(k.deleted, *sorted(stale))
                    by_name = {(r.kind, r.name): r for r in records}
                    for change in touched:
                        rec = by_name[(change.kind, change.name)]
                        if rec.kind == "Agent":
                            pipe.hset(k.specs, rec.name, rec.body)
                            pipe.hset(k.index, rec.name, _index_entry(rec))
                        else:
                            body = json.loads(rec.body)
                            body["_hash"] = rec.spec_hash
                            pipe.hset(hashes[rec.kind], rec.name, json.dumps(body))
                    pipe.incr(k.generation)
                    await pipe.execute()
                    break
                except rexc.WatchError:
                    continue
        now = time.time()
        # A new agent is due at once (its first activation runs its start task); a
        # changed one too, so that its triggers' next fire times are computed again (a
        # daemon that holds it restarts it anyway, and the claim is dropped).
        for verdict, new in (("created", True), ("configured", False)):
            names = [c.name for c in touched if c.kind == "Agent" and c.action == verdict]
            for i in range(0, len(names), 5000):
                await steps.due_now(self.conn, names[i : i + 5000], now=now, new=new)
        await self._after_change(
            [
                (
                    c.name,
                    _event_fields(c.name, now, "Applied", c.action, f"{c.kind} {c.action}", ""),
                )
                for c in touched
            ],
            {"cmd": "applied", "agent": ""},
        )
        return changes

    async def _write_markers(self, agents: Sequence[SpecRecord]) -> None:
        if not agents:
            return
        async with self._r.pipeline(transaction=False) as pipe:
            for rec in agents:
                pipe.set(self.keys.applied(rec.name), _index_entry(rec))
            await pipe.execute()

    async def _after_change(
        self, events: Sequence[tuple[str, dict[str, str]]], signal: dict[str, str]
    ) -> None:
        """The fleet feed's copies of a change's events and the daemons' signal: after
        the change itself, in one pipeline (their shards are other slots)."""
        k = self.keys
        async with self._r.pipeline(transaction=False) as pipe:
            for name, fields in events:
                pipe.xadd(
                    k.fleet_events(k.feed_shard(name)),
                    fields,
                    maxlen=FLEET_EVENTS_MAXLEN,
                    approximate=True,
                )
            pipe.xadd(
                k.signals(k.signal_shard(signal["agent"])),
                signal,
                maxlen=SIGNALS_MAXLEN,
                approximate=True,
            )
            await pipe.execute()

    @translate
    async def delete(self, kind: str, name: str, *, purge_if_unowned: bool = True) -> bool:
        """Remove a resource from the desired state. Returns False if it did not exist.

        For an agent that no daemon holds, its keys (status, state, events, inbox,
        KV) go too; an owned agent's daemon stops it and removes them.
        """
        k = self.keys
        hashes = {"QuotaPolicy": k.policies, "Model": k.models, "ToolServer": k.toolservers}
        if kind in hashes:
            removed = await self._r.hdel(hashes[kind], name)
            if removed:
                await self._r.incr(k.generation)
            return bool(removed)
        # A name that is not applied changes nothing: no generation bump (every daemon
        # would reconcile), no "Deleted" event, no entry in the set of agents to purge.
        # WATCHed like apply, so an apply in between is either seen or retried.
        async with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(k.generation, k.deleted)
                    if not await pipe.hexists(k.specs, name):
                        await pipe.unwatch()
                        return False
                    # The marker first: from here on a send is refused, and nothing
                    # stops a purge. Its own slot, so not in the transaction; a retry
                    # after an apply in between deletes the new marker with the agent.
                    await self._r.delete(k.applied(name))
                    pipe.multi()
                    pipe.hdel(k.specs, name)
                    pipe.hdel(k.index, name)
                    pipe.sadd(k.deleted, name)
                    pipe.incr(k.generation)
                    await pipe.execute()
                    break
                except rexc.WatchError:
                    continue
        await self._after_change(
            [(name, _event_fields(name, time.time(), "Deleted", "delete", "Agent deleted", ""))],
            {"cmd": "deleted", "agent": name},
        )
        if purge_if_unowned and not await self._r.exists(k.lease(name)):
            await self.purge_agent(name)
        return True

    @translate
    async def purge_agent(self, name: str) -> bool:
        """Delete every runtime key of a deleted agent, snapshot and tasks included, in one
        transaction. Returns False, deleting nothing, when the agent is not deleted (any
        more): not listed in ``deleted``, or it has a spec or an applied marker again.

        A deleted agent's runner purges after its ``on_stop`` and grace period; by then
        the agent may have been applied again (``apply`` purged the old keys itself), and
        the keys are the new agent's: the marker, which apply writes before the spec and
        in the agent's own slot, guards them. Safe to retry: once purged, it is no
        longer listed.
        """
        k = self.keys
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.sismember(k.deleted, name)
            pipe.hexists(k.specs, name)
            listed, has_spec = await pipe.execute()
        if not listed or has_spec:
            return False
        if not await self._purge_agent_keys(name, guard=True):
            return False
        await steps.purge_waits(self.conn, name)  # its due entry too: another slot
        await self._r.srem(k.deleted, name)
        return True

    async def _purge_agent_keys(self, name: str, *, guard: bool) -> bool:
        """Delete the agent's keys in one transaction of its slot; with ``guard``, only
        while it has no applied marker. Returns whether they were deleted."""
        k = self.keys
        async with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(k.applied(name))
                    # GET, not EXISTS: the cluster pipeline splits EXISTS over slots and
                    # cannot run it inside a transaction.
                    if guard and await pipe.get(k.applied(name)) is not None:
                        await pipe.unwatch()
                        return False
                    keys = await self._purge_keys(pipe, name)
                    pipe.multi()
                    for i in range(0, len(keys), 500):
                        pipe.delete(*keys[i : i + 500])
                    await pipe.execute()
                    return True
                except rexc.WatchError:
                    continue

    async def _purge_keys(self, pipe: RawClient, name: str) -> list[str]:
        """WATCH what lists an agent's keys and read them: every key a purge deletes."""
        k = self.keys
        listing = [k.usage_days(name), k.tasks(name), k.kv_manifest(name), k.kv_pending(name)]
        await pipe.watch(*listing)
        days = [_s(d) for d in await pipe.smembers(k.usage_days(name))]
        ids = [_s(i) for i in await pipe.zrange(k.tasks(name), 0, -1)]
        # Two GETs, not MGET: redis-py's cluster pipeline refuses multi-key reads.
        manifest_raw = await pipe.get(k.kv_manifest(name))
        pending_raw = await pipe.get(k.kv_pending(name))
        return [
            *snapshot_keys(k, name, manifest_raw, pending_raw),
            *(k.usage(name, d) for d in days),
            *(k.task(name, t) for t in ids),
            *k.agent_keys(name),
        ]

    @translate
    async def upgrade_layout(self) -> int:
        """Bring a fleet written by an older agentos to this key layout; returns how many
        agents needed an applied marker. Cheap when there is nothing to do (one GET).

        Layout 2 (Redis Cluster support) added the per-agent applied markers that sends
        check; agents applied before it get theirs from the fleet index. The old
        single-key signal and event streams are left to expire with their fleet.

        Layout 3 (virtual agents) activates agents from the due index only: every agent
        applied before it is made due now, once (one held by a live daemon keeps running
        there; the claim is dropped).
        """
        k = self.keys
        layout = _s(await self._r.get(k.layout) or b"")
        if layout == LAYOUT:
            return 0
        index = {_s(a): _s(b) for a, b in (await self._r.hgetall(k.index)).items()}
        added = 0
        if layout < "2":
            async with self._r.pipeline(transaction=False) as pipe:
                for name, entry in index.items():
                    pipe.set(k.applied(name), entry, nx=True)
                added = sum(1 for ok in await pipe.execute() if ok)
        names = sorted(index)
        for i in range(0, len(names), 5000):
            await steps.due_now(self.conn, names[i : i + 5000], now=time.time(), new=True)
        await self._r.set(k.layout, LAYOUT)
        return added or len(names)

    @translate
    async def pending_purges(self) -> set[str]:
        """Deleted agents whose runtime keys are still there."""
        return {_s(n) for n in await self._r.smembers(self.keys.deleted)}

    @translate
    async def generation(self) -> int:
        """The fleet's desired-state generation; moves on every apply and delete."""
        return int(await self._r.get(self.keys.generation) or 0)

    @translate
    async def desired_index(self) -> dict[str, tuple[str, int]]:
        """Agent name -> (spec hash, priority), for every applied agent."""
        raw = await self._r.hgetall(self.keys.index)
        out: dict[str, tuple[str, int]] = {}
        for name, value in raw.items():
            spec_hash, _, rest = _s(value).partition(" ")
            out[_s(name)] = (spec_hash, int(rest.split(" ", 1)[0] or 50))
        return out

    @translate
    async def index_of(self, names: Sequence[str]) -> dict[str, tuple[str, int]]:
        """:meth:`desired_index` for ``names`` only (one HMGET; absent: not applied)."""
        if not names:
            return {}
        out: dict[str, tuple[str, int]] = {}
        for i in range(0, len(names), 5000):
            chunk = names[i : i + 5000]
            for name, value in zip(chunk, await self._r.hmget(self.keys.index, chunk), strict=True):
                if value is not None:
                    spec_hash, _, rest = _s(value).partition(" ")
                    out[name] = (spec_hash, int(rest.split(" ", 1)[0] or 50))
        return out

    @translate
    async def agent(self, name: str) -> dict[str, Any] | None:
        """The stored canonical Agent resource, or None when not applied."""
        raw = await self._r.hget(self.keys.specs, name)
        return json.loads(raw) if raw else None

    @translate
    async def agents(self) -> dict[str, dict[str, Any]]:
        """Every stored Agent resource by name."""
        raw = await self._r.hgetall(self.keys.specs)
        return {_s(n): json.loads(v) for n, v in raw.items()}

    @translate
    async def policies(self) -> dict[str, dict[str, Any]]:
        """Every stored QuotaPolicy resource by name."""
        raw = await self._r.hgetall(self.keys.policies)
        out = {}
        for n, v in raw.items():
            body = json.loads(v)
            body.pop("_hash", None)
            out[_s(n)] = body
        return out

    @translate
    async def toolservers(self) -> dict[str, dict[str, Any]]:
        """Every stored ToolServer resource by name."""
        raw = await self._r.hgetall(self.keys.toolservers)
        out = {}
        for n, v in raw.items():
            body = json.loads(v)
            body.pop("_hash", None)
            out[_s(n)] = body
        return out

    @translate
    async def agents_of(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Stored Agent resources of ``names`` (missing ones are left out)."""
        if not names:
            return {}
        raw = await self._r.hmget(self.keys.specs, list(names))
        return {n: json.loads(v) for n, v in zip(names, raw, strict=True) if v is not None}


def _verdict(old_hash: str | None, new_hash: str) -> str:
    if old_hash is None:
        return "created"
    return "unchanged" if old_hash == new_hash else "configured"


def _index_entry(rec: SpecRecord) -> str:
    """ "spec_hash priority [max_message_bytes [max_inbox_depth]]": what reconcile and
    checked sends read (``lua/inbox_send.lua``)."""
    entry = f"{rec.spec_hash} {rec.priority}"
    if rec.max_message_bytes is None:
        return entry
    entry = f"{entry} {rec.max_message_bytes}"
    return entry if rec.max_inbox_depth is None else f"{entry} {rec.max_inbox_depth}"
