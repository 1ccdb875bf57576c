"""Chat on the ``sim`` engine: scripted replies, synthetic ones, and the chat state a
snapshot carries. :class:`SimChat` is the engine's collaborator for it.

Chat (:meth:`SimEngine.chat`) is where agent authors and tests drive an agent: replies
are *scripted* per session (:meth:`SimEngine.script`, the session id being the agent's
name) and taken in order; scripts belong to the agent, not to its slot, so they survive
``close_session`` / ``open_session`` and an agent that hibernates mid-script goes on
with it. With the script empty the reply is synthetic: the words :meth:`generate` would
give, up to the first ``.`` (``finish_reason`` "stop", "length" at ``max_tokens``), or
under ``tool_choice="required"`` / a tool's name a call to that tool (the first one for
"required") whose arguments are the schema's required properties with plain defaults
(``0``, ``""``, ``false``, ``[]``, ``{}``; ``const``/``enum`` first values). Token
accounting is real: the conversation is lowered and rendered with the ``plain``
template like a base model's would be, the new turns' tokens are prefilled and the
reply's rendered tokens decoded through the same steps as ``generate`` (delays, stats,
``parallel=N`` turns, overflow), so usage is append-only exactly as on llama.cpp.
Where llama would cut a reply at a full context with "length", the sim raises
:class:`ContextOverflow` for any chat whose turns and reply do not fit under
``overflow="raise"``. A chat that raises or is cancelled leaves the session, its
conversation and its script as they were. ``stop``, ``temperature``,
``response_format`` and ``parallel_tool_calls`` are accepted and ignored, as
``grammar`` is: a scripted reply is returned as given, even a call to a tool that was
not offered (the SDK answers it with an unknown-tool error).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import anyio.lowlevel

from agentos.core.chat import (
    Reply,
    TokenUsage,
    ToolCall,
    ToolSpec,
    generation_prompt,
    lower_messages,
    render,
    render_turn,
)
from agentos.engine.base import EngineError
from agentos.engine.sim.state import SimSession, SimStats, pack
from agentos.engine.sim.turns import SimTurns
from agentos.engine.sim.vocab import SimVocab

__all__ = ["Scripted", "SimChat", "chat_state", "read_chat_state"]

Scripted = str | ToolCall | Sequence[ToolCall] | Reply
"""One scripted chat reply: text, one tool call, parallel calls, or a whole :class:`Reply`."""

# The template a base model without one of its own gets; chat usage counts its tokens.
_TEMPLATE = "plain"
_CHAT_FORMAT = "agentos.sim.chat/1"
# Plain values that validate against the common JSON Schema types.
_TYPED_DEFAULTS: dict[str, Any] = {
    "string": "",
    "integer": 0,
    "number": 0,
    "boolean": False,
    "array": [],
    "object": {},
    "null": None,
}


class SimChat:
    """The chat calls of :class:`~agentos.engine.sim.SimEngine`, on its sessions, its
    vocabulary and its turns; the scripts are kept here, keyed by session id."""

    def __init__(
        self,
        *,
        vocab: SimVocab,
        turns: SimTurns,
        stats: SimStats,
        n_ctx: int,
        prefill_s: float,
        decode_s: float,
    ) -> None:
        self._vocab = vocab
        self._turns = turns
        self._stats = stats
        self._n_ctx = n_ctx
        self._prefill_s = prefill_s
        self._decode_s = decode_s
        # Keyed by session id and kept across close/open: the agent owns its script.
        self._scripts: dict[str, deque[Reply]] = {}

    def script(self, session_id: str, *replies: Scripted) -> None:
        """Queue ``replies`` for the session's next chat calls, in order.

        A ``str`` is an answer (finish "stop"); a :class:`ToolCall` one call and a list or
        tuple of them parallel calls (finish "tool_calls"); a :class:`Reply` is returned
        as given, with the sim's usage. A call with an empty id gets ``call_{n}`` when it
        is returned, ``n`` counting the calls in the conversation so far. The session need
        not be open: the script belongs to the agent and survives close/open. Raises
        TypeError naming the first reply that is none of these.
        """
        queued: list[Reply] = []
        for i, item in enumerate(replies):
            queued.append(scripted_reply(session_id, i, item))
        self._scripts.setdefault(session_id, deque()).extend(queued)

    def scripted_left(self, session_id: str) -> int:
        """How many scripted replies the session has not been given yet."""
        return len(self._scripts.get(session_id, ()))

    async def chat(
        self,
        session: SimSession,
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
        """Append ``messages`` (already validated new turns) and answer with the next
        scripted reply, or a synthetic one (see the module docstring); the reply is
        appended too. Usage: input = the new turns' rendered tokens, cached = the tokens
        the session held, output = the reply's rendered tokens. Raises
        :class:`ContextOverflow` (``overflow="raise"``) and :class:`EngineError` (a busy
        session under ``parallel=N``, a closed one) as :meth:`generate` does; on any
        failure the session, its conversation and its script are left as they were.
        """
        if max_tokens < 0:
            raise EngineError(f"max_tokens must be >= 0, got {max_tokens}")
        self._turns.check_idle(session, "chat")
        start = time.perf_counter()
        new = [copy.deepcopy(dict(m)) for m in messages]
        specs = [plain_spec(t) for t in tools]
        lowered = lower_messages(new, specs, described=session.described)
        prompt_ids = self._vocab.encode(render(_TEMPLATE, lowered, add_generation_prompt=True))
        n_calls = sum(len(m.get("tool_calls") or ()) for m in (*session.messages, *new))

        script = self._scripts.get(session.session_id)
        queued = script.popleft() if script else None
        scripted = with_ids(queued, n_calls) if queued is not None else None
        scripted_ids = self._reply_ids(scripted, specs) if scripted is not None else None
        held = len(session.tokens)
        saved_tokens = list(session.tokens)
        saved_hasher = session.hasher.copy() if session.hasher is not None else None
        first: float | None = None
        try:
            # A synthetic reply needs one token of room at least, as generate() does.
            self._turns.check_fits(session, len(prompt_ids) + len(scripted_ids or (0,)))
            async with self._turns.call(session, "chat"):
                async with self._turns.step(session):
                    # Without parallel=N another call may have grown the context since.
                    self._turns.check_fits(session, len(prompt_ids) + len(scripted_ids or (0,)))
                    session.extend(prompt_ids, self._n_ctx)
                    self._stats.prefill_tokens += len(prompt_ids)
                    await anyio.lowlevel.checkpoint()
                    if self._prefill_s > 0:
                        await anyio.sleep(self._prefill_s * len(prompt_ids))
                    if scripted is None:
                        reply = self._synthetic(session, specs, tool_choice, n_calls, max_tokens)
                        reply_ids = self._reply_ids(reply, specs)
                    else:
                        reply, reply_ids = scripted, scripted_ids or []
                    self._turns.check_fits(session, len(prompt_ids) + len(reply_ids), held=held)
                for token in reply_ids:
                    async with self._turns.step(session):
                        if self._decode_s > 0:
                            await anyio.sleep(self._decode_s)
                        session.extend((token,), self._n_ctx)
                    self._stats.decode_tokens += 1
                    if first is None:
                        first = time.perf_counter()
        except BaseException:
            session.rewind(saved_tokens, saved_hasher)
            if queued is not None:
                self._scripts.setdefault(session.session_id, deque()).appendleft(queued)
            raise
        end = time.perf_counter()
        reply = dataclasses.replace(
            reply,
            usage=TokenUsage(len(prompt_ids), held, len(reply_ids)),
            time_to_first_token_s=(first if first is not None else end) - start,
            duration_s=end - start,
        )
        session.messages.extend(new)
        session.messages.append(reply.message())
        if specs or session.described is None:
            session.described = specs
        self._stats.chats += 1
        return reply

    def _reply_ids(self, reply: Reply, specs: list[ToolSpec]) -> list[int]:
        """Tokens of the reply as the model writes it after the generation prompt."""
        # Lowered against the tools just described, so no description turn comes with it.
        (turn,) = lower_messages([reply.message()], specs, described=specs)
        whole = render_turn(_TEMPLATE, "assistant", turn["content"])
        return self._vocab.encode(whole.removeprefix(generation_prompt(_TEMPLATE)))

    def _synthetic(
        self,
        session: SimSession,
        specs: list[ToolSpec],
        tool_choice: str,
        n_calls: int,
        max_tokens: int,
    ) -> Reply:
        """The reply when the script is empty: a call the choice forces, or generated words."""
        if tool_choice in ("auto", "none"):
            forced = None
        elif tool_choice == "required":
            forced = specs[0] if specs else None
        else:
            forced = next((t for t in specs if t.name == tool_choice), None)
        if forced is not None:
            call = ToolCall(f"call_{n_calls}", forced.name, default_arguments(forced.parameters))
            return Reply(None, (call,), "tool_calls")
        # Sampled the way generate() samples, on a copy of the context's running hash.
        hasher = session.fork()
        after_newline = not session.tokens or session.tokens[-1] == self._vocab.newline
        pieces: list[str] = []
        for _ in range(max_tokens):
            token, piece = self._vocab.draw(hasher.digest(), after_newline)
            hasher.update(pack((token,)))
            after_newline = token == self._vocab.newline
            pieces.append(piece)
            if piece == ".":
                return Reply("".join(pieces).strip(), (), "stop")
        return Reply("".join(pieces).strip(), (), "length")


def scripted_reply(session_id: str, index: int, item: object) -> Reply:
    if isinstance(item, Reply):
        return item
    if isinstance(item, str):
        return Reply(item, (), "stop")
    if isinstance(item, ToolCall):
        return Reply(None, (item,), "tool_calls")
    if isinstance(item, list | tuple) and item and all(isinstance(c, ToolCall) for c in item):
        return Reply(None, tuple(item), "tool_calls")
    raise TypeError(
        f"script({session_id!r}): reply {index} is {type(item).__name__} {item!r:.80}; "
        "expected a str, a ToolCall, a non-empty list of ToolCall or a Reply"
    )


def with_ids(reply: Reply, n_calls: int) -> Reply:
    """``reply`` with ``call_{n}`` ids on its calls that have none, ``n`` counting on."""
    if all(c.id for c in reply.tool_calls):
        return reply
    calls = tuple(
        c if c.id else dataclasses.replace(c, id=f"call_{n_calls + i}")
        for i, c in enumerate(reply.tool_calls)
    )
    return dataclasses.replace(reply, tool_calls=calls)


def plain_spec(tool: ToolSpec) -> ToolSpec:
    """``tool`` with plain JSON parameters, so specs restored from a snapshot compare equal."""
    params = json.loads(json.dumps(dict(tool.parameters)))
    return ToolSpec(tool.name, tool.description, params)


def default_arguments(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments with every required property of ``schema`` set to a plain value."""
    value = _example(schema, schema, 0)
    return value if isinstance(value, dict) else {}


