"""Agents the benchmarks run (files starting with "_" are not benchmarks)."""

from __future__ import annotations

from typing import Any

import agentos


class Noop(agentos.Agent):
    """Never idle: every loop iteration does nothing (measures the runtime's own cost)."""

    async def observe(self, ctx: agentos.Context) -> Any:
        return True


class Dormant(agentos.Agent):
    """Always idle: observe finds nothing (measures what an idle agent costs to hold)."""

    async def observe(self, ctx: agentos.Context) -> Any:
        return None
