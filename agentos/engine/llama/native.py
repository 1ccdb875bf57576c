"""The llama.cpp calls of the ``llama`` engine, behind one small class that owns the handles.

Everything that touches ``llama_cpp``'s C API for a model and its context lives here:
loading, the context parameters (see :mod:`agentos.engine.llama` for why each was
chosen), batches, tokens, a sequence's state bytes and the process-wide log sink. The
engine above decides *what* to decode; :class:`LlamaContext` only says how. Once the
engine serves, every method that touches the context (decoding, logits, a sequence's
state) must be called holding the engine's lock; tokenizing needs only the model.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from agentos.engine.base import EngineError

__all__ = ["LOG_TAIL", "LlamaContext", "check_model_file", "last_llama_error"]

_SWA_FULL = os.environ.get("AGENTOS_SWA_FULL") == "1"
_GGUF_MAGIC = b"GGUF"

# One native log sink for the process: llama.cpp logs through a single global callback,
# and llama-cpp-python's default one prints every message to stderr.
LOG_TAIL: deque[str] = deque(maxlen=16)
_LLAMA_ERROR = 3


def _log_sink(level: int, text: bytes | None, user_data: ctypes.c_void_p) -> None:
    if level == _LLAMA_ERROR and text:
        LOG_TAIL.append(text.decode("utf-8", "replace").strip())


# Kept referenced for the life of the process: llama.cpp holds the raw pointer.
_LOG_CALLBACK = llama_cpp.llama_log_callback(_log_sink)
llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
_backend_lock = threading.Lock()
_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True


def last_llama_error() -> str:
    """`` (llama.cpp: ...)`` with the last error line llama.cpp logged, or ""."""
    return f" (llama.cpp: {LOG_TAIL[-1]})" if LOG_TAIL else ""


def check_model_file(path: Path) -> None:
    """Raise :class:`EngineError` unless ``path`` is a readable GGUF file."""
    if not path.is_file():
        raise EngineError(f"model file {path} does not exist")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise EngineError(f"cannot read model file {path}: {exc}") from exc
    if magic != _GGUF_MAGIC:
        raise EngineError(f"model file {path} is not a GGUF file")


def max_sequences() -> int:
    """How many sequences (slots) one llama.cpp context can hold."""
    return int(llama_cpp.llama_max_parallel_sequences())


class LlamaContext:
    """One loaded model and one context of ``slots`` sequences of ``n_ctx`` tokens each.

    Raises :class:`EngineError` (or ValueError for an ``n_ctx`` the model cannot take)
    and frees what it allocated when it cannot be built. :meth:`close` frees the
    handles; ``model`` is None afterwards.
    """

    def __init__(self, path: Path, *, slots: int, n_ctx: int, n_batch: int, n_threads: int) -> None:
        self.model: Any = None
        self.ctx: Any = None
        self.batch: Any = None
        self.n_batch = n_batch
        self._pieces: dict[int, bytes] = {}
        _init_backend()
        LOG_TAIL.clear()
        model = llama_cpp.llama_model_load_from_file(
            str(path).encode(), llama_cpp.llama_model_default_params()
        )
        if not model:
            raise EngineError(f"llama.cpp could not load model {path}{last_llama_error()}")
        self.model = model
        try:
            self._setup(slots, n_ctx, n_threads)
        except BaseException:
            self.close()
            raise

    def _setup(self, slots: int, n_ctx: int, n_threads: int) -> None:
        model = self.model
        n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
        if n_ctx > n_ctx_train:
            raise ValueError(f"n_ctx {n_ctx} exceeds the model's {n_ctx_train}")
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.bos: int | None = (
            int(llama_cpp.llama_vocab_bos(self.vocab))
            if llama_cpp.llama_vocab_get_add_bos(self.vocab)
            else None
        )
        params = llama_cpp.llama_context_default_params()
        # Non-unified KV splits n_ctx evenly over the sequences: ask for slots x n_ctx.
        params.n_ctx = slots * n_ctx
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = slots
        params.n_outputs_max = slots
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.type_k = llama_cpp.GGML_TYPE_F16
        params.type_v = llama_cpp.GGML_TYPE_F16
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.swa_full = _SWA_FULL
        params.kv_unified = False
        params.no_perf = True
        self.params = params
        LOG_TAIL.clear()
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            raise EngineError(f"llama.cpp could not create a context{last_llama_error()}")
        self.ctx = ctx
        per_seq = int(llama_cpp.llama_n_ctx_seq(ctx))
        if per_seq < n_ctx:
            raise EngineError(f"llama.cpp gave {per_seq} tokens per sequence, not {n_ctx}")
        # llama.cpp clamps the batch to the context size; chunk prefills to what it took.
        self.n_batch = min(
            self.n_batch, int(llama_cpp.llama_n_batch(ctx)), int(llama_cpp.llama_n_ubatch(ctx))
        )
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def close(self) -> None:
        """Free the batch, the context and the model (idempotent)."""
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def require(self) -> None:
        """Raise :class:`EngineError` once the handles are freed."""
        if self.model is None:
            raise EngineError("the llama engine is closed")

    # -- the model --------------------------------------------------------------------

    def chat_template(self) -> str | None:
        """The GGUF's ``tokenizer.chat_template``, if it has one."""
        raw = llama_cpp.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8", "replace") if raw else None

    def eos(self) -> int:
        return int(llama_cpp.llama_vocab_eos(self.vocab))

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens parsed, no BOS)."""
        self.require()
        data = text.encode("utf-8")
        cap = len(data) + 8
        while True:
            buf = (llama_cpp.llama_token * cap)()
            n = int(llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, False, True))
            if n >= 0:
                return list(buf[:n])
            cap = -n

    def piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens rendered), cached."""
        piece = self._pieces.get(token)
        if piece is None:
            self.require()
            size = 32
            while True:
                buf = ctypes.create_string_buffer(size)
                n = int(llama_cpp.llama_token_to_piece(self.vocab, token, buf, size, 0, True))
                if n >= 0:
                    piece = buf.raw[:n]
                    break
                size = -n
            self._pieces[token] = piece
        return piece

    # -- decoding ---------------------------------------------------------------------

    def decode(self, seq: int, tokens: Sequence[int], pos0: int, logits: bool) -> int:
        """Decode ``tokens`` at consecutive positions from ``pos0``; 0 or llama's error code.

        Only the last token asks for logits (and only if ``logits``): the output layer
        over a 262,144-word vocabulary is the expensive part of a small model.
        """
        batch = self.batch
        step = self.n_batch
        for start in range(0, len(tokens), step):
            chunk = tokens[start : start + step]
            n = len(chunk)
            batch.n_tokens = n
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = pos0 + start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = 0
            if logits and start + step >= len(tokens):
                batch.logits[n - 1] = 1
            rc = int(llama_cpp.llama_decode(self.ctx, batch))
            if rc != 0:
                return rc
        return 0

    def logits(self) -> np.ndarray[Any, Any]:
        """The last decoded token's logits: a view into the context's buffer, valid
        until the next decode."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        if not ptr:
            raise EngineError("llama.cpp returned no logits")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    # -- a sequence's state ------------------------------------------------------------

    def seq_clear(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def seq_size(self, seq: int) -> int:
        """Bytes of the sequence's state as :meth:`seq_get` would export it."""
        return int(llama_cpp.llama_state_seq_get_size(self.ctx, seq))

    def seq_positions(self, seq: int) -> int:
        """How many positions the sequence's KV holds (its highest position + 1)."""
        return int(llama_cpp.llama_memory_seq_pos_max(self.mem, seq)) + 1

    def seq_get(self, seq: int) -> bytes:
        """The sequence's state bytes (b"" when llama.cpp wrote none)."""
        size = self.seq_size(seq)
        buf = (ctypes.c_uint8 * size)()
        written = int(llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, seq))
        return ctypes.string_at(buf, written)

    def seq_set(self, seq: int, data: bytes) -> bool:
        """Load state bytes into the sequence; False when llama.cpp refuses them."""
        # Points into the bytes object itself: llama.cpp only reads, no copy is needed.
        src = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
        return int(llama_cpp.llama_state_seq_set_data(self.ctx, src, len(data), seq)) != 0
