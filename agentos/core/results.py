"""A task's result as text a person can read, so ``tasks`` and ``send --wait`` show no reprs.

An agent's ``act`` returns whatever it likes (a string, a pydantic model, a Struct, a
dict), or sets its result with ``ctx.set_result``. The runtime stores the text that
:func:`render_result` makes of it: a string as itself, data as compact JSON, so the
result can be read by a person and parsed by a script alike. Tables show it through
:func:`summarize`, on one line.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pydantic

__all__ = ["DEFAULT_RESULT_LIMIT", "render_result", "summarize"]

DEFAULT_RESULT_LIMIT = 65536  # characters of a task record's result field

_ELLIPSIS = "…"


def _plain(obj: Any) -> Any:
    """What msgspec cannot encode itself: pydantic models by their own JSON rules (or
    field by field when those fail), the rest by ``str()``."""
    if isinstance(obj, pydantic.BaseModel):
        try:
            return obj.model_dump(mode="json")
        except ValueError:  # a field pydantic cannot serialize: msgspec takes it from here
            return obj.model_dump()
    return str(obj)


_json = msgspec.json.Encoder(enc_hook=_plain)


def _cut_marker(total: int) -> str:
    return f"{_ELLIPSIS}[truncated; {total:,} characters in all]"


def render_result(value: Any, *, limit: int = DEFAULT_RESULT_LIMIT) -> str:
    """The text a task record shows for ``value``, at most ``limit`` characters.

    A ``str`` is itself and None is ``""``; anything else (pydantic models, msgspec
    Structs, dataclasses, dicts, lists, tuples, numbers, booleans) is compact JSON in
    field order, where parts JSON cannot carry become their ``str()`` and bytes are
    base64. A value that cannot be encoded at all (a cycle) is its ``str()``. Text longer
    than ``limit`` is cut and ends with ``…[truncated; N characters in all]``, so the cut
    cannot be mistaken for the whole. Raises ValueError for a ``limit`` below 1.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if value is None:
        return ""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = _json.encode(value).decode()
        except (TypeError, ValueError, RecursionError, msgspec.EncodeError):
            text = str(value)
    if len(text) <= limit:
        return text
    marker = _cut_marker(len(text))
    if len(marker) >= limit:
        return text[: limit - 1] + _ELLIPSIS
    return text[: limit - len(marker)] + marker


def summarize(text: str, width: int) -> str:
    """``text`` on one line of at most ``width`` characters, for a table cell.

    Runs of whitespace (newlines and tabs included) become one space and the ends are
    stripped; a longer text is cut and ends with ``…``. Raises ValueError for a
    ``width`` below 1.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    line = " ".join(text.split())
    if len(line) <= width:
        return line
    return line[: width - 1].rstrip() + _ELLIPSIS
