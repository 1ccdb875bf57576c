"""The engine's :class:`~agentos.engine.base.KVSnapshot` to the store's bytes and header, and back.

The :mod:`~agentos.store.snapshots` repository takes and returns bytes plus a header /
manifest and imports nothing of :mod:`agentos.engine`, so the store never depends on an
engine's types; the hibernator (and the snapshot tests) save and load through here.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentos.engine.base import KVSnapshot
from agentos.store.kvformat import Manifest, SnapshotHeader
from agentos.store.snapshots import LoadedSnapshot, SavedSnapshot, Snapshots

__all__ = ["KVSnapshot", "LoadedKV", "header_of", "load_snapshot", "save_snapshot", "snapshot_of"]


@dataclass(frozen=True, slots=True)
class LoadedKV:
    """:class:`~agentos.store.snapshots.LoadedSnapshot` with the engine's snapshot
    rebuilt (``snapshot``: None when there is none or it is invalid)."""

    snapshot: KVSnapshot | None
    manifest: Manifest | None
    tokens: tuple[int, ...]
    reason: str
    nbytes: int
    seconds: float
    conversation: bytes = b""


def header_of(snapshot: KVSnapshot) -> SnapshotHeader:
    """What the store keeps of a :class:`KVSnapshot` besides its bytes."""
    return SnapshotHeader(
        snapshot.fingerprint, tuple(snapshot.tokens), snapshot.n_kv, snapshot.conversation
    )


def snapshot_of(loaded: LoadedSnapshot) -> KVSnapshot | None:
    """The engine's snapshot from a valid load (None when it is not valid)."""
    manifest = loaded.manifest
    if loaded.data is None or manifest is None:
        return None
    return KVSnapshot(
        manifest.fingerprint,
        tuple(manifest.tokens),
        loaded.data,
        manifest.n_kv,
        manifest.conversation.encode("utf-8", "surrogateescape"),
    )


async def save_snapshot(
    snapshots: Snapshots,
    name: str,
    lease_value: str,
    snapshot: KVSnapshot,
    *,
    keep_kv: bool,
    reason: str = "",
) -> SavedSnapshot | None:
    """Write and commit the agent's KV snapshot; None when the lease is not ours."""
    return await snapshots.save(
        name, lease_value, snapshot.data, header_of(snapshot), keep_kv=keep_kv, reason=reason
    )


async def load_snapshot(snapshots: Snapshots, name: str) -> LoadedKV:
    """Read and verify the agent's snapshot (invalid ones come back with a reason)."""
    loaded = await snapshots.load(name)
    return LoadedKV(
        snapshot_of(loaded),
        loaded.manifest,
        loaded.tokens,
        loaded.reason,
        loaded.nbytes,
        loaded.seconds,
        loaded.conversation,
    )
