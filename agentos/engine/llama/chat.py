"""Chat sessions on the in-process llama engine: which template renders a session's turns,
and the state that keeps its context append-only across calls and hibernation.

A llama.cpp sequence is a token list that only grows (rewinding one restored past its
sliding window corrupts it silently), so a chat call must prefill only what its new turns
add. This module plans that text and keeps what is needed to plan the next one:

* The template is the engine's ``chat_template`` option (a built-in name from
  :data:`agentos.core.chat.TEMPLATES` or a Jinja file), else the GGUF's
  ``tokenizer.chat_template``, else ``plain`` (``role: content`` lines; the default
  Gemma 3 270M base model has no template).
* Turns are lowered first (:func:`~agentos.core.chat.lower_messages`): tools described in
  a system turn, calls and results as plain turns, so any template renders them. The
  assistant turns keep the model's own generated text, never a re-dump of the parsed
  reply, so the rendered text of the conversation is the text in the KV.
* A built-in template renders only the new turns, after closing the previous assistant
  turn. A Jinja template can only render a whole conversation: it is rendered whole and
  the part after the text already in the context is prefilled; when the old text is not
  a prefix of the new rendering (a template that trims or reorders), the context is
  rebuilt from the whole rendering.

Everything here is pure (no llama.cpp calls): the engine tokenizes and decodes.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from agentos.core.chat import (
    TEMPLATES,
    ToolSpec,
    lower_messages,
    render,
    template_stops,
    tool_call_schema,
    turn_end,
)

__all__ = ["ChatState", "ChatTemplate", "TurnPlan", "load_template", "output_schema", "plan_turn"]

_STATE_FORMAT = 1
_SENTINEL = "\x00agentos-turn-end-probe\x00"


class ChatTemplate:
    """A chat template: a built-in one (``gemma``, ``chatml``, ``plain``) or Jinja source.

    ``origin`` says where it came from, for error messages. ``bos`` / ``eos`` are the
    model's token texts, given to Jinja templates as ``bos_token`` / ``eos_token``.
    """

    __slots__ = ("_jinja", "bos", "eos", "key", "name", "origin", "source", "stops")

    def __init__(
        self, name: str, *, source: str = "", origin: str = "", bos: str = "", eos: str = ""
    ) -> None:
        self.name = name
        self.source = source
        self.origin = origin or name
        self.bos = bos
        self.eos = eos
        self._jinja: jinja2.Template | None = None
        if name == "jinja":
            digest = hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]
            self.key = f"jinja:{digest}"
            self._jinja = _compile(source, self.origin)
            self.stops = self._jinja_stops()
        elif name in TEMPLATES:
            self.key = name
            self.stops = template_stops(name)
        else:
            raise ValueError(
                f"unknown chat template {name!r} (built-in: {', '.join(TEMPLATES)}, or jinja)"
            )

    def __repr__(self) -> str:
        return f"ChatTemplate({self.key!r}, origin={self.origin!r})"

    @property
    def is_jinja(self) -> bool:
        """Whether this template renders whole conversations only (append by prefix)."""
        return self._jinja is not None

    def render(
        self, turns: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """Lowered turns as the text to tokenize (without BOS: the engine adds the token).

        Raises ValueError when a Jinja template refuses the conversation.
        """
        if self._jinja is None:
            return render(self.name, turns, add_generation_prompt=add_generation_prompt)

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        try:
            text = self._jinja.render(
                messages=_merge_users(turns),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos,
                eos_token=self.eos,
                raise_exception=raise_exception,
                strftime_now=lambda f: datetime.now().strftime(f),
            )
        except (jinja2.TemplateError, ValueError, TypeError) as e:
            raise ValueError(f"chat template {self.origin} refused the conversation: {e}") from e
        # The engine puts the BOS token in front of a session's first prompt itself.
        if self.bos and text.startswith(self.bos):
            text = text[len(self.bos) :]
        return text

    def _jinja_stops(self) -> tuple[str, ...]:
        """What ends an assistant turn in this template, found by rendering a probe turn."""
        stops: list[str] = []
        try:
            probe = self.render(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}],
                add_generation_prompt=False,
            )
        except ValueError:
            probe = ""
        if _SENTINEL in probe:
            after = probe.split(_SENTINEL, 1)[1].strip()
            end = after.split("\n", 1)[0].strip()
            if end:
                stops.append(end)
        if self.eos and self.eos not in stops:
            stops.append(self.eos)
        return tuple(stops)


def _compile(source: str, origin: str) -> jinja2.Template:
    # The environment of llama-cpp-python's Jinja2ChatFormatter (and Transformers'):
    # sandboxed, trimmed blocks, loop controls, {% generation %} ignored, tojson unescaped.
    env = ImmutableSandboxedEnvironment(
        loader=jinja2.BaseLoader(),
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[Jinja2ChatFormatter.IgnoreGenerationTags, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = Jinja2ChatFormatter.tojson
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template {origin} is not valid Jinja: {e}") from e


def _merge_users(turns: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Consecutive user turns as one: lowered tool results are user turns, and many
    templates refuse two user turns in a row. Only turns after an assistant turn merge,
    so an earlier conversation's rendering stays a prefix."""
    out: list[dict[str, str]] = []
    for t in turns:
        if out and t["role"] == "user" and out[-1]["role"] == "user":
            out[-1] = {"role": "user", "content": f"{out[-1]['content']}\n\n{t['content']}"}
        else:
            out.append({"role": t["role"], "content": t["content"]})
    return out


