"""A small OpenAI-compatible HTTP server on loopback, for the openai engine's tests.

It answers ``/v1/chat/completions`` and ``/v1/completions`` (plain and streamed) with a
deterministic reply, reports a prefix cache the way vLLM does
(``usage.prompt_tokens_details.cached_tokens``: the characters shared with the previous
request of the same conversation, over 4), records every request, and can be told to
answer 429 with ``Retry-After``, 500, garbage, or to drop connections.
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
    mode: str = "ok"  # ok | throttle | error | garbage | drop
    retry_after: str = "2"
    requests: list[dict[str, Any]] = field(default_factory=list)
    authorization: list[str] = field(default_factory=list)
    last_prompt: dict[str, str] = field(default_factory=dict)  # user -> last prompt text


def _prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        return "".join(f"{m['role']}:{m['content']}\n" for m in body["messages"])
    return str(body.get("prompt", ""))


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
            if body.get("stream"):
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
                events.append({"choices": [], "usage": usage})
                raw = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events)
                raw += b"data: [DONE]\n\n"
                self._send(200, raw, {"Content-Type": "text/event-stream"})
                return
            choice: dict[str, Any] = (
                {"message": {"role": "assistant", "content": reply}} if chat else {"text": reply}
            )
            answer = {"choices": [{**choice, "index": 0, "finish_reason": "stop"}], "usage": usage}
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
