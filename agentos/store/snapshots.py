"""KV snapshots in Redis: chunks first, manifest last, so a half-written snapshot is never used.

A hibernated agent's engine state is tens of megabytes. It is written as ~1 MiB chunks
(pipelined) under a fresh snapshot id, then committed by one Lua script that checks the
lease, swaps the manifest and gives the previous snapshot's chunks a short TTL. That
clean-up is in the script because saves are retried after a lost reply: a commit that
was applied but never answered would otherwise leave the previous snapshot's chunks
(made permanent by their own commit) in Redis for good; the retry's commit in turn
expires the first attempt's. A TTL rather than DEL because a reader GETs the manifest,
then its chunks: one that got the old manifest just before the commit still finds them.

Every step that touches what another writer may own is fenced by the lease: the
pending marker is claimed under it (``kv_begin.lua``), chunks are written with a TTL
that only the commit removes, so a stale or dead writer's chunks expire on their own,
and a writer that lost the lease removes the marker only while it is still its own. A
snapshot is valid only when its manifest decodes and every chunk is present with the
size and XXH3-128 digest the manifest records, so a crash mid-write, a corrupt or
evicted chunk, or a manifest without chunks all read as "no valid snapshot" (with the
reason), and the wake falls back to re-prefilling the token history kept in the manifest.

Compression is off: zstd gained under 8% on this data (FACTS), not worth the CPU on wake.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec
import xxhash

from agentos.engine.base import KVSnapshot
from agentos.store.keys import Keys

__all__ = ["CHUNK_BYTES", "ChunkRef", "LoadedSnapshot", "Manifest", "SavedSnapshot", "Snapshots"]

CHUNK_BYTES = 1 << 20
FORMAT = 2
PENDING_TTL_S = 3600  # a snapshot not committed within this long is garbage
REPLACED_TTL_S = 60  # a replaced snapshot's chunks outlive it this long, for its readers


class ChunkRef(msgspec.Struct, frozen=True):
    """One chunk of a snapshot: its key, size and XXH3-128 digest."""

    key: str
    size: int
    digest: str


class Manifest(msgspec.Struct, frozen=True):
    """What makes a snapshot valid and what rebuilds it when the bytes cannot be used.

    Stays a msgpack map (not ``array_like``): ``kv_commit.lua`` reads ``chunks[].key``.
    """

    format: int
    id: str
    fingerprint: str  # engine build + cache layout: KV is only portable between equals
    n_tokens: int
    tokens: list[int]  # the whole token history, for re-prefill
    chunks: list[ChunkRef]  # empty when the KV bytes were not kept (keepKV said recompute)
    total_bytes: int
    kept_kv: bool
    created_at: float
    reason: str = ""
    n_kv: int | None = None  # leading tokens the KV covers (None: all)
    # The engine's chat state (its JSON: messages...), kept with or without KV. Text, not
    # bytes: kv_commit.lua's cmsgpack cannot decode msgpack's bin type.
    conversation: str = ""


class _Pending(msgspec.Struct, frozen=True):
    id: str
    n_chunks: int


@dataclass(frozen=True, slots=True)
class SavedSnapshot:
    """A committed snapshot and what writing it cost."""

    manifest: Manifest
    seconds: float


@dataclass(frozen=True, slots=True)
class LoadedSnapshot:
    """The result of reading a snapshot back.

    ``snapshot`` is None when there is none or it is invalid (``reason`` says why);
    ``tokens`` is the token history whenever the manifest was readable, even if the
    KV bytes were not (so a wake can still re-prefill).
    """

    snapshot: KVSnapshot | None
    manifest: Manifest | None
    tokens: tuple[int, ...]
    reason: str
    nbytes: int
    seconds: float
    conversation: bytes = b""  # the engine's chat state, whenever the manifest was readable


def _digest(data: bytes | memoryview) -> str:
    # XXH3-128 checks ~20 MB in well under a millisecond; BLAKE2b took ~45 ms, a third
    # of a wake. The threat is bit rot and partial writes, not an adversary.
    return str(xxhash.xxh3_128_hexdigest(data))


class Snapshots:
    """Save, load and delete KV snapshots through a redis-py asyncio client."""

    def __init__(
        self, client: Any, keys: Keys, commit_script: Any, begin_script: Any, release_script: Any
    ) -> None:
        self._r = client
        self._k = keys
        self._commit = commit_script
        self._begin = begin_script
        self._release = release_script  # compare-and-delete (lease_release.lua)

    async def save(
        self,
        name: str,
        lease_value: str,
        snapshot: KVSnapshot,
        *,
        keep_kv: bool,
        reason: str = "",
    ) -> SavedSnapshot | None:
        """Write and commit a snapshot. Returns None when the lease is no longer ours.

        With ``keep_kv`` False only the token history is stored (wake re-prefills).
        """
        started = time.perf_counter()
        k = self._k
        snap_id = uuid.uuid4().hex[:12]
        data = memoryview(snapshot.data or b"") if keep_kv else memoryview(b"")
        n_chunks = (len(data) + CHUNK_BYTES - 1) // CHUNK_BYTES
        pending = msgspec.msgpack.encode(_Pending(snap_id, n_chunks))
        # Claim the pending marker under the lease: a stale writer touches nothing, and
        # the marker it replaces names a dead (or superseded) writer's chunks.
        begun = await self._begin(
            keys=[k.lease(name), k.kv_pending(name)], args=[lease_value, pending, PENDING_TTL_S]
        )
        if not int(begun[0]):
            return None
        if len(begun) > 1 and begun[1]:
            await self._delete_chunks(_pending_chunks(k, name, begun[1]))
        chunks: list[ChunkRef] = []
        async with self._r.pipeline(transaction=False) as pipe:
            for i in range(n_chunks):
                part = data[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES]
                key = k.kv_chunk(name, snap_id, i)
                # Chunks expire unless committed: a writer that dies leaves nothing behind.
                pipe.set(key, part.tobytes(), ex=PENDING_TTL_S)
                chunks.append(ChunkRef(key, len(part), _digest(part)))
            await pipe.execute()
        manifest = Manifest(
            format=FORMAT,
            id=snap_id,
            fingerprint=snapshot.fingerprint,
            n_tokens=len(snapshot.tokens),
            tokens=list(snapshot.tokens),
            chunks=chunks,
            total_bytes=len(data),
            kept_kv=keep_kv and bool(data),
            created_at=time.time(),
            reason=reason,
            n_kv=snapshot.n_kv,
            conversation=snapshot.conversation.decode("utf-8", "surrogateescape"),
        )
        reply = await self._commit(
            keys=[k.lease(name), k.kv_manifest(name), k.kv_pending(name), *(c.key for c in chunks)],
            args=[lease_value, msgspec.msgpack.encode(manifest), REPLACED_TTL_S],
        )
        if not int(reply[0]):
            # Lost the lease meanwhile: drop our own chunks, and the marker only if it is
            # still ours (the new owner may have written its own since).
            await self._delete_chunks([c.key for c in chunks])
            await self._release(keys=[k.kv_pending(name)], args=[pending])
            return None
        return SavedSnapshot(manifest, time.perf_counter() - started)

    async def load(self, name: str) -> LoadedSnapshot:
        """Read and verify the committed snapshot; never raises for a bad snapshot."""
        started = time.perf_counter()

        def result(
            snapshot: KVSnapshot | None, manifest: Manifest | None, reason: str
        ) -> LoadedSnapshot:
            tokens = tuple(manifest.tokens) if manifest is not None else ()
            nbytes = len(snapshot.data or b"") if snapshot is not None else 0
            return LoadedSnapshot(
                snapshot,
                manifest,
                tokens,
                reason,
                nbytes,
                time.perf_counter() - started,
                manifest.conversation.encode("utf-8", "surrogateescape")
                if manifest is not None
                else b"",
            )

        raw = await self._r.get(self._k.kv_manifest(name))
        if raw is None:
            return result(None, None, "no snapshot")
        manifest = _decode_manifest(raw)
        if manifest is None:
            return result(None, None, "snapshot manifest unreadable")
        if not manifest.kept_kv:
            return result(
                None, manifest, "KV not kept" + (f" ({manifest.reason})" if manifest.reason else "")
            )
        parts = await self._r.mget([c.key for c in manifest.chunks]) if manifest.chunks else []
        for i, (ref, part) in enumerate(zip(manifest.chunks, parts, strict=True)):
            if part is None:
                return result(None, manifest, f"chunk {i} of {len(manifest.chunks)} missing")
            if len(part) != ref.size or _digest(part) != ref.digest:
                return result(None, manifest, f"chunk {i} of {len(manifest.chunks)} corrupt")
        data = b"".join(parts)  # one copy
        if len(data) != manifest.total_bytes:
            return result(None, manifest, "snapshot size does not match its manifest")
        snapshot = KVSnapshot(
            manifest.fingerprint,
            tuple(manifest.tokens),
            data,
            manifest.n_kv,
            manifest.conversation.encode("utf-8", "surrogateescape"),
        )
        return result(snapshot, manifest, "valid")

    async def manifest(self, name: str) -> Manifest | None:
        """The committed manifest alone (for `describe`), or None."""
        raw = await self._r.get(self._k.kv_manifest(name))
        return None if raw is None else _decode_manifest(raw)

    async def delete(self, name: str) -> None:
        """Remove the snapshot, its chunks and any half-written one (unfenced: for purges)."""
        k = self._k
        manifest_raw, pending_raw = await self._r.mget([k.kv_manifest(name), k.kv_pending(name)])
        keys = self.keys_of(name, manifest_raw, pending_raw)
        await self._delete_chunks(keys)

    def keys_of(
        self, name: str, manifest_raw: bytes | None, pending_raw: bytes | None
    ) -> list[str]:
        """Every key of the agent's snapshots, given its manifest and pending marker values:
        the committed chunks, a half-written snapshot's chunks, the manifest, the marker."""
        k = self._k
        keys = [k.kv_manifest(name), k.kv_pending(name)]
        manifest = _decode_manifest(manifest_raw) if manifest_raw is not None else None
        if manifest is not None:
            keys += [c.key for c in manifest.chunks]
        if pending_raw is not None:
            keys += _pending_chunks(k, name, pending_raw)
        return keys

    async def _delete_chunks(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 256):
            await self._r.delete(*keys[i : i + 256])


def _pending_chunks(k: Keys, name: str, raw: bytes) -> list[str]:
    try:
        pending = msgspec.msgpack.decode(raw, type=_Pending)
    except msgspec.DecodeError:
        return []
    return [k.kv_chunk(name, pending.id, i) for i in range(pending.n_chunks)]


def _decode_manifest(raw: bytes) -> Manifest | None:
    try:
        manifest = msgspec.msgpack.decode(raw, type=Manifest)
    except msgspec.DecodeError:
        return None
    return manifest if manifest.format == FORMAT else None
