"""``LlamaEngine``: the :class:`~agentos.engine.base.Engine` calls on one llama.cpp context.

The design (one context, one sequence per slot, the parameters and what was measured)
is in :mod:`agentos.engine.llama`. This module turns each call into locked steps:
:mod:`.sessions` holds the slots and the lock, :mod:`.native` makes the llama.cpp
calls, :mod:`.sampling` picks the tokens, :mod:`.kv` moves a sequence's state and
:mod:`.chat` plans chat turns.
"""

from __future__ import annotations

import codecs
import copy
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentos.core.chat import (
    Reply,
    TokenUsage,
    ToolCall,
    ToolSpec,
    parse_constrained,
    tool_choice_of,
)
from agentos.engine.base import (
    Completion,
    Engine,
    EngineError,
    KVSnapshot,
    SessionInfo,
    StreamChunk,
)
from agentos.engine.gguf import ensure_default_model, model_sha256
from agentos.engine.llama import kv
from agentos.engine.llama.chat import (
    ChatState,
    ChatTemplate,
    load_template,
    output_schema,
    plan_turn,
)
from agentos.engine.llama.native import LlamaContext, check_model_file, max_sequences
from agentos.engine.llama.sampling import Generation, Sampler, check_sampling
from agentos.engine.llama.sessions import EOG, Sessions
from agentos.engine.llama.state import LlamaStats
from agentos.engine.text import collect, stop_prefix_len

