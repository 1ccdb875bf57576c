"""HTTP ingress: webhooks and health checks served by the daemon (``--http HOST:PORT``).

Outside systems (CI, ticketing, chat ops) wake agents by POSTing a message; load
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

from agentos.client import DEFAULT_MAX_MESSAGE_BYTES, Client, ClientError, NotFound
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


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def build_app(
    client: Client,
    *,
    token: str | None,
    ready: Ready,
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
            Route("/v1/agents/{name}", guarded(agent), methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: bad_method},
    )
