"""What each ingress route does: one :class:`agentos.client.Client` call per request.

Every request goes through the client and its store, so a webhook is `agentos send`:
same validation, same size and depth limits (a full inbox answers 429 with
``Retry-After``), same idempotency keys (a key reused with another body answers 409
with the first task's id). List endpoints are paginated and read one page of the fleet
per request. Auth, the trust checks and the mapping of errors to statuses are the
app's (:mod:`agentos.ingress.app`); a handler here raises.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from agentos.client import DEFAULT_MAX_MESSAGE_BYTES, Client, NotFound, SendConflict
from agentos.client_waits import MAX_REASON_CHARS
from agentos.core.spec import AgentResource, SpecError, inbox_limit, parse_resource
from agentos.ingress.bounds import (
    MAX_BY_CHARS,
    Rejected,
    error,
    page_of,
    paged,
    parse_json,
    plain,
    read_body,
    require_json,
    wait_of,
)
from agentos.store import StoreError

__all__ = ["Endpoints", "Ready"]

Ready = Callable[[], bool]

PENDING_SCAN = 5000  # agents one /v1/pending page looks at, however few of them wait
TASK_POLL_S = 0.1


def _send_id(key: str | None) -> str | None:
    """The store's at-most-once id for a send: one per ``Idempotency-Key`` (so a replay
    gets the first message's id back, and the key with another body is a conflict);
    None (a fresh one) for a send without a key."""
    if key is None:
        return None
    return "k" + hashlib.sha256(key.encode()).hexdigest()[:32]


def _inbox_limit(spec: Mapping[str, Any]) -> int:
    """The agent's own message size limit, from its stored spec."""
    try:
        resource = parse_resource(spec)
    except SpecError:  # written by another agentos version: the store still checks
        return DEFAULT_MAX_MESSAGE_BYTES
    if not isinstance(resource, AgentResource):
        return DEFAULT_MAX_MESSAGE_BYTES
    return inbox_limit(resource)


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
            generation = await self._client.store.specs.generation()
            if generation != self._generation:
                self._names = sorted(await self._client.store.specs.desired_index())
                self._generation = generation
            names = self._names
        return names[bisect.bisect_right(names, cursor) :] if cursor else names