__all__ = ["LlamaEngine"]


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
        max_seqs = max_sequences()
        if slots > max_seqs:
            raise ValueError(f"slots must be <= {max_seqs} (llama.cpp's limit), got {slots}")
        if model_path is None:
            if home is None:
                from agentos.settings import default_home

                home = default_home()
            path = ensure_default_model(home)
        else:
            path = Path(model_path).expanduser()
        check_model_file(path)

        self._path = path
        self._slots = slots
        self._n_ctx = n_ctx
        if n_threads is None:
            from agentos.settings import default_llama_threads

            n_threads = default_llama_threads()
        self.stats = LlamaStats()
        self._native = LlamaContext(
            path, slots=slots, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads
        )
        self._n_vocab = self._native.n_vocab
        try:
            sampler = Sampler(self._n_vocab)
            self._sessions = Sessions(
                self._native, sampler, self.stats, slots=slots, n_ctx=n_ctx, seed=seed
            )
            self._template = self._load_template(chat_template)
        except BaseException:
            self._native.close()
            raise
        self._fingerprint = kv.fingerprint(
            self._native, model=self.model, model_sha256=model_sha256(path), n_ctx=n_ctx
        )

    def _load_template(self, option: str | None) -> ChatTemplate:
        native = self._native
        bos = self.decode([native.bos]) if native.bos is not None else ""
        eos_id = native.eos()
        eos = self.decode([eos_id]) if eos_id >= 0 else ""
        return load_template(option, native.chat_template(), bos=bos, eos=eos)

    def close(self) -> None:
        """Free the context and the model; the engine is unusable afterwards."""
        with self._sessions.lock:
            self._sessions.clear()
            self._native.close()

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
        return self._native.tokenize(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` (special tokens rendered)."""
        return b"".join(self._native.piece(t) for t in token_ids).decode("utf-8", "replace")

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    # -- sessions ---------------------------------------------------------------------

    def open_session(self, session_id: str) -> None:
        self._sessions.open(session_id)

    def close_session(self, session_id: str) -> None:
        self._sessions.close(session_id)

    def has_session(self, session_id: str) -> bool:
        return session_id in self._sessions

    def slot_of(self, session_id: str) -> int:
        """The sequence id (slot) an open session holds."""
        return self._sessions.get(session_id).seq

    def session_info(self, session_id: str) -> SessionInfo:
        session = self._sessions.get(session_id)
        return SessionInfo(session_id, len(session.tokens), session.kv_bytes)

    async def reset_session(self, session_id: str) -> None:
        session = self._sessions.get(session_id)
        await self._sessions.run(self._sessions.reset_locked, session)
        session.chat = None

    # -- generation -------------------------------------------------------------------

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
        """Prefill ``prompt`` and stream a continuation (see :mod:`agentos.engine.llama`).

        Bad arguments, an invalid grammar and context overflow raise here, not on the
        first ``anext``.
        """
        gen = self._sessions.prepare(
            session_id, prompt, max_tokens, temperature, grammar, json_schema
        )
        return self._stream(gen, tuple(s for s in stop if s))

    async def _stream(
        self, gen: Generation, stops: tuple[str, ...]
    ) -> AsyncGenerator[StreamChunk, None]:
        run, advance = self._sessions.run, self._sessions.advance
        try:
            self.stats.generations += 1
            self.stats.prefill_tokens += len(gen.prompt)
            if gen.max_tokens == 0:
                await run(advance, gen)
                yield StreamChunk("", (), True, "length")
                return
            utf8 = codecs.getincrementaldecoder("utf-8")("replace")
            out = ""  # everything sampled this call
            sent = 0  # how much of ``out`` has been yielded
            pending: list[int] = []  # sampled ids not yet reported in a chunk
            for i in range(gen.max_tokens):
                token = await run(advance, gen)
                if token is None or token == EOG:
                    out += utf8.decode(b"", final=True)
                    yield StreamChunk(out[sent:], tuple(pending), True, "stop")
                    return
                self.stats.decode_tokens += 1
                pending.append(token)
                out += utf8.decode(self._native.piece(token))
                # A stop string can only start in unsent text: anything that could begin
                # one was held back below.
                hits = [at for s in stops if (at := out.find(s, sent)) >= 0]
                if hits:
                    yield StreamChunk(out[sent : min(hits)], tuple(pending), True, "stop")
                    return
                if i == gen.max_tokens - 1 or len(gen.session.tokens) >= self._n_ctx:
                    break
                safe = len(out) - stop_prefix_len(out, stops)
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
        gen = self._sessions.prepare(
            session_id, prompt, max_tokens, temperature, grammar, json_schema
        )
        return await self._collect(gen, tuple(s for s in stop if s), start)

    async def _collect(self, gen: Generation, stops: tuple[str, ...], start: float) -> Completion:
        chunks = self._stream(gen, stops)
        return await collect(
            chunks, start=start, input_tokens=len(gen.prompt), cached_tokens=gen.cached_tokens
        )

    # -- chat -------------------------------------------------------------------------

    def conversation(self, session_id: str) -> list[dict[str, Any]]:
        chat = self._sessions.get(session_id).chat
        return copy.deepcopy(chat.messages) if chat is not None else []

    def chat_text(self, session_id: str) -> str:
        """The session's context as :meth:`chat` rendered and generated it ("" before)."""
        chat = self._sessions.get(session_id).chat
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
        session = self._sessions.get(session_id)
        self._native.require()
        check_sampling(max_tokens, temperature)
        tools = tuple(tools)
        try:
            choice = tool_choice_of(tool_choice, tools)
            schema = output_schema(tools, choice, response_format)
            plan = plan_turn(self._template, session.chat, len(session.tokens), messages, tools)
        except ValueError as e:
            raise EngineError(f"chat in session {session_id!r}: {e}") from None
        ids = self.encode(plan.prompt)
        held = 0 if plan.reset else len(session.tokens)
        gen = self._sessions.generation(session, ids, max_tokens, temperature, None, schema, held)
        if plan.reset and session.tokens:
            try:
                # The chat state is kept: should the call fail now, the next one rebuilds.
                await self._sessions.run(self._sessions.reset_locked, session)
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
        session = self._sessions.get(session_id)
        sessions = self._sessions

        def export() -> tuple[tuple[int, ...], bytes, int]:
            sessions.live(session)
            return kv.export_seq(self._native, session)

        tokens, data, n_kv = await sessions.run(export)
        self.stats.exports += 1
        chat = session.chat.to_json() if session.chat is not None else b""
        return KVSnapshot(self._fingerprint, tokens, data, n_kv, chat)

    async def import_kv(self, session_id: str, snapshot: KVSnapshot) -> bool:
        session = self._sessions.get(session_id)
        sessions = self._sessions
        if session.tokens:
            raise EngineError(f"session {session_id!r} is not empty; reset it before import_kv")
        reason = kv.reject_reason(
            snapshot, fingerprint=self._fingerprint, n_ctx=self._n_ctx, n_vocab=self._n_vocab
        )
        chat: ChatState | None = None
        if reason is None and snapshot.conversation:
            try:
                chat = ChatState.from_json(snapshot.conversation)
            except ValueError as e:
                reason = str(e)
        if reason is None and snapshot.tokens:

            def load() -> str | None:
                sessions.live(session)
                return kv.import_seq(self._native, session, snapshot)

            reason = await sessions.run(load)
        if reason is not None:
            self.stats.imports_rejected += 1
            self.stats.last_reject_reason = reason
            return False
        session.chat = chat
        self.stats.imports_accepted += 1
        return True

    async def prefill(
        self, session_id: str, tokens: Sequence[int], conversation: bytes = b""
    ) -> float:
        """Append ``tokens`` to the context (on an empty session: rebuild it from a
        snapshot's token history, BOS included) and take ``conversation`` (a snapshot's
        chat state) as the session's chat; returns the seconds taken."""
        session = self._sessions.get(session_id)
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
            raise self._sessions.overflow(session, len(ids))
        start = time.perf_counter()
        await self._sessions.run(self._sessions.prefill_locked, session, ids)
        self.stats.prefill_tokens += len(ids)
        if chat is not None:
            session.chat = chat
        return time.perf_counter() - start


if TYPE_CHECKING:
    _protocol_check: Engine = LlamaEngine()
