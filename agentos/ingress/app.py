"""The ingress app: routes, bearer-token auth, trust checks and errors as statuses.

Every request (unknown routes too) passes :func:`agentos.ingress.trust.refusal` first;
then a guarded route checks the bearer token, in constant time and never logged, and
turns what its handler raises (client errors, refusals, a store that is away) into the
status a caller acts on.
"""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from agentos.client import (
    AnswerRejected,
    Client,
    ClientError,
    EventsFull,
    InboxFull,
    MessageTooLarge,
    NotFound,
)
from agentos.ingress.bounds import (
    MAX_JSON_BYTES,
    READ_IDLE_S,
    READ_TOTAL_S,
    Rejected,
    error,
)
from agentos.ingress.endpoints import Endpoints, Ready
from agentos.ingress.trust import refusal
from agentos.store import StoreError

__all__ = ["build_app"]

log = logging.getLogger("agentos.ingress")

Handler = Callable[[Request], Awaitable[Response]]


class _Trust:
    """ASGI middleware: every request (unknown routes too) passes :func:`refusal` first."""

    def __init__(self, app: ASGIApp, *, bind: tuple[str, int] | None, token: bool) -> None:
        self.app, self.bind, self.token = app, bind, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            why = refusal(Headers(scope=scope), bind=self.bind, token=self.token)
            if why is not None:
                await error(403, "forbidden", why)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _guarded(handler: Handler, *, token: str | None) -> Handler:
    """``handler`` behind the bearer token (if any), its errors answered as statuses."""

    async def endpoint(request: Request) -> Response:
        if token is not None:
            given = request.headers.get("authorization", "")
            expected = f"Bearer {token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return error(401, "unauthorized", "missing or wrong bearer token")
        try:
            return await handler(request)
        except Rejected as e:
            return error(e.status, e.code, str(e))
        except ClientDisconnect:
            # Nobody is left to answer; one line, no traceback, and nothing was done.
            log.info("%s %s: the client hung up mid-body", request.method, request.url.path)
            return Response(status_code=400)
        except NotFound as e:
            return error(404, "not_found", str(e))
        except AnswerRejected as e:
            return error(422 if e.code == "invalid" else 409, e.code, str(e))
        except MessageTooLarge as e:
            return error(413, "too_large", f"body is larger than {e.limit} bytes")
        except InboxFull as e:
            # Retry-After in whole seconds (RFC 9110), never 0: a client must wait.
            response = error(429, "inbox_full", str(e))
            response.headers["retry-after"] = str(max(1, math.ceil(e.retry_after_s)))
            return response
        except EventsFull as e:
            return error(429, "events_full", str(e))
        except ClientError as e:
            return error(422, "rejected", str(e))
        except StoreError as e:
            return error(503, "unavailable", str(e))

    return endpoint


async def _not_found(request: Request, exc: Exception) -> Response:
    return error(404, "not_found", f"no route for {request.method} {request.url.path}")


async def _bad_method(request: Request, exc: Exception) -> Response:
    return error(405, "method_not_allowed", f"{request.method} is not allowed here")


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
    e = Endpoints(
        client,
        principal="http:token" if token is not None else "http:loopback",
        ready=ready,
        stopping=stopping,
        max_json_bytes=max_json_bytes,
        read_idle_s=read_idle_s,
        read_total_s=read_total_s,
    )

    def guarded(handler: Handler) -> Handler:
        return _guarded(handler, token=token)

    app = Starlette(
        routes=[
            Route("/v1/agents/{name}/messages", guarded(e.send), methods=["POST"]),
            Route("/v1/agents", guarded(e.agents), methods=["GET"]),
            Route("/v1/pending", guarded(e.pending), methods=["GET"]),
            Route("/v1/agents/{name}/tasks/{task}", guarded(e.task), methods=["GET"]),
            Route("/v1/agents/{name}/tasks/{task}/answer", guarded(e.answer), methods=["POST"]),
            Route("/v1/agents/{name}/tasks/{task}/drop", guarded(e.drop), methods=["POST"]),
            Route("/v1/agents/{name}/events/{event}", guarded(e.event), methods=["POST"]),
            Route("/v1/agents/{name}", guarded(e.agent), methods=["GET"]),
            Route("/healthz", e.healthz, methods=["GET"]),
            Route("/readyz", e.readyz, methods=["GET"]),
        ],
        exception_handlers={404: _not_found, 405: _bad_method},
    )
    app.add_middleware(_Trust, bind=bind, token=token is not None)
    return app
