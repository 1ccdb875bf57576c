"""The ``llamaserver`` engine's own synchronous requests: ``/props`` and ``/tokenize``.

They run where no event loop may be used (the engine's constructor, ``count_tokens``
from a worker thread) and carry the Model's credentials like every other request.
``count_tokens`` on the event loop must not block: it answers from a cache of exact
counts, else with an estimate the call's real usage settles afterwards.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import httpx

from agentos.engine.base import EngineUnavailable, ModelMisconfigured

__all__ = ["SyncProbe", "estimate_tokens"]

_ESTIMATE_CHARS_PER_TOKEN = 4  # Gemma's 262k vocabulary on English text, roughly
_COUNT_CACHE = 1024  # exact token counts kept for count_tokens


def estimate_tokens(text: str) -> int:
    """One token per 4 characters, at least one."""
    return max(1, -(-len(text) // _ESTIMATE_CHARS_PER_TOKEN))


class SyncProbe:
    """A blocking HTTP client for a server's ``/props`` and ``/tokenize``."""

    def __init__(
        self, *, api_key: str | None, connect_timeout_s: float, request_timeout_s: float
    ) -> None:
        self._sync = httpx.Client(
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
            timeout=httpx.Timeout(request_timeout_s, connect=connect_timeout_s),
        )
        self._counts: OrderedDict[str, int] = OrderedDict()  # text -> exact token count

    def close(self) -> None:
        self._sync.close()

    def props(self, url: str, *, model: str, scrub: Callable[[str], str]) -> dict[str, Any]:
        """The server's ``/props``. Raises :class:`ModelMisconfigured` when it refuses the
        credentials, :class:`EngineUnavailable` when it does not answer with an object."""
        try:
            response = self._sync.get(url + "/props")
        except httpx.HTTPError as e:
            raise EngineUnavailable(f"llama.cpp server at {url} did not answer /props: {e}") from e
        if response.status_code in (401, 403):
            # The Model's fault, not the server's: retrying will not help.
            detail = scrub(response.text)
            raise ModelMisconfigured(
                model,
                f"llama.cpp server at {url} refused the model's credentials "
                f"(HTTP {response.status_code} on /props: {detail}); check the Model's "
                "credentials.apiKey",
            )
        try:
            response.raise_for_status()
            props = response.json()
        except (httpx.HTTPError, ValueError) as e:
            raise EngineUnavailable(
                f"llama.cpp server at {url} did not answer /props: {scrub(str(e))}"
            ) from e
        if not isinstance(props, dict):
            raise EngineUnavailable(f"llama.cpp server at {url}: /props is not an object")
        return props

    def special_ids(self, url: str, text: str) -> list[int]:
        """The id of the one special token ``text`` is, else [] (an unknown vocabulary)."""
        try:
            response = self._sync.post(
                url + "/tokenize",
                json={"content": text, "add_special": False, "parse_special": True},
            )
            response.raise_for_status()
            ids = [int(t) for t in response.json()["tokens"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return []
        return ids if len(ids) == 1 else []

    def count_tokens(self, url: str, text: str) -> int:
        """Tokens ``text`` encodes to: exact off the event loop, else cached or estimated.

        The tokenizer lives in the server, so an exact count is an HTTP round trip. Called
        on the event loop (the SDK sizes a call's quota there) it must not block: it
        returns the exact count when this text was counted before, else an estimate of
        one token per 4 characters; the call's real usage settles the quota afterwards.
        From a thread (or with no loop) it asks the server, with the Model's credentials.
        """
        cached = self._counts.get(text)
        if cached is not None:
            self._counts.move_to_end(text)
            return cached
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # no loop in this thread: blocking is fine
        else:
            return estimate_tokens(text)
        n = self._tokenize(url, text)
        if n is None:
            return estimate_tokens(text)
        self._counts[text] = n
        if len(self._counts) > _COUNT_CACHE:
            self._counts.popitem(last=False)
        return n

    def _tokenize(self, url: str, text: str) -> int | None:
        try:
            response = self._sync.post(
                url + "/tokenize", json={"content": text, "add_special": False}
            )
            response.raise_for_status()
            return len(response.json()["tokens"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None  # away or refusing: the caller estimates
