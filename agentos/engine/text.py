"""Text helpers the engines that stream on their own share, so each rule lives once.

An engine that samples token by token (``sim``, ``llama``) must not emit the start of a
stop string before it knows whether the stop string completes; what it may send is
decided here. Its ``generate`` is its stream collected into one :class:`Completion`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from agentos.engine.base import Completion, StreamChunk

__all__ = ["collect", "stop_prefix_len"]


def stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-k:]):
                longest = k
                break
    return longest


async def collect(
    chunks: AsyncIterator[StreamChunk], *, start: float, input_tokens: int, cached_tokens: int = 0
) -> Completion:
    """``chunks`` read to the end as one :class:`Completion`; ``start`` is the
    ``time.perf_counter()`` the call began at (the first token's time counts from it)."""
    first: float | None = None
    parts: list[str] = []
    n_out = 0
    reason = "length"
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
        input_tokens=input_tokens,
        output_tokens=n_out,
        finish_reason=reason,
        time_to_first_token_s=(first if first is not None else end) - start,
        duration_s=end - start,
        cached_tokens=cached_tokens,
    )
