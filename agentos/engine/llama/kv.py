"""A ``llama`` session's KV as bytes: what hibernation exports and waking imports back.

Only the session's own sequence is exported (``llama_state_seq_get_data``), and an
import may land in any free slot. Snapshots are checked before llama.cpp sees them
(fingerprint, size, vocabulary), and after: the restored positions must match the
token history. llama.cpp does not checksum tensor data, so the snapshot store must.
Both functions run in a worker thread holding the engine's lock.
"""

from __future__ import annotations

import hashlib
import json

import llama_cpp

from agentos.engine.base import EngineError, KVSnapshot
from agentos.engine.llama.native import LOG_TAIL, LlamaContext, last_llama_error
from agentos.engine.llama.state import Session

__all__ = ["export_seq", "fingerprint", "import_seq", "reject_reason"]

_KV_FORMAT = 1  # bump when the meaning of exported bytes changes on our side


def fingerprint(native: LlamaContext, *, model: str, model_sha256: str, n_ctx: int) -> str:
    """What must be equal for a snapshot to be portable: the model's sha256, the
    llama-cpp-python version, n_ctx, cache types, flash attention, swa_full,
    kv_unified and n_seq_max."""
    p = native.params
    fields = {
        "format": _KV_FORMAT,
        "model_sha256": model_sha256,
        "llama_cpp": llama_cpp.__version__,
        "n_ctx": n_ctx,
        "type_k": int(p.type_k),
        "type_v": int(p.type_v),
        "flash_attn": int(p.flash_attn_type),
        "swa_full": bool(p.swa_full),
        "kv_unified": bool(p.kv_unified),
        "n_seq_max": int(p.n_seq_max),
    }
    digest = hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=12)
    return f"llama:{model}:{digest.hexdigest()}"


def export_seq(native: LlamaContext, session: Session) -> tuple[tuple[int, ...], bytes, int]:
    """The session's tokens, its sequence's state bytes and how many tokens they hold."""
    # The last sampled token is not decoded here: it stays pending in the snapshot's
    # token list and is decoded with the next prompt after import, in the same batch
    # as in a session that never slept, so the continuation is bit-identical (decoding
    # it alone here would round differently and greedy output could branch).
    data = native.seq_get(session.seq)
    if not data and session.tokens:
        raise EngineError(f"llama.cpp could not export session {session.session_id!r}")
    return tuple(session.tokens), data, session.n_kv


def reject_reason(
    snapshot: KVSnapshot, *, fingerprint: str, n_ctx: int, n_vocab: int
) -> str | None:
    """Why ``snapshot`` cannot be imported here (None: try it)."""
    if snapshot.fingerprint != fingerprint:
        return f"fingerprint {snapshot.fingerprint!r} != {fingerprint!r}"
    if snapshot.data is None:
        return "snapshot has no KV data"
    n = len(snapshot.tokens)
    if n > n_ctx:
        return f"{n} tokens exceed n_ctx {n_ctx}"
    if any(not 0 <= t < n_vocab for t in snapshot.tokens):
        return "token id out of vocabulary"
    if n and not snapshot.data:
        return "snapshot lists tokens but has empty data"
    return None


def import_seq(native: LlamaContext, session: Session, snapshot: KVSnapshot) -> str | None:
    """Load ``snapshot`` into the empty session's sequence; why not, or None when done."""
    if session.tokens:
        raise EngineError(f"session {session.session_id!r} is not empty")
    data = snapshot.data or b""
    seq = session.seq
    native.seq_clear(seq)
    LOG_TAIL.clear()
    if not native.seq_set(seq, data):
        native.seq_clear(seq)
        return f"llama.cpp refused the KV data{last_llama_error()}"
    n = len(snapshot.tokens)
    n_kv = native.seq_positions(seq)
    expected = n if snapshot.n_kv is None else snapshot.n_kv
    # The KV covers every token but possibly the last sampled one (pending).
    if n_kv != expected or not 0 <= n - n_kv <= 1:
        native.seq_clear(seq)
        return (
            f"KV data ends at position {n_kv - 1}; the snapshot lists {n} tokens, "
            f"{expected} of them in the KV"
        )
    session.tokens[:] = snapshot.tokens
    session.n_kv = n_kv
    session.kv_bytes = native.seq_size(seq)
    return None
