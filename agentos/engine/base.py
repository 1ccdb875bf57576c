"""The contract every inference backend meets, so the runtime never knows which one it drives.

An engine holds one model and lends *sessions* to agents: a session is an agent's
context in the engine (a llama.cpp sequence, a remote conversation, a simulated
cache). A session's KV cache can be exported to bytes and imported back, so that an
idle agent can give its slot back and later continue without re-prefilling its whole
history. Engines that cannot export KV (a remote OpenAI-compatible server) return
``None`` from :meth:`Engine.export_kv`; the runtime then keeps only the token history
and re-prefills on wake.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from agentos.core.chat import Reply, TokenUsage, ToolCall, ToolSpec

__all__ = [
    "Completion",
    "ContextOverflow",
    "Engine",
    "EngineError",
    "EngineUnavailable",
    "KVSnapshot",
    "ModelMisconfigured",
    "NoFreeSlot",
    "Reply",
    "RouteExhausted",
    "RouteUnavailable",
    "SessionInfo",
    "StreamChunk",
    "TokenUsage",
    "ToolCall",
    "ToolSpec",
]


class EngineError(Exception):
    """An engine could not do what was asked (bad session, context overflow, backend error)."""


class ContextOverflow(EngineError):
    """A prompt or prefill does not fit the session's ``n_ctx``; the session is unchanged.

    The caller must act: compact the history and re-prefill, or use a larger context.
    """


class NoFreeSlot(EngineError):
    """Every slot of the engine is held by a session; free one (hibernate) or wait."""


class EngineUnavailable(EngineError):
    """The backend cannot serve now (down, restarting, overloaded): the infrastructure's
    fault, never the agent's; the runtime retries the task later."""


class RouteUnavailable(EngineUnavailable):
    """No candidate of an agent's route can serve this call now (``onExhausted: park``):
    the task parks as an infrastructure fault; the message names each candidate and why
    it was skipped."""


class RouteExhausted(EngineError):
    """No candidate of an agent's route can serve this call (``onExhausted: fail``): the
    agent's code may catch it; the message names each candidate and why it was skipped."""


class ModelMisconfigured(EngineUnavailable):
    """The Model is wrong, not the agent: its server refuses the key (401/403), has no
    such path or model (404, "model not found"), or its engine cannot start (a credential
    that does not resolve, an unwritable home). An operator must fix the Model or its
    credential; meanwhile the runtime parks its agents' tasks as infrastructure faults.

    ``reason`` is already scrubbed of the credentials agentos resolved, so the message
    can go into an event, a task record or a log as it is.
    """

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"model {model} misconfigured: {reason}")
        self.model = model
        self.reason = reason

    def __reduce__(self) -> tuple[type[ModelMisconfigured], tuple[str, str]]:
        return type(self), (self.model, self.reason)


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """A piece of generated text and the token ids behind it."""

    text: str
    token_ids: tuple[int, ...]
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", None while streaming
    # On the last chunk, the call's usage as the server counted it (a server streams text,
    # not token ids); None: count the prompt and the chunks' token ids.
    usage: TokenUsage | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """The outcome of one inference call on a session."""

    text: str
    input_tokens: int  # tokens of the prompt that were prefilled by this call
    output_tokens: int
    finish_reason: str  # "stop" or "length"
    time_to_first_token_s: float
    duration_s: float
    cached_tokens: int = 0  # prompt tokens already in the session's KV (not re-prefilled)
    served_by: str = ""  # the model that answered when not the agent's own (a fallback)
    routed: str = ""  # why a route chose that model (empty: the agent has one model)
    served_at: str = ""  # where it ran (server.address), when the engine knows


