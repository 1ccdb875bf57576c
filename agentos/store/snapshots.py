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

The store never sees an engine type: it takes the KV bytes and a
:class:`~agentos.store.kvformat.SnapshotHeader`, and gives back the bytes and the
:class:`~agentos.store.kvformat.Manifest` (:mod:`agentos.store.kvformat`).

Compression is off: zstd gained under 8% on this data (FACTS), not worth the CPU on wake.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import msgspec

from agentos.store.conn import Conn
from agentos.store.errors import translate
from agentos.store.kvformat import (
    FORMAT,
    ChunkRef,
    Manifest,
    Pending,
    SnapshotHeader,
    decode_manifest,
    digest,
    pending_chunks,
    snapshot_keys,
)

__all__ = [
    "CHUNK_BYTES",
    "ChunkRef",
    "LoadedSnapshot",
    "Manifest",
    "SavedSnapshot",
    "SnapshotHeader",
    "Snapshots",
]

CHUNK_BYTES = 1 << 20
PENDING_TTL_S = 3600  # a snapshot not committed within this long is garbage
REPLACED_TTL_S = 60  # a replaced snapshot's chunks outlive it this long, for its readers


@dataclass(frozen=True, slots=True)
class SavedSnapshot:
    """A committed snapshot and what writing it cost."""

    manifest: Manifest
    seconds: float


@dataclass(frozen=True, slots=True)
class LoadedSnapshot:
    """The result of reading a snapshot back.

    ``data`` (the KV bytes) is None when there is no snapshot or it is invalid
    (``reason`` says why); ``tokens`` is the token history whenever the manifest was
    readable, even if the KV bytes were not (so a wake can still re-prefill). With
    ``data`` the manifest rebuilds the engine's snapshot (its fingerprint, ``n_kv``).
    """

    data: bytes | None
    manifest: Manifest | None
    tokens: tuple[int, ...]
    reason: str
    nbytes: int
    seconds: float
    conversation: bytes = b""  # the engine's chat state, whenever the manifest was readable


class Snapshots:
    """Save, load and delete KV snapshots (``store.snapshots``)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._r = conn.r
        self._k = conn.keys
        self._commit = conn.scripts.kv_commit
        self._begin = conn.scripts.kv_begin
        self._release = conn.scripts.lease_release  # compare-and-delete

    @translate
    async def save(
        self,
        name: str,
        lease_value: str,
        data: bytes | None,
        header: SnapshotHeader,
        *,
        keep_kv: bool,
        reason: str = "",
    ) -> SavedSnapshot | None:
        """Write and commit a snapshot of ``data`` (the KV bytes, None when the engine
        cannot export them) described by ``header``. Returns None when the lease is no
        longer ours. With ``keep_kv`` False only the token history is stored (wake
        re-prefills).
        """
        started = time.perf_counter()
        k = self._k
        snap_id = uuid.uuid4().hex[:12]
        view = memoryview(data or b"") if keep_kv else memoryview(b"")
        n_chunks = (len(view) + CHUNK_BYTES - 1) // CHUNK_BYTES
        pending = msgspec.msgpack.encode(Pending(snap_id, n_chunks))
        # Claim the pending marker under the lease: a stale writer touches nothing, and
        # the marker it replaces names a dead (or superseded) writer's chunks.
        begun = await self._begin(
            keys=[k.lease(name), k.kv_pending(name)], args=[lease_value, pending, PENDING_TTL_S]
        )
        if not int(begun[0]):
            return None
        if len(begun) > 1 and begun[1]:
            await self._delete_chunks(pending_chunks(k, name, begun[1]))
        chunks: list[ChunkRef] = []
        async with self._r.pipeline(transaction=False) as pipe:
            for i in range(n_chunks):
                part = view[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES]
                key = k.kv_chunk(name, snap_id, i)
                # Chunks expire unless committed: a writer that dies leaves nothing behind.
                pipe.set(key, part.tobytes(), ex=PENDING_TTL_S)
                chunks.append(ChunkRef(key, len(part), digest(part)))
            await pipe.execute()
        manifest = Manifest(
            format=FORMAT,
            id=snap_id,
            fingerprint=header.fingerprint,
            n_tokens=len(header.tokens),
            tokens=list(header.tokens),
            chunks=chunks,
            total_bytes=len(view),
            kept_kv=keep_kv and bool(view),
            created_at=time.time(),
            reason=reason,
            n_kv=header.n_kv,
            conversation=header.conversation.decode("utf-8", "surrogateescape"),
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

    @translate
    async def load(self, name: str) -> LoadedSnapshot:
        """Read and verify the committed snapshot; never raises for a bad snapshot."""
        started = time.perf_counter()

        def result(data: bytes | None, manifest: Manifest | None, reason: str) -> LoadedSnapshot:
            tokens = tuple(manifest.tokens) if manifest is not None else ()
            nbytes = len(data) if data is not None else 0
            return LoadedSnapshot(
                data,
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
        manifest = decode_manifest(raw)
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
            if len(part) != ref.size or digest(part) != ref.digest:
                return result(None, manifest, f"chunk {i} of {len(manifest.chunks)} corrupt")
        data = b"".join(parts)  # one copy
        if len(data) != manifest.total_bytes:
            return result(None, manifest, "snapshot size does not match its manifest")
        return result(data, manifest, "valid")

    @translate
    async def manifest(self, name: str) -> Manifest | None:
        """The committed manifest alone (for `describe`), or None."""
        raw = await self._r.get(self._k.kv_manifest(name))
        return None if raw is None else decode_manifest(raw)

    @translate
    async def delete(self, name: str) -> None:
        """Remove the snapshot, its chunks and any half-written one (unfenced: for purges)."""
        k = self._k
        manifest_raw, pending_raw = await self._r.mget([k.kv_manifest(name), k.kv_pending(name)])
        keys = snapshot_keys(k, name, manifest_raw, pending_raw)
        await self._delete_chunks(keys)

    async def _delete_chunks(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 256):
            await self._r.delete(*keys[i : i + 256])
