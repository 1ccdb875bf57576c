"""HTTP ingress: webhooks and health checks served by the daemon (``--http HOST:PORT``).

Outside systems (CI, ticketing, chat ops) wake agents by POSTing a message, answer
waiting tasks (``GET /v1/pending``, ``POST /v1/agents/{name}/tasks/{task}/answer``),
drop a poison message (``POST /v1/agents/{name}/tasks/{task}/drop``) and send them
events (``POST /v1/agents/{name}/events/{event}``); load
balancers and orchestrators ask ``/healthz`` and ``/readyz``. The app is Starlette on
uvicorn, and every request goes through :class:`agentos.client.Client` and its store, so
a webhook is `agentos send`: same validation, same size and depth limits (a full inbox
answers 429 with ``Retry-After``), same idempotency keys (a key reused with another
body answers 409 with the first task's id).

It runs on the daemon's event loop, next to lease renewal, and it is reachable by more
than its operator, so it refuses what it cannot trust before doing any work:

- Bearer-token auth is required unless the server is bound to loopback; the token is
  compared in constant time and never logged. Without a token, a loopback port is
  still reachable from any web page the operator's browser shows (cross-site posts)
  and, through DNS rebinding, readable by one: so only ``Host`` values naming the
  bound address or localhost are served, and a request whose ``Origin`` is another
  site, or whose ``Sec-Fetch-Site`` says cross-site or same-site, is refused (403).
- The answer and event endpoints take ``application/json`` only (a browser cannot send
  that cross-site without a preflight); messages take any text, as ``curl -d`` sends.
- Every body is capped before it is read (``Content-Length``, then a streamed count),
  a message at its agent's own inbox limit; a body that stalls times out (408); JSON
  nesting is bounded; text that reaches events and terminals (``by``, event names)
  may hold no control characters.
- List endpoints are paginated and read one page of the fleet per request.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from agentos.client import (
    DEFAULT_MAX_MESSAGE_BYTES,
    AnswerRejected,
    Client,
    ClientError,
    EventsFull,
    InboxFull,
    MessageTooLarge,
    NotFound,
    SendConflict,
)
from agentos.client_waits import MAX_REASON_CHARS
from agentos.core.durations import parse_duration
from agentos.core.spec import AgentResource, SpecError, inbox_limit, parse_resource
from agentos.store import StoreError

__all__ = [
    "CONTROL_CHARS",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "build_app",
    "has_control",
    "is_loopback",
    "parse_json",
    "refusal",
]

log = logging.getLogger(__name__)

Ready = Callable[[], bool]

MAX_JSON_BYTES = 256 * 1024
"""The largest answer or event body: a question's answer or an event's data, not a file."""

MAX_JSON_DEPTH = 32
"""How deeply an answer or event body may nest; deeper ones are refused (400), so no
parser, encoder or agent recurses on a caller's say-so."""

READ_IDLE_S = 10.0  # a body that sends nothing for this long is abandoned (408)
READ_TOTAL_S = 120.0  # and one that trickles (a byte every few seconds) after this long

PAGE_DEFAULT = 100
PAGE_MAX = 1000
PENDING_SCAN = 5000  # agents one /v1/pending page looks at, however few of them wait

MAX_BY_CHARS = 200

CONTROL_CHARS = re.compile(
    r"[\x00-\x1f\x7f-\x9f"  # C0, DEL, C1
    r"\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"  # bidi marks and overrides
    r"\u2028\u2029]"  # line and paragraph separators
)
"""Characters that move a terminal's cursor, colour or clear it (C0, DEL, C1), end a
line (line and paragraph separators too) or reorder what follows (bidi overrides): text
holding them can forge lines in a log or an event listing."""

_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def has_control(text: str) -> bool:
    """Whether ``text`` holds a character of :data:`CONTROL_CHARS`."""
    return CONTROL_CHARS.search(text) is not None


