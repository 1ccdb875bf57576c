"""The ``llamaserver`` engine's bookkeeping: what a session holds and what the engine counts.

A chat session's :class:`ChatState` travels in ``KVSnapshot.conversation``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import httpx

from agentos.core.chat import ToolSpec
from agentos.engine.remote import Replica

__all__ = ["Call", "ChatState", "LlamaServerStats", "Session", "count_usage"]

log = logging.getLogger("agentos.engine.llamaserver")

_CHAT_FORMAT = "agentos.llamaserver.chat/1"

Call = Callable[..., AbstractAsyncContextManager[tuple[Replica, httpx.Response]]]
"""``call(session_id, method, path, body, *, pinned, stream=False)``: one request, with
the embedded server started first if it was stopped."""


@dataclass(slots=True)
class ChatState:
    """A session's conversation: what the agent sees and what the server is sent."""

    messages: list[dict[str, Any]] = field(default_factory=list)  # OpenAI-shaped
    # The plain turns sent to the server; the assistant turns hold the model's own text.
    lowered: list[dict[str, str]] = field(default_factory=list)
    described: list[ToolSpec] | None = None  # the tools `lowered` describes (None: empty)
    n_tokens: int = 0  # tokens in the slot after the last call, as the server counted

    def calls_so_far(self, new: Sequence[Mapping[str, Any]] = ()) -> int:
        return sum(len(m.get("tool_calls") or ()) for m in (*self.messages, *new))

    def to_json(self) -> bytes:
        tools = None
        if self.described is not None:
            tools = [
                {"name": t.name, "description": t.description, "parameters": dict(t.parameters)}
                for t in self.described
            ]
        state = {
            "format": _CHAT_FORMAT,
            "messages": self.messages,
            "lowered": self.lowered,
            "tools": tools,
        }
        return json.dumps(state, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ChatState:
        """The state :meth:`to_json` wrote; ValueError says what is wrong with it."""
        try:
            state = json.loads(data)
        except ValueError as e:
            raise ValueError(f"conversation is not JSON: {e}") from None
        if not isinstance(state, dict) or state.get("format") != _CHAT_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"conversation format is {found!r}, expected {_CHAT_FORMAT!r}")
        messages, lowered, tools = state.get("messages"), state.get("lowered"), state.get("tools")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
        ):
            raise ValueError("conversation messages must be a list of objects with a role")
        if not isinstance(lowered, list) or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in lowered
        ):
            raise ValueError("conversation lowered turns must be {role, content} text objects")
        described: list[ToolSpec] | None = None
        if tools is not None:
            if not isinstance(tools, list) or not all(
                isinstance(t, dict)
                and isinstance(t.get("name"), str)
                and isinstance(t.get("description"), str)
                and isinstance(t.get("parameters"), dict)
                for t in tools
            ):
                raise ValueError(
                    "conversation tools must be null or a list of {name, description, parameters}"
                )
            described = [ToolSpec(t["name"], t["description"], t["parameters"]) for t in tools]
        return cls(messages, lowered, described)


@dataclass(slots=True)
class Session:
    """One open session: the slot it holds on a replica, and its history or conversation."""

    replica: Replica
    slot: int
    tokens: list[int] = field(default_factory=list)  # a text session's history
    restored: int = -1  # tokens the last restore put in the slot (-1: none)
    chat: ChatState | None = None  # a chat session's conversation (None: text, or empty)
    cold: bool = False  # its slot was emptied by a server restart and not used since


@dataclass(slots=True)
class LlamaServerStats:
    """Counters tests and ``describe model`` read."""

    saves: int = 0
    restores: int = 0
    restore_failures: int = 0
    last_cache_n: int = 0  # timings.cache_n of the latest call
    last_restore_check: tuple[int, int] | None = None  # (restored, cache_n of the next call)
    idle_stops: int = 0  # times the embedded server was stopped for idleness
    restarts: int = 0  # times a call started it again


def count_usage(
    stats: LlamaServerStats, s: Session, prompt_n: int, cache_n: int, output_n: int
) -> None:
    """Book a call's usage on its session, the engine's stats and its replica."""
    s.cold = False
    stats.last_cache_n = cache_n
    if s.restored >= 0:
        stats.last_restore_check = (s.restored, cache_n)
        if cache_n + 8 < s.restored:
            log.warning("restored %d tokens but the server reused %d", s.restored, cache_n)
        s.restored = -1
    s.replica.stats.prompt_tokens += prompt_n + cache_n
    s.replica.stats.cached_tokens += cache_n
    s.replica.stats.output_tokens += output_n