class Endpoints:
    """The route handlers of one app, over one client.

    ``principal`` is who answers, for the audit trail: the credential that let the
    request in (``http:token`` or ``http:loopback``); the name a caller gives (``"by"``)
    is kept beside it, vouched for by that credential only.
    """

    def __init__(
        self,
        client: Client,
        *,
        principal: str,
        ready: Ready,
        stopping: Ready,
        max_json_bytes: int,
        read_idle_s: float,
        read_total_s: float,
    ) -> None:
        self.client = client
        self.principal = principal
        self.ready = ready
        self.stopping = stopping
        self.max_json_bytes = max_json_bytes
        self.read_idle_s = read_idle_s
        self.read_total_s = read_total_s
        self._names = _Names(client)

    async def _json_body(self, request: Request) -> Any:
        require_json(request)
        raw = await read_body(
            request, self.max_json_bytes, idle_s=self.read_idle_s, total_s=self.read_total_s
        )
        try:
            return parse_json(raw)
        except ValueError as e:
            raise Rejected(400, "bad_json", f"the body must be JSON: {e}") from None

    async def send(self, request: Request) -> Response:
        client = self.client
        name = request.path_params["name"]
        spec = await client.store.specs.agent(name)
        if spec is None:
            raise NotFound(f'agent "{name}" not found')
        limit = _inbox_limit(spec)
        body = await read_body(request, limit, idle_s=self.read_idle_s, total_s=self.read_total_s)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return error(400, "bad_encoding", "the body must be UTF-8 text")
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

    async def pending(self, request: Request) -> Response:
        limit, cursor = page_of(request)
        after = await self._names.after(cursor)
        scanned = after[:PENDING_SCAN]
        found: list[Any] = []
        last = None  # the last agent this page covers
        for i in range(0, len(scanned), 500):
            batch = scanned[i : i + 500]
            waits = sorted(await self.client.store.waits.pending(batch), key=lambda w: w.agent)
            found += waits[: limit - len(found)]
            last = found[-1].agent if len(found) == limit else batch[-1]
            if len(found) == limit:
                break
        more = last is not None and last != after[-1]
        return paged(request, [w.to_dict() for w in found], last if more else None, limit)

    async def answer(self, request: Request) -> Response:
        name, task = request.path_params["name"], request.path_params["task"]
        body = await self._json_body(request)
        allowed = {"yes", "no", "choice", "text", "by", "reason"}
        if not isinstance(body, dict) or not set(body) <= allowed:
            return error(
                400, "bad_answer", 'send {"yes": true} | {"no": true} | {"choice": X} | {"text": T}'
            )
        choice, text, who = body.get("choice"), body.get("text"), body.get("by")
        reason = body.get("reason")
        if any(v is not None and not isinstance(v, str) for v in (choice, text, who, reason)):
            return error(400, "bad_answer", "choice, text, by and reason must be strings")
        if reason is not None:
            plain('"reason"', reason)
            if len(reason) > MAX_REASON_CHARS:
                return error(
                    400, "bad_answer", f'"reason" has at most {MAX_REASON_CHARS} characters'
                )
        if who is not None:
            plain('"by"', who)
            if len(who) > MAX_BY_CHARS:
                return error(400, "bad_answer", f'"by" has at most {MAX_BY_CHARS} characters')
        principal = self.principal
        by = f"{who} ({principal})" if who else principal
        r = await self.client.answer(
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

    async def event(self, request: Request) -> Response:
        name, event_name = request.path_params["name"], request.path_params["event"]
        plain("the event name", event_name)
        data = await self._json_body(request)
        ended = await self.client.send_event(name, event_name, data, by=self.principal)
        return JSONResponse({"agent": name, "event": event_name, "endedWait": ended}, 202)

    async def drop(self, request: Request) -> Response:
        name, task = request.path_params["name"], request.path_params["task"]
        body = await self._json_body(request)
        if body is None:
            body = {}
        if not isinstance(body, dict) or not set(body) <= {"by"}:
            return error(400, "bad_drop", 'send {} or {"by": NAME}')
        who = body.get("by")
        if who is not None and not isinstance(who, str):
            return error(400, "bad_drop", "by must be a string")
        if who is not None:
            plain('"by"', who)
            if len(who) > MAX_BY_CHARS:
                return error(400, "bad_drop", f'"by" has at most {MAX_BY_CHARS} characters')
        principal = self.principal
        where = await self.client.drop(name, task, by=f"{who} ({principal})" if who else principal)
        return JSONResponse({"agent": name, "task": task, "droppedFrom": where})

    async def agents(self, request: Request) -> Response:
        limit, cursor = page_of(request)
        after = await self._names.after(cursor)
        page = after[:limit]
        rows = await self.client.agents(page)
        more = page[-1] if len(after) > limit else None
        return paged(request, [a.to_dict() for a in rows], more, limit)

    async def task(self, request: Request) -> Response:
        """One task for its sender; ``?wait=30s`` holds the request until the task is
        done or its status changes (at most 60 s)."""
        name, task_id = request.path_params["name"], request.path_params["task"]
        wait_s = wait_of(request)
        view = await self.client.task_view(name, task_id)
        if wait_s > 0 and not view["done"]:
            first = view["status"]
            with anyio.move_on_after(wait_s):
                while view["status"] == first and not view["done"]:
                    await anyio.sleep(TASK_POLL_S)
                    view = await self.client.task_view(name, task_id)
        return JSONResponse(view)

    async def agent(self, request: Request) -> Response:
        detail = await self.client.describe(request.path_params["name"])
        return Response(json.dumps(detail.to_dict(), default=str), media_type="application/json")

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        try:
            await self.client.store.ping()
        except StoreError as e:
            return error(503, "redis_unavailable", str(e))
        if self.stopping():  # draining: a load balancer stops sending before the pod exits
            return error(503, "stopping", "the daemon is shutting down")
        if not self.ready():
            return error(503, "starting", "the daemon has not finished its first reconcile")
        return JSONResponse({"status": "ready"})
