"""The openai engine against a REAL llama.cpp server (xllamacpp), through a recording proxy.

What a user of an OpenAI-compatible server sees: the request carries the conversation
as separate messages with ``system`` as ``system``, and a streamed call (``chat`` and
``stream``) is metered exactly as the server's own ``/metrics`` counts it
(``prompt_tokens_total`` counts the prompt tokens it processed, the ones reused from the
slot's cache are in ``prompt_tokens_cached_total``, ``tokens_predicted_total`` the
generated ones), with no ``None`` in the text.

The Gemma 3 270M base model gets llama.cpp's ChatML-style fallback template on
``/v1/chat/completions`` and does not stop on its own: the calls pass the template's
end marker as a stop string and a small ``max_tokens``. One slot, one thread, a small
context keep it fast on a shared machine.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("xllamacpp")

from agentos.engine.gguf import default_model_path
from agentos.engine.llamaserver_child import EmbeddedServer
from agentos.engine.openai import OpenAIEngine
from tests.helpers import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

STOP = ["<|im_end|>", "<|im_start|>"]
SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in a few words."}


class RecordingProxy:
    """An HTTP proxy on loopback that records every request body and passes the answer
    through as it arrives (a streamed answer stays streamed, so TTFT stays real)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.bodies.append(json.loads(raw or b"{}"))
                proxy.paths.append(self.path)
                headers = {"Content-Type": self.headers.get("Content-Type", "application/json")}
                with (
                    httpx.Client(timeout=60) as http,
                    http.stream(
                        "POST", proxy.upstream + self.path, content=raw, headers=headers
                    ) as answer,
                ):
                    self.send_response(answer.status_code)
                    kind = answer.headers.get("content-type", "application/json")
                    self.send_header("Content-Type", kind)
                    self.send_header("Connection", "close")  # the body ends when we close
                    self.end_headers()
                    for chunk in answer.iter_raw():
                        self.wfile.write(chunk)
                        self.wfile.flush()
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def server(llama_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    folder = tmp_path_factory.mktemp("openai-llamacpp")
    s = EmbeddedServer(
        model_path=default_model_path(llama_home),
        slot_dir=folder / "slots",
        n_ctx=1024,
        n_parallel=1,
        n_threads=1,
    )
    yield s
    s.stop()


@pytest.fixture
def proxy(server: EmbeddedServer) -> Iterator[RecordingProxy]:
    p = RecordingProxy(server.url)
    yield p
    p.close()


async def _metrics(server: EmbeddedServer) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(server.url + "/metrics")).text
    out = {}
    for line in text.splitlines():
        if line.startswith("llamacpp:"):
            name, _, value = line.partition(" ")
            out[name.removeprefix("llamacpp:")] = float(value)
    return out


async def _counted(server: EmbeddedServer, before: dict[str, float]) -> dict[str, float]:
    """The server's counters' growth since ``before``, once it has counted a call."""

    async def grown() -> dict[str, float] | None:
        now = await _metrics(server)
        delta = {k: now.get(k, 0.0) - before.get(k, 0.0) for k in now}
        return delta if delta.get("tokens_predicted_total", 0.0) > 0 else None

    result: dict[str, float] = await wait_until(grown, within=10, what="the call in /metrics")
    return result


def _engine(proxy: RecordingProxy) -> OpenAIEngine:
    return OpenAIEngine(model="gemma", endpoints=[proxy.url + "/v1"], attempts=1)


async def test_chat_sends_separate_messages_and_is_metered_as_the_server_counts(
    server: EmbeddedServer, proxy: RecordingProxy
) -> None:
    engine = _engine(proxy)
    engine.open_session("a")
    try:
        first_turn = [SYSTEM, {"role": "user", "content": "My name is Zed. Say hello."}]
        before = await _metrics(server)
        first = await engine.chat("a", first_turn, max_tokens=12, stop=STOP)
        counted = await _counted(server, before)
        assert first.usage.input_tokens == counted["prompt_tokens_total"]
        assert first.usage.cached_tokens == counted.get("prompt_tokens_cached_total", 0.0)
        assert first.usage.output_tokens == counted["tokens_predicted_total"]
        assert first.usage.input_tokens + first.usage.cached_tokens > 20  # tokens, not chars

        second_turn = [{"role": "user", "content": "What is my name?"}]
        before = await _metrics(server)
        second = await engine.chat("a", second_turn, max_tokens=12, stop=STOP)
        counted = await _counted(server, before)
        assert second.usage.input_tokens == counted["prompt_tokens_total"]
        assert second.usage.cached_tokens == counted.get("prompt_tokens_cached_total", 0.0)
        assert second.usage.output_tokens == counted["tokens_predicted_total"]
        assert second.usage.cached_tokens > 0  # the slot kept the first request's prompt
        assert engine.session_info("a").n_tokens == second.usage.total_tokens
    finally:
        await engine.aclose()
    one, two = proxy.bodies
    assert proxy.paths == ["/v1/chat/completions"] * 2
    assert one["messages"] == first_turn  # system as system, the user turn on its own
    assert one["stream"] is True
    assert one["stream_options"] == {"include_usage": True}
    assert two["messages"] == [*first_turn, first.message(), *second_turn]
    for reply in (first, second):
        assert isinstance(reply.content, str)
        assert "None" not in reply.content
        assert reply.finish_reason in ("stop", "length")
        assert 0 < reply.time_to_first_token_s <= reply.duration_s
    assert "None" not in json.dumps(engine.conversation("a"))


async def test_a_streamed_text_call_is_metered_as_the_server_counts(
    server: EmbeddedServer, proxy: RecordingProxy
) -> None:
    engine = _engine(proxy)
    engine.open_session("b")
    try:
        before = await _metrics(server)
        chunks = [
            c async for c in engine.stream("b", "Write a short greeting.", max_tokens=10, stop=STOP)
        ]
        counted = await _counted(server, before)
        before = await _metrics(server)
        again = await engine.generate("b", "And back down.", max_tokens=6, stop=STOP)
        counted_again = await _counted(server, before)
    finally:
        await engine.aclose()
    last = chunks[-1]
    assert last.usage is not None
    assert last.finished
    assert last.usage.input_tokens == counted["prompt_tokens_total"]
    assert last.usage.cached_tokens == counted.get("prompt_tokens_cached_total", 0.0)
    assert last.usage.output_tokens == counted["tokens_predicted_total"]
    assert last.usage.output_tokens > 0
    text = "".join(c.text for c in chunks)
    assert text
    assert "None" not in text
    assert again.input_tokens == counted_again["prompt_tokens_total"]
    assert again.cached_tokens == counted_again.get("prompt_tokens_cached_total", 0.0)
    assert again.output_tokens == counted_again["tokens_predicted_total"]
    streamed, plain = proxy.bodies
    assert streamed["messages"] == [{"role": "user", "content": "Write a short greeting."}]
    assert streamed["stream_options"] == {"include_usage": True}
    assert plain["messages"][:2] == [
        {"role": "user", "content": "Write a short greeting."},
        {"role": "assistant", "content": text},
    ]
