"""An idle Model's embedded llama.cpp server stops after ``idleStop`` and starts on demand.

On a real server (xllamacpp, the Gemma model) built from a Model resource, one thread
(FACTS: a second spin-waiting thread collapses on a loaded 2-core box) and a 1 s
``idleStop``: the server's process is gone after a second without calls, the next call
starts it again and is answered, and a call in flight keeps it up however long it takes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("xllamacpp")

from agentos.core.modelspec import ModelResource
from agentos.core.spec import parse_resource
from agentos.engine.llamaserver import LlamaServerEngine
from agentos.engine.models import build_engine
from tests.helpers import steady, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

PROMPT = "Q: What is the capital of France?\nA:"


def _engine(home: Path, **spec: Any) -> LlamaServerEngine:
    resource = parse_resource(
        {
            "apiVersion": "agentos/v1",
            "kind": "Model",
            "metadata": {"name": "idle"},
            "spec": {"engine": "llamaserver", "slots": 1, "contextLength": 512, **spec},
        }
    )
    assert isinstance(resource, ModelResource)
    engine = build_engine(resource, home=home)
    assert isinstance(engine, LlamaServerEngine)
    return engine


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_idle_server_stops_and_the_next_call_starts_it(llama_home: Path) -> None:
    engine = _engine(llama_home, threads=1, idleStop="1s")
    server = engine.server
    assert server is not None
    assert server.config["n_threads"] == 1
    try:
        engine.open_session("a")
        first = await engine.generate("a", PROMPT, max_tokens=4)
        assert first.input_tokens > 0
        process = server.process
        assert process is not None

        async def stopped() -> bool:
            return process.poll() is not None and engine.stats.idle_stops == 1

        await wait_until(stopped, within=30, what="the idle server to stop")
        assert _gone(process.pid)
        assert not engine.server_running
        assert engine.describe()["serverRunning"] is False
        # Hibernating now keeps the history without waking the server for an empty slot.
        cold = await engine.export_kv("a")
        assert cold.data is None
        assert len(cold.tokens) >= first.input_tokens
        assert not engine.server_running

        # The session kept its history: the next call starts the server, waits for it
        # and re-prefills the slot the restart emptied.
        again = await engine.generate("a", " Paris.\nQ: And of Italy?\nA:", max_tokens=4)
        assert engine.stats.restarts == 1
        assert engine.server_running
        assert server.process is not process
        assert engine.stats.last_cache_n == 0
        assert again.input_tokens > first.input_tokens
        snapshot = await engine.export_kv("a")
        assert snapshot.data is not None  # used since the restart: the slot is warm again
    finally:
        await engine.aclose()
    assert not server.alive


async def test_a_call_in_flight_keeps_the_server_up(llama_home: Path) -> None:
    engine = _engine(llama_home, threads=1, idleStop="1s")
    server = engine.server
    assert server is not None
    try:
        engine.open_session("a")
        chunks = engine.stream("a", PROMPT, max_tokens=24)
        async for chunk in chunks:
            if chunk.text:
                break
        # Twice idleStop, while the stream is open.
        await steady(
            lambda: engine.stats.idle_stops == 0 and server.alive, for_s=2.0, what="the server up"
        )
        assert engine.stats.idle_stops == 0
        assert server.alive
        async for chunk in chunks:
            if chunk.finished:
                break
        await chunks.aclose()  # type: ignore[attr-defined]

        async def stopped() -> bool:
            return engine.stats.idle_stops == 1

        await wait_until(stopped, within=30, what="the idle server to stop after the stream")
    finally:
        await engine.aclose()


async def test_a_closed_engine_stops_its_watcher_and_server(llama_home: Path) -> None:
    engine = _engine(llama_home, threads=1)
    server = engine.server
    assert server is not None
    assert engine.describe()["idleStop"] == 600.0
    watcher = engine._watcher
    assert watcher is not None
    assert watcher.is_alive()
    await engine.aclose()
    assert not watcher.is_alive()
    assert not server.alive