def load_template(
    option: str | None, gguf_source: str | None, *, bos: str = "", eos: str = ""
) -> ChatTemplate:
    """The template a model's chats use: ``option`` (a built-in name or a Jinja file's
    path), else the GGUF's ``tokenizer.chat_template`` (Jinja), else ``plain``.

    Raises ValueError for an option that is neither a built-in name nor a readable Jinja
    file, and for Jinja that does not compile.
    """
    if option is not None:
        if option in TEMPLATES:
            return ChatTemplate(option, origin=f"{option!r} (chat_template option)")
        path = Path(option).expanduser()
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(
                f"chat_template {option!r} is neither a built-in template "
                f"({', '.join(TEMPLATES)}) nor a readable Jinja file: {e}"
            ) from None
        return ChatTemplate("jinja", source=source, origin=str(path), bos=bos, eos=eos)
    if gguf_source:
        return ChatTemplate(
            "jinja", source=gguf_source, origin="tokenizer.chat_template", bos=bos, eos=eos
        )
    return ChatTemplate("plain", origin="'plain' (the model has no chat template)")


# ---------------------------------------------------------------------- session state


@dataclass(slots=True)
class ChatState:
    """A session's chat, enough to continue it append-only (also after a wake).

    ``text`` is the session's context as text (what was prefilled and generated, as
    rendered here), and ``n_tokens`` how many tokens the session held when ``text`` was
    last true; a session whose token count differs (text used in between, a failed or
    cancelled call) is rebuilt from ``lowered`` on the next chat.
    """

    template: str  # ChatTemplate.key the text was rendered with
    messages: list[dict[str, Any]] = field(default_factory=list)  # OpenAI-shaped
    lowered: list[dict[str, str]] = field(default_factory=list)
    described: list[ToolSpec] | None = None  # tools the text describes; None: not started
    text: str = ""
    n_tokens: int = 0
    open_turn: bool = False  # the text ends inside an assistant turn the model generated
    tail: str = ""  # what the model generated after its content (a stop string), in the KV

    def to_json(self) -> bytes:
        """The state as the engine's JSON for ``KVSnapshot.conversation``."""
        described = (
            None
            if self.described is None
            else [
                {"name": t.name, "description": t.description, "parameters": dict(t.parameters)}
                for t in self.described
            ]
        )
        data = {
            "format": _STATE_FORMAT,
            "template": self.template,
            "messages": self.messages,
            "lowered": self.lowered,
            "described": described,
            "text": self.text,
            "n_tokens": self.n_tokens,
            "open_turn": self.open_turn,
            "tail": self.tail,
        }
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> ChatState:
        """Inverse of :meth:`to_json`; raises ValueError saying what is wrong."""
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"chat state is not JSON: {e}") from None
        if not isinstance(raw, dict) or raw.get("format") != _STATE_FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"chat state has format {got!r}, expected {_STATE_FORMAT}")
        try:
            described = raw["described"]
            state = cls(
                template=str(raw["template"]),
                messages=[dict(m) for m in raw["messages"]],
                lowered=[
                    {"role": str(t["role"]), "content": str(t["content"])} for t in raw["lowered"]
                ],
                described=None
                if described is None
                else [
                    ToolSpec(str(t["name"]), str(t["description"]), dict(t["parameters"]))
                    for t in described
                ],
                text=str(raw["text"]),
                n_tokens=int(raw["n_tokens"]),
                open_turn=bool(raw["open_turn"]),
                tail=str(raw["tail"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"chat state is missing or mistypes a field: {e!r}") from None
        return state

    def copy(self) -> ChatState:
        """A deep copy (callers get messages they may change)."""
        return copy.deepcopy(self)


@dataclass(frozen=True, slots=True)
class TurnPlan:
    """What one chat call prefills, and the conversation it prefills it for."""

    prompt: str  # the text to prefill now (non-empty: it ends with the generation prompt)
    reset: bool  # empty the session first: ``prompt`` renders the whole conversation
    messages: list[dict[str, Any]]  # every message once the call's turns are added
    lowered: list[dict[str, str]]  # their lowered turns (before the coming assistant turn)
    described: list[ToolSpec]
    text: str  # the context's text once ``prompt`` is prefilled

    def finish(
        self, template: str, generated: str, content: str, n_tokens: int, reply: Mapping[str, Any]
    ) -> ChatState:
        """The state after the model generated ``generated`` (all its tokens' text, of
        which ``content`` is its own turn and the rest a stop string left in the KV)."""
        own = content if generated.startswith(content) else generated
        turn = own
        if template == "plain" and turn.startswith(" "):
            # plain's turn is "assistant: TEXT" after the prompt "assistant:": a rebuild
            # then renders the space the model wrote once, not twice.
            turn = turn[1:]
        return ChatState(
            template=template,
            messages=[*self.messages, dict(reply)],
            lowered=[*self.lowered, {"role": "assistant", "content": turn}],
            described=self.described,
            text=self.text + generated,
            n_tokens=n_tokens,
            open_turn=True,
            tail=generated[len(own) :],
        )


def plan_turn(
    template: ChatTemplate,
    state: ChatState | None,
    n_tokens: int,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[ToolSpec],
) -> TurnPlan:
    """Plan a chat call: the new turns lowered, and the text to prefill for them.

    ``n_tokens`` is how many tokens the session holds now. The context is continued
    when ``state`` describes it (same template, same token count); otherwise the whole
    conversation is rendered and ``reset`` is set. Raises ValueError when a Jinja
    template refuses the conversation.
    """
    new = [dict(m) for m in messages]
    described = state.described if state is not None else None
    lowered_new = lower_messages(new, tools, described=described)
    old_lowered = state.lowered if state is not None else []
    lowered = [*old_lowered, *lowered_new]
    now_described = list(tools) if tools else list(described or [])
    old_messages = state.messages if state is not None else []
    continues = (
        state is not None
        and state.template == template.key
        and state.n_tokens == n_tokens
        and n_tokens > 0
    )
    prompt, reset = "", True
    if continues and state is not None:
        if template.is_jinja:
            # A Jinja template renders whole conversations only: prefill the part after
            # the text already in the context, or rebuild when that text is no prefix.
            whole = template.render(lowered)
            if whole.startswith(state.text) and len(whole) > len(state.text):
                prompt, reset = whole[len(state.text) :], False
        else:
            prompt = (turn_end(template.name) if state.open_turn else "") + template.render(
                lowered_new
            )
            # A stop string the model generated stays in the KV; when it begins what
            # comes next (plain's "\nuser:"), only the rest is prefilled.
            if state.tail and prompt.startswith(state.tail):
                prompt = prompt[len(state.tail) :]
            reset = False
    if reset:
        prompt = template.render(lowered)
        if not prompt:
            raise ValueError(f"chat template {template.origin} rendered no text for the turns")
    base = state.text if (state is not None and not reset) else ""
    return TurnPlan(
        prompt=prompt,
        reset=reset,
        messages=[*old_messages, *new],
        lowered=lowered,
        described=now_described,
        text=base + prompt,
    )


def output_schema(
    tools: Sequence[ToolSpec], tool_choice: str, response_format: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """The JSON Schema a chat reply is constrained to, or None for free text.

    Tools (unless ``tool_choice`` is ``none``) give :func:`tool_call_schema`; otherwise
    OpenAI's ``response_format`` decides: ``json_schema`` its schema, ``json_object``
    any object, ``text`` nothing. Raises ValueError for a format it cannot read.
    """
    if tools and tool_choice != "none":
        return tool_call_schema(tools, tool_choice)
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise ValueError("response_format json_schema needs json_schema.schema, an object")
        return dict(schema)
    raise ValueError(f"response_format type {kind!r} is not one of text, json_object, json_schema")
