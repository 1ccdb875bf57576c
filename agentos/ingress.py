"""HTTP ingress: webhooks and health checks served by the daemon (``--http HOST:PORT``).

Outside systems (CI, ticketing, chat ops) wake agents by POSTing a message, answer
waiting tasks (``GET /v1/pending``, ``POST /v1/agents/{name}/tasks/{task}/answer``)
and send them events (``POST /v1/agents/{name}/events/{event}``); load
balancers and orchestrators ask ``/healthz`` and ``/readyz``. The app is Starlette on
uvicorn, and every request goes through :class:`agentos.client.Client`, so a webhook
is exactly `agentos send`: same validation, same size limit, same idempotency keys.
Bearer-token auth is required unless the server is bound to loopback; the token is
compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agentos.client import DEFAULT_MAX_MESSAGE_BYTES, AnswerRejected, Client, ClientError, NotFound
from agentos.store import StoreError

__all__ = ["build_app", "is_loopback"]

Ready = Callable[[], bool]


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Rejected(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code = status, code
        super().__init__(message)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def build_app(
    client: Client,
    *,
    token: str | None,
    ready: Ready,
    stopping: Ready = lambda: False,
    max_body_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Starlette:
    """The ASGI app. ``token`` None means no auth (the caller checks it is loopback-only)."""

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
            except NotFound as e:
                return _error(404, "not_found", str(e))
            except AnswerRejected as e:
                return _error(422 if e.code == "invalid" else 409, e.code, str(e))
            except ClientError as e:
                return _error(422, "rejected", str(e))
            except StoreError as e:
                return _error(503, "unavailable", str(e))

        return endpoint

    async def send(request: Request) -> Response:
        name = request.path_params["name"]
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            return _error(413, "too_large", f"body is larger than {max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                return _error(413, "too_large", f"body is larger than {max_body_bytes} bytes")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return _error(400, "bad_encoding", "the body must be UTF-8 text")
        key = request.headers.get("idempotency-key") or None
        traceparent = request.headers.get("traceparent") or None
        msg_id = await client.send(name, text, key=key, traceparent=traceparent)
        return JSONResponse({"agent": name, "messageId": msg_id, "taskId": f"m-{msg_id}"}, 202)

    # Who answered, for the audit trail: the credential that let the request in, and
    # the name the caller gives (``"by"``), which only the credential vouches for.
    principal = "http:token" if token is not None else "http:loopback"

    async def json_body(request: Request) -> Any:
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise _Rejected(413, "too_large", f"body is larger than {max_body_bytes} bytes")
        try:
            return json.loads(raw or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Rejected(400, "bad_json", f"the body must be JSON: {e}") from None

    async def pending(request: Request) -> Response:
        return JSONResponse([w.to_dict() for w in await client.pending()])

    async def answer(request: Request) -> Response:
        name, task = request.path_params["name"], request.path_params["task"]
        try:
            body = await json_body(request)
        except _Rejected as e:
            return _error(e.status, e.code, str(e))
        allowed = {"yes", "no", "choice", "text", "by"}
        if not isinstance(body, dict) or not set(body) <= allowed:
            return _error(
                400, "bad_answer", 'send {"yes": true} | {"no": true} | {"choice": X} | {"text": T}'
            )
        choice, text, who = body.get("choice"), body.get("text"), body.get("by")
        if any(v is not None and not isinstance(v, str) for v in (choice, text, who)):
            return _error(400, "bad_answer", "choice, text and by must be strings")
        by = f"{who} ({principal})" if who else principal
        r = await client.answer(
            name,
            task,
            yes=body.get("yes") is True,
            no=body.get("no") is True,
            choice=choice,
            text=text,
            by=by,
        )
        return JSONResponse(
            {"agent": name, "task": task, "answer": r.value, "by": r.by, "at": r.at}
        )

    async def event(request: Request) -> Response:
        name, event_name = request.path_params["name"], request.path_params["event"]
        try:
            data = await json_body(request)
        except _Rejected as e:
            return _error(e.status, e.code, str(e))
        ended = await client.send_event(name, event_name, data, by=principal)
        return JSONResponse({"agent": name, "event": event_name, "endedWait": ended}, 202)

    async def agents(request: Request) -> Response:
        return JSONResponse([a.to_dict() for a in await client.agents()])

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

    return Starlette(
        routes=[
            Route("/v1/agents/{name}/messages", guarded(send), methods=["POST"]),
            Route("/v1/agents", guarded(agents), methods=["GET"]),
            Route("/v1/pending", guarded(pending), methods=["GET"]),
            Route("/v1/agents/{name}/tasks/{task}/answer", guarded(answer), methods=["POST"]),
            Route("/v1/agents/{name}/events/{event}", guarded(event), methods=["POST"]),
            Route("/v1/agents/{name}", guarded(agent), methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: bad_method},
    )
