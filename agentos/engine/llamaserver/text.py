"""Text calls on a ``llamaserver`` session: ``/completion`` with the session's whole history.

The engine keeps a text session's token ids, so every call sends the whole history as
tokens and the slot's cache reuses all but the new ones (``timings.cache_n``).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from agentos.core.chat import grammar_safe
from agentos.engine.base import Completion, ContextOverflow, EngineError, StreamChunk
from agentos.engine.llamaserver.slots import Conn
from agentos.engine.llamaserver.state import Session, count_usage

__all__ = ["generate", "stream"]


async def _tokenize(conn: Conn, session_id: str, s: Session, text: str) -> list[int]:
    body = {"content": text, "add_special": not s.tokens}
    async with conn.call(session_id, "POST", "/tokenize", body, pinned=s.replica) as (
        replica,
        response,
    ):
        try:
            return [int(t) for t in response.json()["tokens"]]
        except (KeyError, TypeError, ValueError) as e:
            raise conn.client.garbage(replica, "/tokenize without tokens") from e


async def _request(
    conn: Conn,
    session_id: str,
    prompt: str,
    max_tokens: int,
    stop: Sequence[str],
    temperature: float,
    grammar: str | None,
    json_schema: Mapping[str, Any] | None,
) -> tuple[Session, list[int], dict[str, Any]]:
    if not prompt:
        raise EngineError("prompt must not be empty")
    s = conn.slots.get(session_id)
    if s.chat is not None:
        raise EngineError(
            f"session {session_id!r} holds a chat conversation; text calls (generate, "
            "stream) need a reset session"
        )
    await conn.slots.clean(session_id, s)
    new = await _tokenize(conn, session_id, s, prompt)
    total = len(s.tokens) + len(new) + max_tokens
    if conn.slot_ctx and total > conn.slot_ctx:
        raise ContextOverflow(
            f"{len(s.tokens)} + {len(new)} prompt + {max_tokens} new tokens exceed the "
            f"slot's context of {conn.slot_ctx}"
        )
    body: dict[str, Any] = {
        "prompt": [*s.tokens, *new],
        "id_slot": s.slot,
        "cache_prompt": True,
        "n_predict": max_tokens,
        "temperature": temperature,
        "return_tokens": True,
    }
    if stop:
        body["stop"] = list(stop)
    if grammar is not None:
        body["grammar"] = grammar
    if json_schema is not None:
        body["json_schema"] = grammar_safe(json_schema)  # the server builds a grammar too
    return s, new, body


def _finish(
    conn: Conn, s: Session, new: list[int], out: Sequence[int], timings: Mapping[str, Any]
) -> tuple[int, int]:
    cache_n = int(timings.get("cache_n") or 0)
    prompt_n = int(timings.get("prompt_n") or 0)
    s.tokens.extend(new)
    s.tokens.extend(out)
    count_usage(conn.stats, s, prompt_n, cache_n, len(out))
    return prompt_n, cache_n


async def generate(
    conn: Conn,
    session_id: str,
    prompt: str,
    *,
    max_tokens: int = 256,
    stop: Sequence[str] = (),
    temperature: float = 0.0,
    grammar: str | None = None,
    json_schema: Mapping[str, Any] | None = None,
) -> Completion:
    started = time.perf_counter()
    s, new, body = await _request(
        conn, session_id, prompt, max_tokens, stop, temperature, grammar, json_schema
    )
    async with conn.call(session_id, "POST", "/completion", body, pinned=s.replica) as (
        replica,
        response,
    ):
        data = response.json()
    try:
        text = str(data["content"])
        out = [int(t) for t in data.get("tokens") or []]
    except (KeyError, TypeError, ValueError) as e:
        raise conn.client.garbage(replica, f"/completion without content: {e}") from e
    timings = data.get("timings") or {}
    prompt_n, cache_n = _finish(conn, s, new, out, timings)
    elapsed = time.perf_counter() - started
    return Completion(
        text=text,
        input_tokens=prompt_n,
        output_tokens=int(timings.get("predicted_n") or len(out)),
        finish_reason="length" if data.get("stop_type") == "limit" else "stop",
        time_to_first_token_s=float(timings.get("prompt_ms") or 0.0) / 1000,
        duration_s=elapsed,
        cached_tokens=cache_n,
    )


async def stream(
    conn: Conn,
    session_id: str,
    prompt: str,
    *,
    max_tokens: int = 256,
    stop: Sequence[str] = (),
    temperature: float = 0.0,
    grammar: str | None = None,
    json_schema: Mapping[str, Any] | None = None,
) -> AsyncIterator[StreamChunk]:
    s, new, body = await _request(
        conn, session_id, prompt, max_tokens, stop, temperature, grammar, json_schema
    )
    body["stream"] = True
    out: list[int] = []
    last: dict[str, Any] = {}
    async with conn.call(
        session_id, "POST", "/completion", body, pinned=s.replica, stream=True
    ) as (replica, response):
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            try:
                event = json.loads(line[5:])
            except ValueError as e:
                raise conn.client.garbage(replica, "a stream event is not JSON") from e
            ids = tuple(int(t) for t in event.get("tokens") or [])
            out.extend(ids)
            if event.get("stop"):
                last = event
                break
            if event.get("content") or ids:
                yield StreamChunk(str(event.get("content") or ""), ids)
    _finish(conn, s, new, out, last.get("timings") or {})
    reason = "length" if last.get("stop_type") == "limit" else "stop"
    yield StreamChunk("", (), True, reason)
