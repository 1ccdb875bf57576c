"""The state of the ``sim`` engine: a session's context, the counters, the KV blob.

:class:`~agentos.engine.sim.SimEngine` keeps these; they live apart from it so that its
collaborators (:mod:`.chat`, :mod:`.turns`) use them without importing the engine.

The context is the token list with a running hash of it (the continuation is a pure
function of the seed and that hash), plus the chat so far. The blob is a function of the
tokens and the engine's configuration, with a header (magic, configuration digest, token
count, checksum), so an import can tell a foreign, truncated or edited snapshot from a
good one byte for byte, as llama.cpp's state loading would refuse it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agentos.core.chat import ToolSpec
from agentos.engine.base import KVSnapshot

__all__ = [
    "KV_FORMAT_VERSION",
    "MIN_KV_BYTES_PER_TOKEN",
    "SimSession",
    "SimStats",
    "fingerprint",
    "kv_blob",
    "kv_problem",
    "pack",
    "reject_reason",
]

_KV_MAGIC = b"AOSIMKV1"
# magic, fingerprint digest, token count, checksum of tokens + body.
_KV_HEADER = struct.Struct("<8s16sQ32s")
KV_FORMAT_VERSION = 1
MIN_KV_BYTES_PER_TOKEN = _KV_HEADER.size


@dataclass(slots=True)
class SimStats:
    """Counters for tests and the runtime's metrics; they only ever grow."""

    prefill_tokens: int = 0  # prompt tokens prefilled by stream/generate/chat plus prefill()
    decode_tokens: int = 0  # tokens sampled (a chat's: its reply's rendered tokens)
    generations: int = 0  # stream/generate calls that started
    chats: int = 0  # chat calls that returned a reply
    exports: int = 0
    imports_accepted: int = 0
    imports_rejected: int = 0
    last_reject_reason: str | None = None  # why the latest rejected import_kv said False


@dataclass(slots=True, eq=False)
class SimSession:
    session_id: str = ""
    tokens: list[int] = field(default_factory=list)
    # Running hash of ``tokens``; None after the window slid, rebuilt on demand.
    hasher: hashlib.blake2b | None = field(default_factory=lambda: hashlib.blake2b(digest_size=32))
    busy: str | None = None  # the call in flight under parallel=N, named in errors
    messages: list[dict[str, Any]] = field(default_factory=list)  # the chat so far
    # The tools the rendered conversation describes; None before its first chat.
    described: list[ToolSpec] | None = None

    def extend(self, ids: Sequence[int], n_ctx: int) -> None:
        self.tokens.extend(ids)
        if len(self.tokens) > n_ctx:
            del self.tokens[: len(self.tokens) - n_ctx]
            self.hasher = None
        elif self.hasher is not None:
            self.hasher.update(pack(ids))

    def clear(self) -> None:
        self.tokens.clear()
        self.hasher = hashlib.blake2b(digest_size=32)
        self.messages = []
        self.described = None

    def fork(self) -> hashlib.blake2b:
        """A copy of the running hash, to sample ahead without touching the context."""
        if self.hasher is None:
            self.hasher = hashlib.blake2b(pack(self.tokens), digest_size=32)
        return self.hasher.copy()

    def rewind(self, tokens: list[int], hasher: hashlib.blake2b | None) -> None:
        """Put back a context saved before a call that failed."""
        self.tokens[:] = tokens
        self.hasher = hasher

    def digest(self) -> bytes:
        if self.hasher is None:
            self.hasher = hashlib.blake2b(pack(self.tokens), digest_size=32)
        return self.hasher.digest()


def pack(ids: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(ids)}I", *ids)


def kv_blob(tokens: Sequence[int], bytes_per_token: int, key: bytes) -> bytes:
    """The KV bytes of ``tokens`` for an engine whose configuration digest is ``key``."""
    # Each token contributes a block derived from its id, so the blob is a function of
    # the token sequence and any edit to either side shows up in the comparison.
    if not tokens:
        return b""
    reps = -(-bytes_per_token // 64)
    body = b"".join(
        (hashlib.blake2b(struct.pack("<I", t), key=key, digest_size=64).digest() * reps)[
            :bytes_per_token
        ]
        for t in tokens
    )
    rest = body[_KV_HEADER.size :]
    checksum = hashlib.blake2b(pack(tokens) + rest, digest_size=32).digest()
    return _KV_HEADER.pack(_KV_MAGIC, key, len(tokens), checksum) + rest


def kv_problem(data: bytes, tokens: Sequence[int], key: bytes) -> str | None:
    """What is wrong with ``data`` as the blob of ``tokens`` (its length already checked);
    None when it is exactly what :func:`kv_blob` writes."""
    if not tokens:
        return None
    magic, fp, count, _ = _KV_HEADER.unpack_from(data)
    if magic != _KV_MAGIC:
        return "bad magic"
    if fp != key:
        return "data was written by another engine configuration"
    if count != len(tokens):
        return f"data holds {count} tokens, snapshot lists {len(tokens)}"
    if data != kv_blob(tokens, len(data) // len(tokens), key):
        return "data does not match the tokens (corrupt or edited)"
    return None


def reject_reason(
    snapshot: KVSnapshot,
    *,
    fingerprint: str,
    n_ctx: int,
    vocab_size: int,
    kv_bytes_per_token: int,
    key: bytes,
) -> str | None:
    """Why ``snapshot`` cannot be imported by an engine so configured (None: it can)."""
    if snapshot.fingerprint != fingerprint:
        return f"fingerprint {snapshot.fingerprint!r} != {fingerprint!r}"
    data = snapshot.data
    if data is None:
        return "snapshot has no KV data"
    n = len(snapshot.tokens)
    if n > n_ctx:
        return f"{n} tokens exceed n_ctx {n_ctx}"
    if any(not 0 <= t < vocab_size for t in snapshot.tokens):
        return "token id out of vocabulary"
    if len(data) != n * kv_bytes_per_token:
        return f"data is {len(data)} bytes, expected {n * kv_bytes_per_token}"
    return kv_problem(data, snapshot.tokens, key)


def fingerprint(
    *, model: str, seed: int, n_ctx: int, kv_bytes_per_token: int, vocab_size: int
) -> str:
    """What must be equal for a snapshot to be imported: the blob's format and every
    option the context and the blob depend on."""
    config = f"{KV_FORMAT_VERSION}|{model}|{seed}|{n_ctx}|{kv_bytes_per_token}|{vocab_size}"
    return "sim:" + hashlib.blake2b(config.encode(), digest_size=8).hexdigest()
