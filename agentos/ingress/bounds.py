"""What every ingress endpoint reads from a request, bounded, and how it says no.

A webhook caller is not trusted to be small or quick: every body is capped before it is
read (``Content-Length``, then a streamed count), a body that stalls times out (408),
JSON nesting is bounded, list pages and ``?wait=`` are capped. A refusal is
:class:`Rejected`, which the app turns into the JSON error every endpoint answers with
(:func:`error`).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse

from agentos.core.durations import parse_duration
from agentos.ingress.trust import has_control

__all__ = [
    "MAX_BY_CHARS",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_TASK_WAIT_S",
    "PAGE_DEFAULT",
    "PAGE_MAX",
    "READ_IDLE_S",
    "READ_TOTAL_S",
    "Rejected",
    "error",
    "page_of",
    "paged",
    "parse_json",
    "plain",
    "read_body",
    "require_json",
    "wait_of",
]

MAX_JSON_BYTES = 256 * 1024
"""The largest answer or event body: a question's answer or an event's data, not a file."""

MAX_JSON_DEPTH = 32
"""How deeply an answer or event body may nest; deeper ones are refused (400), so no
parser, encoder or agent recurses on a caller's say-so."""

READ_IDLE_S = 10.0  # a body that sends nothing for this long is abandoned (408)
READ_TOTAL_S = 120.0  # and one that trickles (a byte every few seconds) after this long

PAGE_DEFAULT = 100
PAGE_MAX = 1000

MAX_BY_CHARS = 200

MAX_TASK_WAIT_S = 60.0


def _depth(value: Any) -> int:
    """How deeply ``value`` nests lists and objects (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level + 1)
            stack.extend((child, level + 1) for child in item)
    return deepest


def parse_json(raw: bytes | str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``raw`` as JSON (empty: None). Raises ValueError, saying why, for anything else:
    not UTF-8, not JSON, or nested deeper than ``max_depth`` levels."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except UnicodeDecodeError:
        raise ValueError("the body must be UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise ValueError(str(e)) from None
    except RecursionError:  # deeper than the parser goes: deeper than we take anyway
        value = None
        deepest = max_depth + 1
    else:
        deepest = _depth(value)
    if deepest > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    return value


class Rejected(Exception):
    """A request refused with ``status`` and an error ``code`` (the message says why)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code = status, code
        super().__init__(message)


def error(status: int, code: str, message: str) -> JSONResponse:
    """The JSON error every endpoint answers with."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def read_body(request: Request, limit: int, *, idle_s: float, total_s: float) -> bytes:
    """The body, read only while it stays within ``limit`` bytes and keeps coming.

    Raises :class:`Rejected`: 413 for a declared or streamed size over the limit
    (before reading, or as soon as the count passes it: chunked bodies too), 408 for a
    body that stalls ``idle_s`` or is not complete after ``total_s``.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Rejected(413, "too_large", f"body is larger than {limit} bytes")
    body = bytearray()
    chunks = request.stream()
    with anyio.move_on_after(total_s) as whole:
        while True:
            with anyio.move_on_after(idle_s) as idle:
                chunk = await anext(chunks, None)
            if idle.cancelled_caught:
                raise Rejected(408, "timeout", f"the body stalled for {idle_s:g}s")
            if chunk is None:
                return bytes(body)
            body += chunk
            if len(body) > limit:
                raise Rejected(413, "too_large", f"body is larger than {limit} bytes")
    assert whole.cancelled_caught
    raise Rejected(408, "timeout", f"the body was not complete after {total_s:g}s")


def require_json(request: Request) -> None:
    """Rejected (415) unless the body is declared ``application/json``."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise Rejected(
            415, "unsupported_media_type", "send the body as Content-Type: application/json"
        )


def plain(what: str, text: str) -> None:
    """Rejected (400) if ``text`` holds control characters."""
    if has_control(text):
        raise Rejected(400, "bad_text", f"{what} must not hold control characters")


def wait_of(request: Request) -> float:
    """``?wait=`` as seconds (a duration such as ``30s``; 0 when absent)."""
    raw = request.query_params.get("wait")
    if raw is None:
        return 0.0
    try:
        seconds = parse_duration(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_TASK_WAIT_S:
        raise Rejected(400, "bad_query", f"wait must be a duration from 0s to {MAX_TASK_WAIT_S:g}s")
    return seconds


def page_of(request: Request) -> tuple[int, str]:
    """``?limit=`` and ``?cursor=`` of a list endpoint."""
    raw = request.query_params.get("limit", str(PAGE_DEFAULT))
    if not raw.isdigit() or not 1 <= int(raw) <= PAGE_MAX:
        raise Rejected(400, "bad_query", f"limit must be a whole number from 1 to {PAGE_MAX}")
    return int(raw), request.query_params.get("cursor", "")


def paged(request: Request, items: list[Any], after: str | None, limit: int) -> JSONResponse:
    """A page as a JSON list; a ``Link: <...>; rel="next"`` header (RFC 8288, as GitHub
    pages) names the next one when there is more."""
    headers = {}
    if after is not None:
        nxt = f"{request.url.path}?limit={limit}&cursor={quote(after, safe='')}"
        headers["link"] = f'<{nxt}>; rel="next"'
    return JSONResponse(items, headers=headers)
