"""Which chat template the ``llamaserver`` engine's embedded server renders with.

A GGUF without a chat template (the default Gemma 3 270M base model has none) gets one
from the Model's ``chatTemplate``, else the built-in ``gemma``; a server at an endpoint
renders with its own, and its ``/props`` says which built-in (if any) that is, for the
stop strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agentos.core.chat import TEMPLATES
from agentos.engine.base import EngineError

__all__ = ["DEFAULT_TEMPLATE", "ServerTemplate", "builtin_of", "server_template"]

DEFAULT_TEMPLATE = "gemma"
"""The template a GGUF without one gets when the Model names none.

``gemma`` renders turns with the Gemma vocabulary's own special tokens
(``<start_of_turn>``, ``<end_of_turn>``, an end-of-generation token), so a turn ends
where the model stops. Measured on the default Gemma 3 270M base model, 1 thread, the
same lowered tool prompt with ``tool_choice`` required and auto: 3 of 3 prompts gave a
call with the right arguments under both ``gemma`` and ``chatml``, in 107 prompt tokens
with ``gemma`` against 143 with ``chatml`` (whose markers are plain text to this
vocabulary), so ``gemma`` is the cheaper choice.
"""

# The built-in "plain" template (agentos.core.chat.render_turn) as Jinja for the server,
# which has no such built-in.
_PLAIN_JINJA = (
    "{%- for m in messages -%}{{ m['role'] }}: {{ m['content'] }}\n{% endfor -%}"
    "{%- if add_generation_prompt -%}assistant:{%- endif -%}"
)
_LLAMA_CPP_BUILTINS = ("gemma", "chatml")  # names llama.cpp knows without Jinja


@dataclass(frozen=True, slots=True)
class ServerTemplate:
    """How the embedded server is told to render chat (``CommonParams`` fields)."""

    chat_template: str  # "" keeps the GGUF's own
    use_jinja: bool
    builtin: str | None  # the agentos built-in it is (for stop strings), if any


def server_template(choice: str | None, gguf_template: bool) -> ServerTemplate:
    """The template the embedded server gets for the Model's ``chatTemplate``.

    ``choice`` is a built-in name (``gemma``, ``chatml``, ``plain``), a path to a Jinja
    file, or None: the GGUF's own template when it has one (``gguf_template``), else
    :data:`DEFAULT_TEMPLATE`. Without Jinja llama.cpp takes its built-in names; with
    Jinja the string is the template's source (a bare name would render as that text).
    Raises :class:`EngineError` naming a Jinja file that cannot be read.
    """
    if choice is None:
        if gguf_template:
            return ServerTemplate("", True, None)
        choice = DEFAULT_TEMPLATE
    if choice in _LLAMA_CPP_BUILTINS:
        return ServerTemplate(choice, False, choice)
    if choice == "plain":
        return ServerTemplate(_PLAIN_JINJA, True, "plain")
    try:
        source = Path(choice).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EngineError(
            f"chatTemplate {choice!r} is not a built-in ({', '.join(TEMPLATES)}) and its Jinja "
            f"file cannot be read: {e}"
        ) from e
    if not source.strip():
        raise EngineError(f"chatTemplate file {choice} is empty")
    return ServerTemplate(source, True, None)


def builtin_of(chat_template: str) -> str | None:
    """Which agentos built-in a server's ``/props`` ``chat_template`` is (None: another)."""
    if chat_template in _LLAMA_CPP_BUILTINS:
        return chat_template
    return "plain" if chat_template == _PLAIN_JINJA else None