def _example(schema: Any, root: Mapping[str, Any], depth: int) -> Any:
    if not isinstance(schema, Mapping) or depth > 32:  # 32: a self-referencing $ref
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, Mapping) else None
        return _example(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return _example(schema[key][0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties")
        props = props if isinstance(props, Mapping) else {}
        required = schema.get("required")
        names = [n for n in required if isinstance(n, str)] if isinstance(required, list) else []
        return {n: _example(props.get(n, {}), root, depth + 1) for n in names}
    return copy.copy(_TYPED_DEFAULTS.get(kind)) if isinstance(kind, str) else None


def chat_state(session: SimSession) -> bytes:
    """The session's chat as :attr:`KVSnapshot.conversation` carries it; b"" without one."""
    if session.described is None and not session.messages:
        return b""
    tools = None
    if session.described is not None:
        tools = [
            {"name": t.name, "description": t.description, "parameters": dict(t.parameters)}
            for t in session.described
        ]
    state = {"format": _CHAT_FORMAT, "messages": session.messages, "tools": tools}
    return json.dumps(state, ensure_ascii=False, separators=(",", ":")).encode()


def read_chat_state(data: bytes) -> tuple[list[dict[str, Any]], list[ToolSpec] | None]:
    """Messages and described tools from :func:`chat_state`'s bytes; ValueError says what
    is wrong with them."""
    if not data:
        return [], None
    try:
        state = json.loads(data)
    except ValueError as e:  # UnicodeDecodeError is one
        raise ValueError(f"conversation is not JSON: {e}") from None
    if not isinstance(state, dict) or state.get("format") != _CHAT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"conversation format is {found!r}, expected {_CHAT_FORMAT!r}")
    messages = state.get("messages")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
    ):
        raise ValueError("conversation messages must be a list of objects with a role")
    tools = state.get("tools")
    if tools is None:
        return messages, None
    specs: list[ToolSpec] = []
    if isinstance(tools, list):
        for t in tools:
            if not (
                isinstance(t, dict)
                and isinstance(t.get("name"), str)
                and isinstance(t.get("description"), str)
                and isinstance(t.get("parameters"), dict)
            ):
                break
            specs.append(ToolSpec(t["name"], t["description"], t["parameters"]))
        else:
            return messages, specs
    raise ValueError("conversation tools must be null or a list of {name, description, parameters}")
