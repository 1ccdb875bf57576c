"""The desired state in Redis: apply, delete and purge, and reading specs and policies back.

Everything `agentos apply` and `agentos delete` change, and everything a daemon reads to
decide what should run: the Agent specs and their index (hash and priority), the
QuotaPolicy documents, the fleet generation that moves on every change, and the set of
deleted agents whose runtime keys still have to go. Apply and purge are WATCHed
transactions, so an agent deleted and applied again never starts on the old one's state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from redis import exceptions as rexc

from agentos.store.errors import translate
from agentos.store.keys import Keys
from agentos.store.keys import event_fields as _event_fields
from agentos.store.records import FLEET_EVENTS_MAXLEN, SIGNALS_MAXLEN, AppliedChange, SpecRecord, _s
from agentos.store.snapshots import Snapshots

__all__ = ["SpecOps"]


class SpecOps:
    """Desired-state methods of :class:`agentos.store.Store` (mixed in; uses its client,
    keys and snapshots)."""

    _r: Any
    keys: Keys
    snapshots: Snapshots

    @translate
    async def apply(
        self, records: Sequence[SpecRecord], *, dry_run: bool = False
    ) -> list[AppliedChange]:
        """Store every record in one transaction, or none of them.

        Returns, per record, whether it was created, configured (changed) or left
        unchanged. With ``dry_run`` nothing is written. Bumps the fleet generation and
        signals the daemons when anything changed.
        """
        k = self.keys
        agents = [r for r in records if r.kind == "Agent"]
        policies = [r for r in records if r.kind != "Agent"]  # QuotaPolicy, Model
        hashes = {"QuotaPolicy": k.policies, "Model": k.models}
        async with self._r.pipeline(transaction=True) as pipe:
            while True:
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
                    if dry_run or not touched:
                        await pipe.unwatch()
                        return changes
                    # An agent deleted and created again starts afresh, not with the old
                    # one's state: its old keys go in the same transaction as the new
                    # spec, so no daemon can start it on the old state in between.
                    created = {
                        c.name for c in touched if c.kind == "Agent" and c.action == "created"
                    }
                    stale = created & {_s(n) for n in await pipe.smembers(k.deleted)}
                    purge: list[str] = []
                    for name in sorted(stale):
                        purge += await self._purge_keys(pipe, name)
                    pipe.multi()
                    if stale:
                        self._queue_purge(pipe, sorted(stale), purge)
                    now = time.time()
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
                        pipe.xadd(
                            k.fleet_events,
                            _event_fields(
                                rec.name,
                                now,
                                "Applied",
                                change.action,
                                f"{rec.kind} {change.action}",
                                "",
                            ),
                            maxlen=FLEET_EVENTS_MAXLEN,
                            approximate=True,
                        )
                    pipe.incr(k.generation)
                    pipe.xadd(
                        k.signals,
                        {"cmd": "applied", "agent": ""},
                        maxlen=SIGNALS_MAXLEN,
                        approximate=True,
                    )
                    await pipe.execute()
                    break
                except rexc.WatchError:
                    continue
        return changes

    @translate
    async def delete(self, kind: str, name: str, *, purge_if_unowned: bool = True) -> bool:
        """Remove a resource from the desired state. Returns False if it did not exist.

        For an agent that no daemon holds, its keys (status, state, events, inbox,
        KV) go too; an owned agent's daemon stops it and removes them.
        """
        k = self.keys
        if kind in ("QuotaPolicy", "Model"):
            removed = await self._r.hdel(k.policies if kind == "QuotaPolicy" else k.models, name)
            if removed:
                await self._r.incr(k.generation)
            return bool(removed)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hdel(k.specs, name)
            pipe.hdel(k.index, name)
            pipe.sadd(k.deleted, name)
            pipe.incr(k.generation)
            pipe.xadd(
                k.signals,
                {"cmd": "deleted", "agent": name},
                maxlen=SIGNALS_MAXLEN,
                approximate=True,
            )
            pipe.xadd(
                k.fleet_events,
                _event_fields(name, time.time(), "Deleted", "delete", "Agent deleted", ""),
                maxlen=FLEET_EVENTS_MAXLEN,
                approximate=True,
            )
            removed, *_ = await pipe.execute()
        if removed and purge_if_unowned and not await self._r.exists(k.lease(name)):
            await self.purge_agent(name)
        return bool(removed)

    @translate
    async def purge_agent(self, name: str) -> bool:
        """Delete every runtime key of a deleted agent, snapshot and tasks included, in one
        transaction. Returns False, deleting nothing, when the agent is not deleted (any
        more): not listed in ``deleted``, or it has a spec again.

        A deleted agent's runner purges after its ``on_stop`` and grace period; by then
        the agent may have been applied again (``apply`` purged the old keys itself), and
        the keys are the new agent's. Safe to retry: once purged, it is no longer listed.
        """
        k = self.keys
        async with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(k.deleted, k.specs)
                    listed = await pipe.sismember(k.deleted, name)
                    if not listed or await pipe.hexists(k.specs, name):
                        await pipe.unwatch()
                        return False
                    keys = await self._purge_keys(pipe, name)
                    pipe.multi()
                    self._queue_purge(pipe, [name], keys)
                    await pipe.execute()
                    return True
                except rexc.WatchError:
                    continue

    async def _purge_keys(self, pipe: Any, name: str) -> list[str]:
        """WATCH what lists an agent's keys and read them: every key a purge deletes."""
        k = self.keys
        listing = [k.usage_days(name), k.tasks(name), k.kv_manifest(name), k.kv_pending(name)]
        await pipe.watch(*listing)
        days = [_s(d) for d in await pipe.smembers(k.usage_days(name))]
        ids = [_s(i) for i in await pipe.zrange(k.tasks(name), 0, -1)]
        manifest_raw, pending_raw = await pipe.mget([k.kv_manifest(name), k.kv_pending(name)])
        return [
            *self.snapshots.keys_of(name, manifest_raw, pending_raw),
            *(k.usage(name, d) for d in days),
            *(k.task(name, t) for t in ids),
            *k.agent_keys(name),
        ]

    def _queue_purge(self, pipe: Any, names: Sequence[str], keys: Sequence[str]) -> None:
        # One transaction over the agent's slot and {fleet}: fine on a single Redis; on
        # Redis Cluster it has to be split per slot (the Cluster issue).
        for i in range(0, len(keys), 500):
            pipe.delete(*keys[i : i + 500])
        pipe.srem(self.keys.deleted, *names)

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
    async def agent_spec(self, name: str) -> dict[str, Any] | None:
        """The stored canonical Agent resource, or None when not applied."""
        raw = await self._r.hget(self.keys.specs, name)
        return json.loads(raw) if raw else None

    @translate
    async def agent_specs(self) -> dict[str, dict[str, Any]]:
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
    async def models(self) -> dict[str, dict[str, Any]]:
        """Every stored Model resource by name."""
        raw = await self._r.hgetall(self.keys.models)
        out = {}
        for n, v in raw.items():
            body = json.loads(v)
            body.pop("_hash", None)
            out[_s(n)] = body
        return out

    @translate
    async def agent_specs_of(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
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
    """ "spec_hash priority [max_message_bytes]": what reconcile and checked sends read."""
    entry = f"{rec.spec_hash} {rec.priority}"
    return entry if rec.max_message_bytes is None else f"{entry} {rec.max_message_bytes}"
