"""The ``llama`` engine's bookkeeping: what a session holds and what the engine counts."""

from __future__ import annotations

from dataclasses import dataclass, field

from agentos.engine.llama.chat import ChatState

__all__ = ["LlamaStats", "Session"]


@dataclass(slots=True)
class LlamaStats:
    """Counters for tests and the runtime's metrics (as in ``SimStats``), plus speed."""

    prefill_tokens: int = 0  # prompt tokens (BOS included) decoded by stream/generate/prefill
    decode_tokens: int = 0  # tokens sampled
    generations: int = 0  # stream/generate calls that started
    exports: int = 0
    imports_accepted: int = 0
    imports_rejected: int = 0
    last_reject_reason: str | None = None  # why the latest rejected import_kv said False
    # EWMA of prefill throughput over prefills of >= 32 tokens; None until one happened.
    # Compare ``n_tokens / prefill_tokens_per_s`` with the cost of fetching KV bytes.
    prefill_tokens_per_s: float | None = None


@dataclass(slots=True, eq=False)
class Session:
    """One open session: its sequence (slot) in the context and its whole history."""

    session_id: str
    seq: int
    # The whole context as token ids: what KVSnapshot.tokens carries and prefill replays.
    tokens: list[int] = field(default_factory=list)
    # How many of ``tokens`` are in the KV cache; the rest (at most the last sampled
    # token) is decoded with the next prompt or before an export.
    n_kv: int = 0
    kv_bytes: int = 0
    chat: ChatState | None = None  # the conversation, once chat() was used
