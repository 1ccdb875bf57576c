"""Script calls made in the same event-loop tick go to Redis in one pipeline.

A daemon runs thousands of agents on one event loop, and most of what they do ends in
one Lua script call of their own (a fenced write, a send). Sent one by one, each costs
a round trip, a socket write and a read on both sides; a burst of 10,000 agents starting
or stopping, or 20 busy agents answering messages, then spends its time in syscalls.
:class:`ScriptBatcher` lets every caller of one tick join a single non-transactional
pipeline: each call is still its own atomic script with its own reply (and its own
error), only the trip is shared. The first caller of a tick yields once so the others
can join, then sends the batch; the rest wait for it. Nothing is retried here: a caller
whose call failed sees the error and retries under the store's one retry policy.

Pipelines call scripts by ``EVALSHA`` directly: redis-py's pipelined ``Script`` objects
ask ``SCRIPT EXISTS`` first, a round trip of its own on every batch. A server that lost
its scripts (restarted, flushed) answers ``NOSCRIPT``; those calls (nothing of them ran)
are sent again after the script is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
from redis import exceptions as rexc
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from agentos.store.raw import RawArg, RawClient, RawReply

__all__ = ["ScriptBatcher", "raise_first", "run_many"]

MAX_BATCH = 1000  # calls per pipeline: bounds one reply's size and the loop's pause


@dataclass(slots=True)
class _Call:
    script: AsyncScript | None  # None: ``args`` is a plain command
    keys: Sequence[str]
    args: Sequence[RawArg]
    reply: RawReply = None
    error: BaseException | None = None


@dataclass(slots=True)
class _Batch:
    calls: list[_Call] = field(default_factory=list)
    done: anyio.Event = field(default_factory=anyio.Event)


async def run_many(
    client: RawClient,
    script: AsyncScript,
    calls: Sequence[tuple[Sequence[str], Sequence[RawArg]]],
) -> list[RawReply]:
    """Run ``script`` once per (keys, args) in as few pipelines as it takes; returns each
    call's reply, or its error as an exception object in its place."""
    batch = [_Call(script, keys, args) for keys, args in calls]
    await _run_calls(client, batch)
    return [c.error if c.error is not None else c.reply for c in batch]


def raise_first(replies: list[RawReply]) -> list[RawReply]:
    """``replies`` of :func:`run_many`, or the first error among them raised."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def _by_node(client: RawClient, calls: Sequence[_Call]) -> list[list[_Call]]:
    """On a cluster, ``calls`` grouped by the node that serves their first key.

    redis-py's cluster pipeline fails as a whole when one node cannot be reached (the
    connection error escapes the per-command results), so one dead master would fail
    the calls for every other master too: a pipeline per node keeps them apart.
    """
    if not isinstance(client, RedisCluster):
        return [list(calls)]
    groups: dict[str, list[_Call]] = {}
    for c in calls:
        key = c.keys[0] if c.keys else (c.args[1] if len(c.args) > 1 else None)
        try:
            found = client.get_node_from_key(key) if key is not None else None
        except Exception:  # no slot map yet: let the pipeline route it
            found = None
        groups.setdefault(found.name if found is not None else "", []).append(c)
    return list(groups.values())


async def _run_calls(client: RawClient, calls: Sequence[_Call]) -> None:
    """Run ``calls`` in pipelines of at most :data:`MAX_BATCH` (one per node on a
    cluster, concurrently), storing each one's reply or error on it (a connection error
    goes to every call of its pipeline)."""
    groups = _by_node(client, calls)
    if len(groups) == 1:
        await _run_group(client, groups[0])
        return
    async with anyio.create_task_group() as tg:
        for group in groups:
            tg.start_soon(_run_group, client, group)


async def _run_group(client: RawClient, calls: Sequence[_Call]) -> None:
    for start in range(0, len(calls), MAX_BATCH):
        chunk = list(calls[start : start + MAX_BATCH])
        for attempt in range(2):
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for c in chunk:
                        # execute_command, not evalsha(): redis-py's cluster pipeline
                        # refuses the evalsha method but routes the command by its keys.
                        if c.script is None:
                            pipe.execute_command(*c.args)
                        else:
                            pipe.execute_command(
                                "EVALSHA", c.script.sha, len(c.keys), *c.keys, *c.args
                            )
                    replies = await pipe.execute(raise_on_error=False)
            except Exception as e:
                for c in chunk:
                    c.error = e
                break
            missing = []
            for c, reply in zip(chunk, replies, strict=True):
                if isinstance(reply, rexc.NoScriptError) and attempt == 0:
                    missing.append(c)
                elif isinstance(reply, Exception):
                    c.error = reply
                else:
                    c.reply = reply
            if not missing:
                break
            try:
                for script in {id(c.script): c.script for c in missing}.values():
                    if script is not None:
                        script.sha = await client.script_load(script.script)
            except Exception as e:
                for c in missing:
                    c.error = e
                break
            chunk = missing


class ScriptBatcher:
    """Joins the script calls of one event-loop tick into one pipeline."""

    def __init__(self, client: RawClient) -> None:
        self._client = client
        self._open: _Batch | None = None

    async def command(self, *args: RawArg) -> RawReply:
        """Send one plain command (its key first after the name) in this tick's pipeline."""
        return await self.run(None, (), args)

    async def run(
        self, script: AsyncScript | None, keys: Sequence[str], args: Sequence[RawArg]
    ) -> RawReply:
        """Run ``script`` with ``keys`` and ``args``, in this tick's pipeline; returns its
        reply or raises its error (redis-py's exceptions, as a direct call would)."""
        call = _Call(script, keys, args)
        batch = self._open
        if batch is not None:
            batch.calls.append(call)
            with anyio.CancelScope(shield=True):  # the batch is sent; wait for the reply
                await batch.done.wait()
        else:
            batch = self._open = _Batch([call])
            with anyio.CancelScope(shield=True):
                try:
                    await anyio.lowlevel.checkpoint()  # let this tick's other callers join
                    self._open = None
                    await _run_calls(self._client, batch.calls)
                finally:
                    if self._open is batch:
                        self._open = None
                    batch.done.set()
        if call.error is not None:
            raise call.error
        return call.reply
