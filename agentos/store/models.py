"""Declared models: their stored resources and the provider throttle every daemon honours.

A provider's rate limit (429 / 503 with ``Retry-After``) is one limit for every agent
that uses the model, on every daemon: the daemon that is told first records until when,
and the others read it before their next call to that model. The Model resources
themselves are applied with the rest of the desired state (:mod:`~agentos.store.specs`)
and read back here.
"""

from __future__ import annotations

import json
import time
from typing import Any

from agentos.store.conn import Conn
from agentos.store.errors import translate
from agentos.store.records import _s

__all__ = ["Models"]


class Models:
    """Model resources and throttles (``store.models``; ``read`` was ``Store.models``)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._r = conn.r
        self.keys = conn.keys
        self._throttle_script = conn.scripts.model_throttle

    @translate
    async def read(self) -> dict[str, dict[str, Any]]:
        """Every stored Model resource by name."""
        raw = await self._r.hgetall(self.keys.models)
        out = {}
        for n, v in raw.items():
            body = json.loads(v)
            body.pop("_hash", None)
            out[_s(n)] = body
        return out

    @translate
    async def throttle(self, model: str, until: float) -> None:
        """Record that ``model`` is throttled until ``until`` (epoch s; never shortened)."""
        await self._throttle_script(keys=[self.keys.model_throttle], args=[model, repr(until)])

    @translate
    async def throttled_until(self, model: str) -> float:
        """Until when ``model`` is throttled (epoch seconds; 0 when it is not)."""
        raw = await self._r.hget(self.keys.model_throttle, model)
        until = float(raw) if raw else 0.0
        return until if until > time.time() else 0.0
