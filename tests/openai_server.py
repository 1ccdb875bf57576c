"""A small OpenAI-compatible HTTP server on loopback, for the openai engine's tests.

It answers ``/v1/chat/completions`` and ``/v1/completions`` (plain and streamed) with a
deterministic reply, reports a prefix cache the way vLLM does
(``usage.prompt_tokens_details.cached_tokens``: the characters shared with the previous
request of the same conversation, over 4), records every request, and can be told to
answer 429 with ``Retry-After``, 500, garbage, 400 for a prompt too long (as llama.cpp
words it), or to drop connections.

Streamed chat answers look like real servers' (llama.cpp, vLLM): the first delta only
names the role (``content: null``), the last one carries the finish reason and a null
content, and usage comes in a final event with no choices (unless ``stream_usage`` is
off). Told to (``tool_calls``), it answers with tool calls instead of text, streamed as
OpenAI does: the first delta of each call has its index, id and name, later ones
fragments of the arguments' text (here interleaved between calls, which only the index
tells apart). ``refuse_tools`` answers 400 to any request with ``tools``, as a server
whose model has no tool support does, echoing the request's Authorization header.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Behaviour:
    mode: str = "ok"  # ok | throttle | error | garbage | drop | overflow
    retry_after: str = "2"
    requests: list[dict[str, Any]] = field(default_factory=list)
    authorization: list[str] = field(default_factory=list)
    traceparents: list[str] = field(default_factory=list)  # each request's, "" if none
    last_prompt: dict[str, str] = field(default_factory=dict)  # user -> last prompt text
    # Calls the next chat answers make: {"id", "name", "arguments" (the raw text)}.
    tool_calls: list[dict[str, str]] = field(default_factory=list)
    stream_usage: bool = True  # send usage in a stream's last event
    refuse_tools: bool = False  # 400 to requests with tools
    fragment: int = 4  # characters of arguments per streamed delta
    ignore_stream: bool = False  # answer a streamed request with one JSON answer


def _prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        return "".join(
            f"{m['role']}:{m.get('content') or ''}"
            + (json.dumps(m["tool_calls"]) if m.get("tool_calls") else "")
            + "\n"
            for m in body["messages"]
        )
    return str(body.get("prompt", ""))


def _call_deltas(calls: list[dict[str, str]], size: int) -> list[list[dict[str, Any]]]:
    """Streamed tool-call deltas: a head per call, then argument fragments round-robin."""
    heads = [
        {
            "index": i,
            "id": c["id"],
            "type": "function",
            "function": {"name": c["name"], "arguments": ""},
        }
        for i, c in enumerate(calls)
    ]
    out: list[list[dict[str, Any]]] = [[h] for h in heads]
    pieces = [
        [c["arguments"][k : k + size] for k in range(0, len(c["arguments"]), size)] for c in calls
    ]
    for step in range(max((len(p) for p in pieces), default=0)):
        for i, p in enumerate(pieces):
            if step < len(p):
                out.append([{"index": i, "function": {"arguments": p[step]}}])
    return out


def _handler(behaviour: Behaviour) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            behaviour.requests.append(body)
            behaviour.authorization.append(self.headers.get("Authorization", ""))
            behaviour.traceparents.append(self.headers.get("traceparent", ""))
            if behaviour.mode == "drop":
                self.close_connection = True
                self.connection.close()
                return
            if behaviour.mode == "throttle":
                self._send(429, b'{"error": "slow down"}', {"Retry-After": behaviour.retry_after})
                return
            if behaviour.mode == "error":
                self._send(500, b"internal error")
                return
            if behaviour.mode == "garbage":
                self._send(200, b"<html>not json</html>")
                return
            if behaviour.mode == "overflow":  # llama.cpp's answer to a prompt too long
                error = {
                    "error": {
                        "code": 400,
                        "message": "the request exceeds the available context size",
                        "type": "exceed_context_size_error",
                    }
                }
                self._send(400, json.dumps(error).encode(), {"Content-Type": "application/json"})
                return
            if behaviour.refuse_tools and body.get("tools"):
                refusal = (
                    "tools are not supported by this model "
                    f"(request authorized as {self.headers.get('Authorization', '')})"
                )
                error = {"error": {"code": 400, "message": refusal, "type": "invalid_request"}}
                self._send(400, json.dumps(error).encode(), {"Content-Type": "application/json"})
                return
            text = _prompt_text(body)
            user = str(body.get("user", "")) or "anon"
            previous = behaviour.last_prompt.get(user, "")
            shared = 0
            while shared < min(len(text), len(previous)) and text[shared] == previous[shared]:
                shared += 1
            behaviour.last_prompt[user] = text
            n = len(behaviour.requests)
            reply = f" reply {n}"
            usage = {
                "prompt_tokens": len(text) // 4,
                "completion_tokens": 3,
                "prompt_tokens_details": {"cached_tokens": shared // 4},
            }
            chat = self.path.endswith("/chat/completions")
            calls = list(behaviour.tool_calls) if chat else []
            behaviour.tool_calls = [] if chat else behaviour.tool_calls
            finish = "tool_calls" if calls else "stop"
            streamed = bool(body.get("stream")) and not behaviour.ignore_stream
            if streamed and chat:
                events: list[dict[str, Any]] = [
                    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]}
                ]
                if calls:
                    for deltas in _call_deltas(calls, behaviour.fragment):
                        events.append({"choices": [{"index": 0, "delta": {"tool_calls": deltas}}]})
                else:
                    for piece in (" reply", f" {n}"):
                        events.append({"choices": [{"index": 0, "delta": {"content": piece}}]})
                events.append(
                    {"choices": [{"index": 0, "delta": {"content": None}, "finish_reason": finish}]}
                )
                if behaviour.stream_usage:
                    events.append({"choices": [], "usage": usage})
                raw = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events)
                raw += b"data: [DONE]\n\n"
                self._send(200, raw, {"Content-Type": "text/event-stream"})
                return
            if streamed:
                events = []
                for piece in (" reply", f" {n}"):
                    choice = (
                        {"delta": {"content": piece}, "index": 0}
                        if chat
                        else {"text": piece, "index": 0}
                    )
                    events.append({"choices": [choice]})
                events.append(
                    {
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                **({"delta": {}} if chat else {"text": ""}),
                            }
                        ]
                    }
                )
                if behaviour.stream_usage:
                    events.append({"choices": [], "usage": usage})
                raw = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events)
                raw += b"data: [DONE]\n\n"
                self._send(200, raw, {"Content-Type": "text/event-stream"})
                return
            message: dict[str, Any] = {"role": "assistant", "content": None if calls else reply}
            if calls:
                message["tool_calls"] = [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"]},
                    }
                    for c in calls
                ]
            whole: dict[str, Any] = {"message": message} if chat else {"text": reply}
            answer = {"choices": [{**whole, "index": 0, "finish_reason": finish}], "usage": usage}
            self._send(200, json.dumps(answer).encode(), {"Content-Type": "application/json"})

    return Handler


@dataclass
class Server:
    url: str
    behaviour: Behaviour
    httpd: ThreadingHTTPServer

    def stop(self) -> None:
        self.behaviour.mode = "drop"  # connections kept alive by clients die with it
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def openai_server(port: int = 0) -> Iterator[Server]:
    """A running server on 127.0.0.1 (``port`` 0: a free one); its base URL ends in /v1."""
    behaviour = Behaviour()
    httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(behaviour))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    server = Server(f"http://127.0.0.1:{httpd.server_address[1]}/v1", behaviour, httpd)
    try:
        yield server
    finally:
        server.stop()
        thread.join(5)