def _host_port(value: str, default_port: int | None) -> tuple[str, int | None] | None:
    """``host[:port]`` (``[v6]:port`` too) as (lower-case host, port); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        host, sep, rest = value.partition("]")
        host, port = host + "]", rest[1:] if rest.startswith(":") else None
        if not sep or (rest and not rest.startswith(":")):
            return None
    else:
        host, sep, port = value.partition(":")
        port = port if sep else None
    if not host:
        return None
    if port is None or port == "":
        return host, default_port
    return (host, int(port)) if port.isascii() and port.isdigit() else None


def _bracketed(host: str) -> str:
    host = host.lower()
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def refusal(headers: Mapping[str, str], *, bind: tuple[str, int] | None, token: bool) -> str | None:
    """Why a request with these (lower-case named) ``headers`` must be refused, or None.

    Without a ``token`` (loopback) the ``Host`` must name the bound address or localhost
    (with ``bind``'s port; any port when ``bind`` is None); with one, any ``Host`` is
    served. Either way an ``Origin`` must be such a host (with a token: the ``Host``
    itself), and ``Sec-Fetch-Site`` must not be ``cross-site`` or ``same-site``.
    """
    names = {*_LOOPBACK_NAMES, *([_bracketed(bind[0])] if bind else [])}
    port = bind[1] if bind else None

    def local(value: str, default_port: int | None) -> bool:
        parsed = _host_port(value, default_port)
        if parsed is None or parsed[0] not in names:
            return False
        return port is None or parsed[1] == port

    host = headers.get("host", "")
    if not token and not local(host, 80):
        return f"Host {host!r} is not this server's address; use http://127.0.0.1:PORT"
    site = headers.get("sec-fetch-site", "").lower()
    if site in ("cross-site", "same-site"):
        return f"a {site} request from a web page is not accepted"
    origin = headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin) if origin != "null" else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            return f"Origin {origin!r} is not accepted"
        default = 443 if parts.scheme == "https" else 80
        same = _host_port(parts.netloc, default) == _host_port(host, default)
        if not (local(parts.netloc, default) if not token else same):
            return f"Origin {origin!r} is not this server"
    return None


def _depth(value: Any) -> int:
    """How deeply ``value`` nests lists and objects (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level + 1)
            stack.extend((child, level + 1) for child in item)
    return deepest


def parse_json(raw: bytes | str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``raw`` as JSON (empty: None). Raises ValueError, saying why, for anything else:
    not UTF-8, not JSON, or nested deeper than ``max_depth`` levels."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except UnicodeDecodeError:
        raise ValueError("the body must be UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise ValueError(str(e)) from None
    except RecursionError:  # deeper than the parser goes: deeper than we take anyway
        value = None
        deepest = max_depth + 1
    else:
        deepest = _depth(value)
    if deepest > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    return value


class _Rejected(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code = status, code
        super().__init__(message)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def _read_body(request: Request, limit: int, *, idle_s: float, total_s: float) -> bytes:
    """The body, read only while it stays within ``limit`` bytes and keeps coming.

    Raises :class:`_Rejected`: 413 for a declared or streamed size over the limit
    (before reading, or as soon as the count passes it: chunked bodies too), 408 for a
    body that stalls ``idle_s`` or is not complete after ``total_s``.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _Rejected(413, "too_large", f"body is larger than {limit} bytes")
    body = bytearray()
    chunks = request.stream()
    with anyio.move_on_after(total_s) as whole:
        while True:
            with anyio.move_on_after(idle_s) as idle:
                chunk = await anext(chunks, None)
            if idle.cancelled_caught:
                raise _Rejected(408, "timeout", f"the body stalled for {idle_s:g}s")
            if chunk is None:
                return bytes(body)
            body += chunk
            if len(body) > limit:
                raise _Rejected(413, "too_large", f"body is larger than {limit} bytes")
    assert whole.cancelled_caught
    raise _Rejected(408, "timeout", f"the body was not complete after {total_s:g}s")


def _require_json(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise _Rejected(
            415, "unsupported_media_type", "send the body as Content-Type: application/json"
        )


def _plain(what: str, text: str) -> None:
    if has_control(text):
        raise _Rejected(400, "bad_text", f"{what} must not hold control characters")


def _send_id(key: str | None) -> str | None:
    """The store's at-most-once id for a send: one per ``Idempotency-Key`` (so a replay
    gets the first message's id back, and the key with another body is a conflict);
    None (a fresh one) for a send without a key."""
    if key is None:
        return None
    return "k" + hashlib.sha256(key.encode()).hexdigest()[:32]


MAX_TASK_WAIT_S = 60.0
TASK_POLL_S = 0.1


def _wait_of(request: Request) -> float:
    """``?wait=`` as seconds (a duration such as ``30s``; 0 when absent)."""
    raw = request.query_params.get("wait")
    if raw is None:
        return 0.0
    try:
        seconds = parse_duration(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_TASK_WAIT_S:
        raise _Rejected(
            400, "bad_query", f"wait must be a duration from 0s to {MAX_TASK_WAIT_S:g}s"
        )
    return seconds


def _page(request: Request) -> tuple[int, str]:
    raw = request.query_params.get("limit", str(PAGE_DEFAULT))
    if not raw.isdigit() or not 1 <= int(raw) <= PAGE_MAX:
        raise _Rejected(400, "bad_query", f"limit must be a whole number from 1 to {PAGE_MAX}")
    return int(raw), request.query_params.get("cursor", "")


def _paged(request: Request, items: list[Any], after: str | None, limit: int) -> JSONResponse:
    """A page as a JSON list; a ``Link: <...>; rel="next"`` header (RFC 8288, as GitHub
    pages) names the next one when there is more."""
    headers = {}
    if after is not None:
        nxt = f"{request.url.path}?limit={limit}&cursor={quote(after, safe='')}"
        headers["link"] = f'<{nxt}>; rel="next"'
    return JSONResponse(items, headers=headers)


class _Names:
    """The applied agents' names, sorted, read again only when the fleet generation
    moves (every apply and delete moves it): a list page costs one GET, not a read of
    the fleet's index."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._generation = -1
        self._names: list[str] = []
        self._lock = anyio.Lock()

    async def after(self, cursor: str) -> list[str]:
        async with self._lock:
            generation = await self._client.store.generation()
            if generation != self._generation:
                self._names = sorted(await self._client.store.desired_index())
                self._generation = generation
            names = self._names
        return names[bisect.bisect_right(names, cursor) :] if cursor else names


class _Trust:
    """ASGI middleware: every request (unknown routes too) passes :func:`refusal` first."""

    def __init__(self, app: ASGIApp, *, bind: tuple[str, int] | None, token: bool) -> None:
        self.app, self.bind, self.token = app, bind, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            why = refusal(Headers(scope=scope), bind=self.bind, token=self.token)
            if why is not None:
                await _error(403, "forbidden", why)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(
    client: Client,
    *,
    token: str | None,
    ready: Ready,
    stopping: Ready = lambda: False,
    bind: tuple[str, int] | None = None,
    max_json_bytes: int = MAX_JSON_BYTES,
    read_idle_s: float = READ_IDLE_S,
    read_total_s: float = READ_TOTAL_S,
) -> Starlette:
    """The ASGI app. ``token`` None means no auth (the caller checks it is loopback-only);
    ``bind`` is the address served, for the ``Host`` check (None: localhost names on any
    port)."""
    names = _Names(client)

    def guarded(
        handler: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if token is not None:
                given = request.headers.get("authorization", "")
                expected = f"Bearer {token}"
                if not hmac.compare_digest(given.encode(), expected.encode()):
                    return _error(401, "unauthorized", "missing or wrong bearer token")
            try:
                return await handler(request)
            except _Rejected as e:
                return _error(e.status, e.code, str(e))
            except ClientDisconnect:
                # Nobody is left to answer; one line, no traceback, and nothing was done.
                log.info("%s %s: the client hung up mid-body", request.method, request.url.path)
                return Response(status_code=400)
            except NotFound as e:
                return _error(404, "not_found", str(e))
            except AnswerRejected as e:
                return _error(422 if e.code == "invalid" else 409, e.code, str(e))
            except MessageTooLarge as e:
                return _error(413, "too_large", f"body is larger than {e.limit} bytes")
            except InboxFull as e:
                # Retry-After in whole seconds (RFC 9110), never 0: a client must wait.
                response = _error(429, "inbox_full", str(e))
                response.headers["retry-after"] = str(max(1, math.ceil(e.retry_after_s)))
                return response
            except EventsFull as e:
                return _error(429, "events_full", str(e))
            except ClientError as e:
                return _error(422, "rejected", str(e))
            except StoreError as e:
                return _error(503, "unavailable", str(e))

        return endpoint

    async def send(request: Request) -> Response:
        name = request.path_params["name"]
        spec = await client.store.agent_spec(name)
        if spec is None:
            raise NotFound(f'agent "{name}" not found')
        limit = _inbox_limit(spec)
        body = await _read_body(request, limit, idle_s=read_idle_s, total_s=read_total_s)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return _error(400, "bad_encoding", "the body must be UTF-8 text")
        key = request.headers.get("idempotency-key") or None
        traceparent = request.headers.get("traceparent") or None
        try:
            # The key's send id makes a replay answer its first task, and the same key
            # with another body a conflict rather than a message silently dropped.
            msg_id = await client.send(
                name, text, key=key, traceparent=traceparent, send_id=_send_id(key)
            )
        except SendConflict as e:
            return JSONResponse(
                {
                    "error": {
                        "code": "conflict",
                        "message": "this Idempotency-Key was already used for a different "
                        "message; use a new key for a new message",
                    },
                    "agent": name,
                    "messageId": e.message_id,
                    "taskId": f"m-{e.message_id}",
                },
                409,
            )
        return JSONResponse(
            {"agent": name, "messageId": msg_id, "taskId": f"m-{msg_id}"},
            202,
            headers={"location": f"/v1/agents/{quote(name)}/tasks/m-{quote(msg_id)}"},
        )

    # Who answered, for the audit trail: the credential that let the request in, and
    # the name the caller gives (``"by"``), which only the credential vouches for.
    principal = "http:token" if token is not None else "http:loopback"

    async def json_body(request: Request) -> Any:
        _require_json(request)
        raw = await _read_body(request, max_json_bytes, idle_s=read_idle_s, total_s=read_total_s)
        try:
            return parse_json(raw)
        except ValueError as e:
            raise _Rejected(400, "bad_json", f"the body must be JSON: {e}") from None

    async def pending(request: Request) -> Response:
        limit, cursor = _page(request)
        after = await names.after(cursor)
        scanned = after[:PENDING_SCAN]
        found: list[Any] = []
        last = None  # the last agent this page covers
        for i in range(0, len(scanned), 500):
            batch = scanned[i : i + 500]
            waits = sorted(await client.store.pending_waits(batch), key=lambda w: w.agent)
            found += waits[: limit - len(found)]
            last = found[-1].agent if len(found) == limit else batch[-1]
            if len(found) == limit:
                break
        more = last is not None and last != after[-1]
        return _paged(request, [w.to_dict() for w in found], last if more else None, limit)

    async def answer(request: Request) -> Response:
        name, task = request.path_params["name"], request.path_params["task"]
        body = await json_body(request)
        allowed = {"yes", "no", "choice", "text", "by", "reason"}
        if not isinstance(body, dict) or not set(body) <= allowed:
            return _error(
                400, "bad_answer", 'send {"yes": true} | {"no": true} | {"choice": X} | {"text": T}'
            )
        choice, text, who = body.get("choice"), body.get("text"), body.get("by")
        reason = body.get("reason")
        if any(v is not None and not isinstance(v, str) for v in (choice, text, who, reason)):
            return _error(400, "bad_answer", "choice, text, by and reason must be strings")
        if reason is not None:
            _plain('"reason"', reason)
            if len(reason) > MAX_REASON_CHARS:
                return _error(
                    400, "bad_answer", f'"reason" has at most {MAX_REASON_CHARS} characters'
                )
        if who is not None:
            _plain('"by"', who)
            if len(who) > MAX_BY_CHARS:
                return _error(400, "bad_answer", f'"by" has at most {MAX_BY_CHARS} characters')
        by = f"{who} ({principal})" if who else principal
        r = await client.answer(
            name,
            task,
            yes=body.get("yes") is True,
            no=body.get("no") is True,
            choice=choice,
            text=text,
            by=by,
            reason=reason or "",
        )
        return JSONResponse(
            {"agent": name, "task": task, "answer": r.value, "by": r.by, "at": r.at}
            | ({"reason": r.reason} if r.reason else {})
        )

    async def event(request: Request) -> Response:
        name, event_name = request.path_params["name"], request.path_params["event"]
        _plain("the event name", event_name)
        data = await json_body(request)
        ended = await client.send_event(name, event_name, data, by=principal)
        return JSONResponse({"agent": name, "event": event_name, "endedWait": ended}, 202)

    async def drop(request: Request) -> Response:
        name, task = request.path_params["name"], request.path_params["task"]
        body = await json_body(request)
        if body is None:
            body = {}
        if not isinstance(body, dict) or not set(body) <= {"by"}:
            return _error(400, "bad_drop", 'send {} or {"by": NAME}')
        who = body.get("by")
        if who is not None and not isinstance(who, str):
            return _error(400, "bad_drop", "by must be a string")
        if who is not None:
            _plain('"by"', who)
            if len(who) > MAX_BY_CHARS:
                return _error(400, "bad_drop", f'"by" has at most {MAX_BY_CHARS} characters')
        where = await client.drop(name, task, by=f"{who} ({principal})" if who else principal)
        return JSONResponse({"agent": name, "task": task, "droppedFrom": where})

    async def agents(request: Request) -> Response:
        limit, cursor = _page(request)
        after = await names.after(cursor)
        page = after[:limit]
        rows = await client.agents(page)
        more = page[-1] if len(after) > limit else None
        return _paged(request, [a.to_dict() for a in rows], more, limit)

    async def task(request: Request) -> Response:
        """One task for its sender; ``?wait=30s`` holds the request until the task is
        done or its status changes (at most 60 s)."""
        name, task_id = request.path_params["name"], request.path_params["task"]
        wait_s = _wait_of(request)
        view = await client.task_view(name, task_id)
        if wait_s > 0 and not view["done"]:
            first = view["status"]
            with anyio.move_on_after(wait_s):
                while view["status"] == first and not view["done"]:
                    await anyio.sleep(TASK_POLL_S)
                    view = await client.task_view(name, task_id)
        return JSONResponse(view)

    async def agent(request: Request) -> Response:
        detail = await client.describe(request.path_params["name"])
        return Response(json.dumps(detail.to_dict(), default=str), media_type="application/json")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        try:
            await client.store.ping()
        except StoreError as e:
            return _error(503, "redis_unavailable", str(e))
        if stopping():  # draining: a load balancer stops sending before the pod exits
            return _error(503, "stopping", "the daemon is shutting down")
        if not ready():
            return _error(503, "starting", "the daemon has not finished its first reconcile")
        return JSONResponse({"status": "ready"})

    async def not_found(request: Request, exc: Any) -> Response:
        return _error(404, "not_found", f"no route for {request.method} {request.url.path}")

    async def bad_method(request: Request, exc: Any) -> Response:
        return _error(405, "method_not_allowed", f"{request.method} is not allowed here")

    app = Starlette(
        routes=[
            Route("/v1/agents/{name}/messages", guarded(send), methods=["POST"]),
            Route("/v1/agents", guarded(agents), methods=["GET"]),
            Route("/v1/pending", guarded(pending), methods=["GET"]),
            Route("/v1/agents/{name}/tasks/{task}", guarded(task), methods=["GET"]),
            Route("/v1/agents/{name}/tasks/{task}/answer", guarded(answer), methods=["POST"]),
            Route("/v1/agents/{name}/tasks/{task}/drop", guarded(drop), methods=["POST"]),
            Route("/v1/agents/{name}/events/{event}", guarded(event), methods=["POST"]),
            Route("/v1/agents/{name}", guarded(agent), methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: bad_method},
    )
    app.add_middleware(_Trust, bind=bind, token=token is not None)
    return app


def _inbox_limit(spec: Mapping[str, Any]) -> int:
    """The agent's own message size limit, from its stored spec."""
    try:
        resource = parse_resource(spec)
    except SpecError:  # written by another agentos version: the store still checks
        return DEFAULT_MAX_MESSAGE_BYTES
    if not isinstance(resource, AgentResource):
        return DEFAULT_MAX_MESSAGE_BYTES
    return inbox_limit(resource)
