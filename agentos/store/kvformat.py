"""The stored form of a KV snapshot: its manifest, chunk references and pending marker.

Kept apart from the :mod:`~agentos.store.snapshots` repository because purging an
agent (:mod:`~agentos.store.specs`) must list a snapshot's keys without loading it, and
the manifest is also what the store hands back instead of an engine type: the engine
gives bytes and a :class:`SnapshotHeader`, and gets bytes and a :class:`Manifest`.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import xxhash

from agentos.store.keys import Keys

__all__ = [
    "FORMAT",
    "ChunkRef",
    "Manifest",
    "SnapshotHeader",
    "decode_manifest",
    "digest",
    "pending_chunks",
    "snapshot_keys",
]

FORMAT = 2


@dataclass(frozen=True, slots=True)
class SnapshotHeader:
    """What the engine says about the KV bytes it exported: the engine build
    (``fingerprint``), the token history, how many leading tokens the bytes cover
    (``n_kv``, None: all) and its chat state (``conversation``)."""

    fingerprint: str
    tokens: tuple[int, ...]
    n_kv: int | None = None
    conversation: bytes = b""


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


class Pending(msgspec.Struct, frozen=True):
    id: str
    n_chunks: int


def digest(data: bytes | memoryview) -> str:
    # XXH3-128 checks ~20 MB in well under a millisecond; BLAKE2b took ~45 ms, a third
    # of a wake. The threat is bit rot and partial writes, not an adversary.
    return str(xxhash.xxh3_128_hexdigest(data))


def snapshot_keys(
    k: Keys, name: str, manifest_raw: bytes | None, pending_raw: bytes | None
) -> list[str]:
    """Every key of the agent's snapshots, given its manifest and pending marker values:
    the committed chunks, a half-written snapshot's chunks, the manifest, the marker."""
    keys = [k.kv_manifest(name), k.kv_pending(name)]
    manifest = decode_manifest(manifest_raw) if manifest_raw is not None else None
    if manifest is not None:
        keys += [c.key for c in manifest.chunks]
    if pending_raw is not None:
        keys += pending_chunks(k, name, pending_raw)
    return keys


def pending_chunks(k: Keys, name: str, raw: bytes) -> list[str]:
    try:
        pending = msgspec.msgpack.decode(raw, type=Pending)
    except msgspec.DecodeError:
        return []
    return [k.kv_chunk(name, pending.id, i) for i in range(pending.n_chunks)]


def decode_manifest(raw: bytes) -> Manifest | None:
    try:
        manifest = msgspec.msgpack.decode(raw, type=Manifest)
    except msgspec.DecodeError:
        return None
    return manifest if manifest.format == FORMAT else None
