"""Agents for the OpenTelemetry tests: code that uses instrumented libraries in ``act``."""

from __future__ import annotations

from typing import Any

import httpx

import agentos


class Fetcher(agentos.Agent):
    """GETs the URL its message names, with httpx, inside ``act`` (a library call the user's
    own instrumentation traces)."""

    async def plan(self, ctx: agentos.Context, observation: Any) -> Any:
        return observation.body

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        async with httpx.AsyncClient() as client:
            response = await client.get(str(plan))
        return response.text
