"""Reading a stream that is split over several keys (shards) as if it were one.

The fleet event feed and the daemons' signal stream are written by every agent, so they
are sharded over hash tags (see :mod:`agentos.store.keys`) to spread that traffic over a
cluster's masters. Readers still want one feed, in order, with one resumable position:
this module merges the shards by entry id (ids are times, so the merge is in time order
across shards, and exact within one, which holds every event of one agent) and hands out
a *cursor* — the last id read from each shard, comma-separated — where a single stream
would hand out an entry id. Each entry comes back with the cursor that resumes right
after it, so a caller that kept the last entry's "id" resumes without change.

On one Redis a blocking read covers every shard in one ``XREAD``. On a cluster one
command may only name keys of one slot: several shards are read with one non-blocking
``XREAD`` each (pipelined, in parallel over the nodes) and polled, while a blocking read
of a single shard stays a real ``XREAD BLOCK`` (the daemons keep one reader per signal
shard for that reason).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import anyio

from agentos.store.raw import RawClient
from agentos.store.records import _s

__all__ = ["POLL_S", "Entry", "latest", "read_after", "tail"]

POLL_S = 0.25  # how often a multi-shard read on a cluster looks again while it blocks
Entry = tuple[str, int, str, dict[str, str]]  # (cursor after it, shard, entry id, fields)


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def parse_cursor(cursor: str, shards: int) -> list[str]:
    """The per-shard ids of ``cursor``. A plain entry id (a position in a stream from
    before the split, or "0-0") applies to every shard."""
    parts = cursor.split(",")
    if len(parts) == shards:
        return parts
    if len(parts) == 1:
        return parts * shards
    raise ValueError(f"invalid stream cursor {cursor!r}: expected {shards} comma-separated ids")


Order = Callable[[tuple[int, int], dict[str, str]], Any]


def _by_id(key: tuple[int, int], fields: dict[str, str]) -> Any:
    return key


def _flatten(found: Sequence[Sequence[tuple[Any, Any]]], order: Order) -> list[Any]:
    """Every entry of every shard as (order key, shard, id, fields), in order."""
    items = []
    for shard, entries in enumerate(found):
        for entry_id, raw in entries:
            eid = _s(entry_id)
            fields = {_s(a): _s(b) for a, b in raw.items()}
            items.append((order(_key(eid), fields), shard, eid, fields))
    items.sort(key=lambda item: (item[0], item[1]))
    return items


def _walk(base: list[str], items: list[Any]) -> list[Entry]:
    """Each entry with the cursor that resumes after it (a shard's position only moves
    forward, whatever the order across shards)."""
    cursor = list(base)
    out: list[Entry] = []
    for _, shard, entry_id, fields in items:
        if _key(entry_id) > _key(cursor[shard]):
            cursor[shard] = entry_id
        out.append((",".join(cursor), shard, entry_id, fields))
    return out


async def tail(
    client: RawClient, streams: Sequence[str], count: int, *, order: Order = _by_id
) -> list[Entry]:
    """The newest ``count`` entries over all ``streams``, oldest first, in ``order``
    (entry ids by default; two shards' ids tie within a millisecond)."""
    async with client.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xrevrange(stream, count=count)
        replies = await pipe.execute()
    items = _flatten([list(r) for r in replies], order)
    cut = max(0, len(items) - count)
    base = ["0-0"] * len(streams)
    for _, shard, entry_id, _ in items[:cut]:  # older than the window: already "read"
        if _key(entry_id) > _key(base[shard]):
            base[shard] = entry_id
    return _walk(base, items[cut:])


async def latest(client: RawClient, streams: Sequence[str]) -> str:
    """A cursor at the newest entry of every shard: where a new reader starts."""
    async with client.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xrevrange(stream, count=1)
        replies = await pipe.execute()
    return ",".join(_s(r[0][0]) if r else "0-0" for r in replies)


async def read_after(
    client: RawClient,
    streams: Sequence[str],
    cursor: str,
    *,
    count: int,
    block_ms: int | None = None,
    cluster: bool = False,
    order: Order = _by_id,
    poll_s: float = POLL_S,
) -> list[Entry]:
    """Entries after ``cursor`` (at most ``count`` per shard), waiting up to
    ``block_ms`` for the first when given."""
    base = parse_cursor(cursor, len(streams))
    if not cluster:
        reply = await client.xread(
            dict(zip(streams, base, strict=True)), count=count, block=block_ms
        )
        found: list[list[tuple[Any, Any]]] = [[] for _ in streams]
        index = {s: i for i, s in enumerate(streams)}
        for stream, entries in reply or []:
            found[index[_s(stream)]] = list(entries)
        return _walk(base, _flatten(found, order))
    if len(streams) == 1:  # one slot: a real blocking read
        reply = await client.xread({streams[0]: base[0]}, count=count, block=block_ms)
        return _walk(base, _flatten([list(reply[0][1]) if reply else []], order))
    waited = 0.0
    while True:
        # XRANGE after each shard's position (its key has a fixed position, so the
        # cluster client routes it without asking a node for the keys first).
        async with client.pipeline(transaction=False) as pipe:
            for stream, after in zip(streams, base, strict=True):
                pipe.xrange(stream, min=f"({after}", count=count)
            replies = await pipe.execute()
        found = [list(r) for r in replies]
        if any(found) or not block_ms or waited * 1000 >= block_ms:
            return _walk(base, _flatten(found, order))
        step = min(poll_s, block_ms / 1000 - waited)
        await anyio.sleep(step)
        waited += step
