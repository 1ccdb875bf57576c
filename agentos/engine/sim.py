"""A deterministic engine with no model, so the runtime can be tested and demoed without a GPU.

``SimEngine`` meets the :class:`~agentos.engine.base.Engine` contract for real: it
tokenizes, keeps a per-session context, streams a continuation, charges optional
prefill/decode time, and exports KV bytes that :meth:`SimEngine.import_kv` verifies
byte for byte. What it generates is nonsense made of plain English words, but it is
*reproducible* nonsense: the continuation is a pure function of the engine's seed and
the session's current context tokens. A session that was hibernated (exported,
closed, reopened, imported or re-prefilled) therefore continues exactly like one that
never slept, which is the property the runtime's tests lean on.

Behaviour callers should know:

* Tokens: text is split into words and punctuation, with spaces and tabs attached to
  the piece that follows them and every newline a token of its own; a token id is a
  blake2b hash of the piece modulo ``vocab_size``. ``decode(encode(text)) == text``
  for generated text always, and for any other text unless two of its pieces collide
  (decode then returns the first piece registered under the id).
* ``temperature`` is ignored: sampling is always the deterministic draw described above.
* ``grammar`` is accepted and ignored; the output is always plain words, ``.`` and
  newlines, so a caller that asked for a grammar must not expect it to be honoured here.
* Stop strings are never emitted; the tokens sampled up to and including the one that
  completed a stop string stay in the context (as in llama.cpp), and count as output.
* ``overflow="slide"`` (the default): when the context would exceed ``n_ctx`` the
  oldest tokens are dropped (a sliding window); the continuation then depends on the
  window only. ``overflow="raise"`` behaves like llama.cpp: a prompt or prefill that does
  not fit (a prompt with room for one generated token) raises :class:`ContextOverflow`
  and leaves the session unchanged; a generation that fills the session ends with
  ``finish_reason == "length"``.
* ``parallel=None`` (the default): every session may run a call at once and nothing is
  checked. ``parallel=N`` behaves like llama.cpp's one context under one lock (N=1):
  at most N calls do engine work at a time, the others wait their turn step by step
  (prefill, each token, export, import, reset), and a second call on a session that
  already has one in flight raises :class:`EngineError` instead of interleaving
  tokens into one context as llama.cpp would; a call whose session was closed under it
  raises too. A stream holds its session from its first ``anext`` until it finishes
  or is closed.
* ``export_latency_s`` / ``import_latency_s`` are slept by every export / import, so
  hibernation and wake cost time as llama.cpp's do. :meth:`SimEngine.like_llama` sets
  all of the above as the llama engine has them.

Stricter defaults would make most runtime tests slower without testing more; tests of
slot pressure, overflow and hibernation timing should use ``SimEngine.like_llama()``.
Chat, scripted replies and the chat state a snapshot carries are in
:mod:`agentos.engine.sim_chat`; a session's context and its KV blob in
:mod:`agentos.engine.sim_state`.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.lowlevel

from agentos.core.chat import Reply
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
from agentos.engine.sim_chat import Scripted, SimChat, chat_state, read_chat_state
from agentos.engine.sim_state import (
    KV_FORMAT_VERSION,
    MIN_KV_BYTES_PER_TOKEN,
    SimSession,
    SimStats,
    kv_blob,
    kv_problem,
)

__all__ = ["Overflow", "Scripted", "SimEngine", "SimStats"]

Overflow = Literal["slide", "raise"]

# Newlines stand alone so that a generated "\n" followed by a bare word re-tokenizes to
# the same two tokens; other whitespace rides on the next piece like in BPE vocabularies.
_PIECE_RE = re.compile(r"\n|[^\S\n]*(?:\w+|[^\w\s])|[^\S\n]+")

# The synthetic continuation draws from these; plain lowercase words so output is easy
# to read in traces and can never be mistaken for structured data.
_WORD_TEXT = (
    "the a an and or but if then so because while when where which who what how why "
    "this that these those it its they them their we us our you your he she his her "
    "is are was were be been being have has had do does did will would can could "
    "should may might must shall not no yes all some many few more most less other "
    "same new old good bad big small long short high low early late first last next "
    "time day night year week hour moment world life work home place way thing part "
    "people person agent task plan note idea story word line page book letter list "
    "water fire earth air light dark stone tree river hill road city field garden "
    "house room door window table chair paper glass metal wood cloud rain snow wind "
    "sun moon star sky sea ship train car bird fish horse dog cat mouse bread apple "
    "tea milk salt sugar song voice sound color shape number answer question reason "
    "result change start end side center edge top bottom front back left right "
    "make take give find keep hold bring send read write speak listen watch wait "
    "walk run move turn open close begin finish build break fix learn teach help "
    "call ask tell show try use need want like know think feel see hear seem become "
    "quiet loud warm cold soft hard quick slow bright clear simple strange gentle "
    "careful ready busy free full empty near far always often sometimes never again "
    "still already soon later here there today together alone"
)
_WORDS = _WORD_TEXT.split()
_PERIOD_PER_MILLE = 90
_NEWLINE_PER_MILLE = 25
_MIN_WORDS = 32


def _piece_hash(piece: str) -> int:
    return int.from_bytes(hashlib.blake2b(piece.encode(), digest_size=8).digest(), "little")


class SimEngine(SimChat):
    """A model-free engine whose output is a deterministic function of seed and context."""

    def __init__(
        self,
        *,
        seed: int = 0,
        slots: int = 64,
        n_ctx: int = 8192,
        kv_bytes_per_token: int = 2048,
        prefill_s_per_token: float = 0.0,
        decode_s_per_token: float = 0.0,
        model: str = "sim-1",
        vocab_size: int = 32000,
        parallel: int | None = None,
        overflow: Overflow = "slide",
        export_latency_s: float = 0.0,
        import_latency_s: float = 0.0,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        if kv_bytes_per_token < MIN_KV_BYTES_PER_TOKEN:
            raise ValueError(
                f"kv_bytes_per_token must be >= {MIN_KV_BYTES_PER_TOKEN} (the snapshot "
                f"header lives in the first token's bytes), got {kv_bytes_per_token}"
            )
        if prefill_s_per_token < 0 or decode_s_per_token < 0:
            raise ValueError("per-token costs must be >= 0")
        if not 1 <= vocab_size <= 2**32:
            raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
        if parallel is not None and not 1 <= parallel <= slots:
            raise ValueError(f"parallel must be None or in [1, slots={slots}], got {parallel}")
        if overflow not in ("slide", "raise"):
            raise ValueError(f"overflow must be 'slide' or 'raise', got {overflow!r}")
        for what, latency in (("export", export_latency_s), ("import", import_latency_s)):
            if not (math.isfinite(latency) and latency >= 0):
                raise ValueError(f"{what}_latency_s must be a finite number >= 0, got {latency}")
        self._seed = seed
        self._slots = slots
        self._n_ctx = n_ctx
        self._kv_bytes_per_token = kv_bytes_per_token
        self._prefill_s = prefill_s_per_token
        self._decode_s = decode_s_per_token
        self._model = model
        self._vocab_size = vocab_size
        self._parallel = parallel
        self._overflow = overflow
        self._export_s = export_latency_s
        self._import_s = import_latency_s
        # Only with parallel=N: calls take turns here like llama.cpp's calls on its lock.
        self._gate = anyio.CapacityLimiter(parallel) if parallel is not None else None
        self._sessions: dict[str, SimSession] = {}
        self._pieces: dict[int, str] = {}
        # Keyed by session id and kept across close/open: the agent owns its script.
        self._scripts: dict[str, deque[Reply]] = {}
        self.stats = SimStats()

        self._fingerprint = (
            "sim:"
            + hashlib.blake2b(
                f"{KV_FORMAT_VERSION}|{model}|{seed}|{n_ctx}|{kv_bytes_per_token}|{vocab_size}".encode(),
                digest_size=8,
            ).hexdigest()
        )
        self._fingerprint_digest = hashlib.blake2b(
            self._fingerprint.encode(), digest_size=16
        ).digest()
        self._seed_key = hashlib.blake2b(f"sim-seed|{seed}".encode(), digest_size=16).digest()

        self._period = self._register(".")
        self._newline = self._register("\n")
        # Keep only words whose both forms have ids of their own, so every generated token
        # decodes to the piece that was emitted for it.
        self._words: list[tuple[int, str, int, str]] = []
        for word in _WORDS:
            bare, spaced = word, " " + word
            bare_id, spaced_id = self._piece_id(bare), self._piece_id(spaced)
            if bare_id == spaced_id or bare_id in self._pieces or spaced_id in self._pieces:
                continue
            self._pieces[bare_id] = bare
            self._pieces[spaced_id] = spaced
            self._words.append((bare_id, bare, spaced_id, spaced))
        if len(self._words) < _MIN_WORDS:
            raise ValueError(f"vocab_size {vocab_size} is too small for the sim vocabulary")

    @classmethod
    def like_llama(cls, **overrides: Any) -> SimEngine:
        """A sim engine with the llama engine's constraints, for tests that must see them.

        One call at a time (``parallel=1``), overflow raises, 0.1 s per KV export and
        import, 8 slots of 2,048 tokens; ``overrides`` are passed on to the constructor
        (e.g. ``n_ctx=256`` or ``decode_s_per_token=0.02`` for llama's CPU speed).
        """
        options: dict[str, Any] = {
            "slots": 8,
            "n_ctx": 2048,
            "parallel": 1,
            "overflow": "raise",
            "export_latency_s": 0.1,
            "import_latency_s": 0.1,
        }
        options.update(overrides)
        return cls(**options)

    # -- identity ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return "sim"

    @property
    def model(self) -> str:
        return self._model

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def parallel(self) -> int:
        # Without a limit, simulated calls only sleep: every session may run at once.
        return self._slots if self._parallel is None else self._parallel

    @property
    def overflow(self) -> Overflow:
        return self._overflow

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def kv_bytes_per_token(self) -> int:
        return self._kv_bytes_per_token

    def fingerprint(self) -> str:
        return self._fingerprint

    # -- tokenizer --------------------------------------------------------------------

    def _piece_id(self, piece: str) -> int:
        return _piece_hash(piece) % self._vocab_size

    def _register(self, piece: str) -> int:
        token = self._piece_id(piece)
        self._pieces.setdefault(token, piece)
        return token

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; pieces are remembered so :meth:`decode` can map them back."""
        return [self._register(piece) for piece in _PIECE_RE.findall(text)]

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``; an id this engine never saw decodes as ``<tok:ID>``."""
        return "".join(self._pieces.get(t, f"<tok:{t}>") for t in token_ids)

    def count_tokens(self, text: str) -> int:
        return len(_PIECE_RE.findall(text))

    # -- sessions ---------------------------------------------------------------------

    def _session(self, session_id: str) -> SimSession:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise EngineError(f"unknown session {session_id!r}") from None

    def open_session(self, session_id: str) -> None:
        if session_id in self._sessions:
            raise EngineError(f"session {session_id!r} is already open")
        if len(self._sessions) >= self._slots:
            raise NoFreeSlot(
                f"all {self._slots} slots are held; cannot open session {session_id!r}"
            )
        self._sessions[session_id] = SimSession(session_id)

    def close_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def has_session(self, session_id: str) -> bool:
        return session_id in self._sessions

    def session_info(self, session_id: str) -> SessionInfo:
        n = len(self._session(session_id).tokens)
        return SessionInfo(session_id, n, n * self._kv_bytes_per_token)

    def context_tokens(self, session_id: str) -> tuple[int, ...]:
        """The session's current context (a sim-only window into its state, for tests)."""
        return tuple(self._session(session_id).tokens)

    async def reset_session(self, session_id: str) -> None:
        session = self._session(session_id)
        async with self._call(session, "reset_session"), self._step(session):
            session.clear()
            await anyio.lowlevel.checkpoint()

    # -- llama's constraints (parallel=N, overflow="raise") ----------------------------

    def _check_idle(self, session: SimSession, what: str) -> None:
        if self._gate is not None and session.busy is not None:
            raise EngineError(
                f"{what} on session {session.session_id!r} while its {session.busy} is in "
                "flight: one call at a time per session (llama.cpp would mix both into "
                "one context)"
            )

    @asynccontextmanager
    async def _call(self, session: SimSession, what: str) -> AsyncIterator[None]:
        """Hold ``session`` for one whole call (a stream: until it finishes or closes)."""
        if self._gate is None:
            yield
            return
        self._check_idle(session, what)
        session.busy = what
        try:
            yield
        finally:
            session.busy = None

    @asynccontextmanager
    async def _step(self, session: SimSession) -> AsyncIterator[None]:
        """One locked section, as llama.cpp holds its context lock per decode or export."""
        if self._gate is None:
            yield
            return
        async with self._gate:
            if self._sessions.get(session.session_id) is not session:
                raise EngineError(f"session {session.session_id!r} was closed")
            yield

    def _check_fits(self, session: SimSession, extra: int, held: int | None = None) -> None:
        held = len(session.tokens) if held is None else held
        if self._overflow == "raise" and held + extra > self._n_ctx:
            raise ContextOverflow(
                f"context overflow in session {session.session_id!r}: {held} "
                f"tokens held + {extra} needed > n_ctx {self._n_ctx}; compact the history "
                "and re-prefill, or use a larger n_ctx"
            )

    # -- generation -------------------------------------------------------------------

    def _next_token(self, session: SimSession) -> tuple[int, str]:
        after_newline = not session.tokens or session.tokens[-1] == self._newline
        return self._draw(session.digest(), after_newline)

    def _draw(self, context_digest: bytes, after_newline: bool) -> tuple[int, str]:
        """The token sampled after a context with this digest: a pure function of both."""
        draw = int.from_bytes(
            hashlib.blake2b(context_digest, key=self._seed_key, digest_size=8).digest(),
            "little",
        )
        roll = draw % 1000
        if roll < _PERIOD_PER_MILLE and not after_newline:
            return self._period, "."
        if roll < _PERIOD_PER_MILLE + _NEWLINE_PER_MILLE and not after_newline:
            return self._newline, "\n"
        bare_id, bare, spaced_id, spaced = self._words[(draw // 1000) % len(self._words)]
        return (bare_id, bare) if after_newline else (spaced_id, spaced)

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
        """Prefill ``prompt`` and stream a continuation; ``temperature`` and ``grammar`` are
        ignored (see the module docstring). Bad arguments, a busy session (``parallel=N``)
        and context overflow (``overflow="raise"``) raise here, not on first ``anext``.
        """
        session = self._session(session_id)
        if max_tokens < 0:
            raise EngineError(f"max_tokens must be >= 0, got {max_tokens}")
        self._check_idle(session, "stream")
        self._check_fits(session, self.count_tokens(prompt) + (1 if max_tokens > 0 else 0))
        return self._stream(session, prompt, max_tokens, tuple(s for s in stop if s))

    async def _stream(
        self, session: SimSession, prompt: str, max_tokens: int, stops: tuple[str, ...]
    ) -> AsyncGenerator[StreamChunk, None]:
        generation = self._generation(session, prompt, max_tokens, stops)
        async with self._call(session, "stream"), aclosing(generation):
            async for chunk in generation:
                yield chunk

    async def _generation(
        self, session: SimSession, prompt: str, max_tokens: int, stops: tuple[str, ...]
    ) -> AsyncGenerator[StreamChunk, None]:
        self.stats.generations += 1
        prompt_ids = self.encode(prompt)
        async with self._step(session):
            # Again: without parallel=N another call may have grown the context since.
            self._check_fits(session, len(prompt_ids) + (1 if max_tokens > 0 else 0))
            session.extend(prompt_ids, self._n_ctx)
            self.stats.prefill_tokens += len(prompt_ids)
            await anyio.lowlevel.checkpoint()
            if self._prefill_s > 0 and prompt_ids:
                await anyio.sleep(self._prefill_s * len(prompt_ids))

        out = ""  # everything sampled this call
        sent = 0  # how much of ``out`` has been yielded
        pending: list[int] = []  # sampled ids not yet reported in a chunk
        for i in range(max_tokens):
            async with self._step(session):
                if self._decode_s > 0:
                    await anyio.sleep(self._decode_s)
                token, piece = self._next_token(session)
                session.extend((token,), self._n_ctx)
            self.stats.decode_tokens += 1
            pending.append(token)
            out += piece

            # A stop string can only start in unsent text: anything that could begin one
            # was held back below.
            hits = [at for s in stops if (at := out.find(s, sent)) >= 0]
            if hits:
                yield StreamChunk(out[sent : min(hits)], tuple(pending), True, "stop")
                return
            full = self._overflow == "raise" and len(session.tokens) >= self._n_ctx
            if i == max_tokens - 1 or full:
                break
            safe = len(out) - _stop_prefix_len(out, stops)
            if safe > sent:
                yield StreamChunk(out[sent:safe], tuple(pending))
                sent, pending = safe, []
        yield StreamChunk(out[sent:], tuple(pending), True, "length")

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
        first: float | None = None
        parts: list[str] = []
        n_out = 0
        reason = "length"
        # Counted up front: other sessions may move the shared stats while this one streams.
        n_in = self.count_tokens(prompt)
        chunks = self.stream(
            session_id,
            prompt,
            max_tokens=max_tokens,
            stop=stop,
            temperature=temperature,
            grammar=grammar,
            json_schema=json_schema,
        )
        async for chunk in chunks:
            if first is None and chunk.token_ids:
                first = time.perf_counter()
            parts.append(chunk.text)
            n_out += len(chunk.token_ids)
            if chunk.finished:
                reason = chunk.finish_reason or "length"
        end = time.perf_counter()
        return Completion(
            text="".join(parts),
            input_tokens=n_in,
            output_tokens=n_out,
            finish_reason=reason,
            time_to_first_token_s=(first if first is not None else end) - start,
            duration_s=end - start,
        )

    # -- KV ---------------------------------------------------------------------------

    async def export_kv(self, session_id: str) -> KVSnapshot:
        session = self._session(session_id)
        async with self._call(session, "export_kv"), self._step(session):
            await anyio.lowlevel.checkpoint()
            if self._export_s > 0:
                await anyio.sleep(self._export_s)
            tokens = tuple(session.tokens)
            conversation = chat_state(session)
        self.stats.exports += 1
        return KVSnapshot(
            self._fingerprint,
            tokens,
            kv_blob(tokens, self._kv_bytes_per_token, self._fingerprint_digest),
            conversation=conversation,
        )

    def _reject_reason(self, snapshot: KVSnapshot) -> str | None:
        if snapshot.fingerprint != self._fingerprint:
            return f"fingerprint {snapshot.fingerprint!r} != {self._fingerprint!r}"
        data = snapshot.data
        if data is None:
            return "snapshot has no KV data"
        n = len(snapshot.tokens)
        if n > self._n_ctx:
            return f"{n} tokens exceed n_ctx {self._n_ctx}"
        if any(not 0 <= t < self._vocab_size for t in snapshot.tokens):
            return "token id out of vocabulary"
        if len(data) != n * self._kv_bytes_per_token:
            return f"data is {len(data)} bytes, expected {n * self._kv_bytes_per_token}"
        return kv_problem(data, snapshot.tokens, self._fingerprint_digest)

    async def import_kv(self, session_id: str, snapshot: KVSnapshot) -> bool:
        session = self._session(session_id)
        if session.tokens:
            raise EngineError(f"session {session_id!r} is not empty; reset it before import_kv")
        async with self._call(session, "import_kv"), self._step(session):
            await anyio.lowlevel.checkpoint()
            if self._import_s > 0:
                await anyio.sleep(self._import_s)
            reason = self._reject_reason(snapshot)
            if reason is None:
                try:
                    messages, described = read_chat_state(snapshot.conversation)
                except ValueError as e:
                    reason = str(e)
            if reason is None:
                session.extend(snapshot.tokens, self._n_ctx)
                session.messages, session.described = messages, described
        if reason is not None:
            self.stats.imports_rejected += 1
            self.stats.last_reject_reason = reason
            return False
        self.stats.imports_accepted += 1
        return True

    async def prefill(
        self, session_id: str, tokens: Sequence[int], conversation: bytes = b""
    ) -> float:
        """Append ``tokens`` to the context (on an empty session: rebuild it), paying
        ``prefill_s_per_token`` each; returns the seconds taken. A non-empty
        ``conversation`` (``KVSnapshot.conversation``) replaces the session's chat state;
        EngineError if it is not one this engine wrote."""
        session = self._session(session_id)
        bad = [t for t in tokens if not 0 <= t < self._vocab_size]
        if bad:
            raise EngineError(f"token ids out of vocabulary for session {session_id!r}: {bad[:5]}")
        try:
            chat = read_chat_state(conversation) if conversation else None
        except ValueError as e:
            raise EngineError(f"prefill of session {session_id!r}: {e}") from None
        self._check_fits(session, len(tokens))
        start = time.perf_counter()
        async with self._call(session, "prefill"), self._step(session):
            await anyio.lowlevel.checkpoint()
            if self._prefill_s > 0 and tokens:
                await anyio.sleep(self._prefill_s * len(tokens))
            self._check_fits(session, len(tokens))
            session.extend(tokens, self._n_ctx)
            if chat is not None:
                session.messages, session.described = chat
        self.stats.prefill_tokens += len(tokens)
        return time.perf_counter() - start


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
    _protocol_check: Engine = SimEngine()