@dataclass(frozen=True, slots=True)
class KVSnapshot:
    """A session's exported state: KV bytes plus what is needed to trust or rebuild them.

    ``fingerprint`` identifies the engine build and configuration that produced
    ``data``; a snapshot is only imported into an engine with the same fingerprint.
    ``tokens`` is the full token history of the session, enough to re-prefill when
    the bytes cannot be used.
    """

    fingerprint: str
    tokens: tuple[int, ...]
    data: bytes | None  # None when the engine cannot export its KV
    # How many leading tokens the bytes cover (None: all). An engine may leave the last
    # sampled token pending, to decode it with the next prompt as if never exported.
    n_kv: int | None = None
    # The session's chat state as the engine's own JSON (its messages, and how they were
    # rendered so far); b"" for a session only used for text. Handed back to
    # import_kv (in the snapshot) and prefill, so a chat continues after a wake.
    conversation: bytes = b""


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What the runtime may read about a session without touching the engine."""

    session_id: str
    n_tokens: int
    kv_bytes: int


@runtime_checkable
class Engine(Protocol):
    """An inference backend shared by every agent a daemon runs.

    Sessions are opaque string ids chosen by the caller (the agent name). Every
    method that takes a session raises :class:`EngineError` for an unknown one.
    """

    @property
    def name(self) -> str:
        """Backend name, e.g. ``sim`` or ``llama``."""
        ...

    @property
    def model(self) -> str:
        """Model name as reported in traces (``gen_ai.request.model``)."""
        ...

    @property
    def slots(self) -> int:
        """How many sessions may be open at once."""
        ...

    @property
    def parallel(self) -> int:
        """How many calls the engine works on at once; the governor queues the rest fairly."""
        ...

    def fingerprint(self) -> str:
        """Identity of the model build and cache layout; KV is portable only between equals."""
        ...

    def count_tokens(self, text: str) -> int:
        """Number of tokens ``text`` encodes to with this model's tokenizer."""
        ...

    def open_session(self, session_id: str) -> None:
        """Take a slot for ``session_id`` with an empty context.

        Raises :class:`NoFreeSlot` when every slot is held; opening an already open
        session is an error.
        """
        ...

    def close_session(self, session_id: str) -> None:
        """Free the session's slot and forget its KV. Closing an unknown session is a no-op."""
        ...

    def has_session(self, session_id: str) -> bool:
        """Whether ``session_id`` currently holds a slot."""
        ...

    def session_info(self, session_id: str) -> SessionInfo:
        """Token count and KV size of an open session."""
        ...

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
        """Append ``prompt`` to the session's context and stream a continuation.

        The generated tokens stay in the session's context. The last chunk has
        ``finished=True``. ``grammar`` (GBNF) or ``json_schema`` constrain the output
        on engines that support it; ``prompt`` must not be empty.
        """
        ...

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
        """Like :meth:`stream`, collected into one :class:`Completion`."""
        ...

    async def reset_session(self, session_id: str) -> None:
        """Empty the session's context, keeping its slot."""
        ...

    async def export_kv(self, session_id: str) -> KVSnapshot:
        """Export the session's state. ``data`` is None when the backend has no KV to give."""
        ...

    async def import_kv(self, session_id: str, snapshot: KVSnapshot) -> bool:
        """Load ``snapshot`` into an open, empty session.

        Returns False (and leaves the session empty) when the bytes cannot be used:
        another fingerprint, a truncated or corrupt blob, no data. The caller then
        re-prefills with :meth:`prefill`.
        """
        ...

    async def prefill(
        self, session_id: str, tokens: Sequence[int], conversation: bytes = b""
    ) -> float:
        """Rebuild the session's context from a token history (and the chat state
        :meth:`export_kv` gave in ``KVSnapshot.conversation``); returns the seconds it took."""
        ...

    def conversation(self, session_id: str) -> list[dict[str, Any]]:
        """The session's chat messages so far, OpenAI-shaped (empty for text-only use)."""
        ...

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
        """Append ``messages`` to the session's conversation and return the assistant's reply,
        which is appended too.

        ``messages`` are new turns only, already checked by
        :func:`agentos.core.chat.validate_messages` against :meth:`conversation`;
        ``tools`` by :func:`~agentos.core.chat.validate_tools` and ``tool_choice``
        normalised (``auto``, ``required``, ``none`` or a tool's name).
        ``response_format`` is OpenAI's (``json_schema`` or ``json_object``). Usage
        counts what the server counts: input = prompt tokens processed by this call,
        cached = those reused, output = generated. Raises :class:`ContextOverflow`
        (the session unchanged) and :class:`EngineError` as :meth:`generate` does.
        """
        ...
