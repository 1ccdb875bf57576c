"""Fleet-wide state of declared models: the provider throttle every daemon honours.

A provider's rate limit (429 / 503 with ``Retry-After``) is one limit for every agent
that uses the model, on every daemon: the daemon that is told first records until when,
and the others read it before their next call to that model.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

from agentos.store.errors import translate
from agentos.store.keys import Keys

__all__ = ["ModelOps"]


class ModelOps:
    """Model methods of :class:`agentos.store.Store` (mixed in; uses its client and keys)."""

    _r: Any
    keys: Keys
    _throttle_script: Any = None

    @translate
    async def model_throttle(self, model: str, until: float) -> None:
        """Record that ``model`` is throttled until ``until`` (epoch s; never shortened)."""
        if self._throttle_script is None:
            source = resources.files("agentos.store").joinpath("lua/model_throttle.lua")
            self._throttle_script = self._r.register_script(source.read_text())
        await self._throttle_script(keys=[self.keys.model_throttle], args=[model, repr(until)])

    @translate
    async def model_throttled_until(self, model: str) -> float:
        """Until when ``model`` is throttled (epoch seconds; 0 when it is not)."""
        raw = await self._r.hget(self.keys.model_throttle, model)
        until = float(raw) if raw else 0.0
        return until if until > time.time() else 0.0
