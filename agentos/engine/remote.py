"""What every engine behind an HTTP server shares: replicas, affinity, retries and throttles.

A model served elsewhere (vLLM, SGLang, llama.cpp's server, Ollama, a hosted API) is one
or more replicas. An agent's calls go to one replica, chosen by consistent hash on its
name (:func:`agentos.core.routing.ring_order`), so the server's prefix cache keeps
hitting; a replica that refuses connections or answers 5xx or garbage is skipped for a
while and the call moves to the next one in ring order. ``429`` / ``503`` with
``Retry-After`` throttle the *model*, not the agent: every agent of the model waits
(up to the model's ``throttleWait``, else :class:`ModelThrottled`), and through a
:class:`ThrottleBoard` every daemon sharing the fleet's Redis does too. When no replica
can serve after the retries, :class:`EngineUnavailable` says so: an infrastructure
fault, retried by the runtime, never an agent crash. A server that refuses the Model's
key (401/403) or does not know its path or model (404, "model not found") raises
:class:`ModelMisconfigured`: an operator must fix the Model, so it is infrastructure
too, never the agent's crash. Every upstream text that reaches an exception goes
through :func:`scrub` first, with the credentials this client sends.
"""

from __future__ import annotations

import email.utils
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import httpx

from agentos.core.routing import ring_order
from agentos.engine.base import EngineError, EngineUnavailable, ModelMisconfigured

__all__ = [
    "ModelThrottled",
    "RemoteClient",
    "Replica",
    "ReplicaStats",
    "RequestRefused",
    "ThrottleBoard",
    "misconfigured",
    "scrub",
]

log = logging.getLogger("agentos.engine.remote")

_UNHEALTHY_S = (0.5, 30.0)  # a failing replica is skipped for this long, doubling per failure
_DEFAULT_RETRY_AFTER_S = 1.0
_BOARD_CACHE_S = 0.25  # how stale the fleet-wide throttle may be before it is read again


class ModelThrottled(EngineUnavailable):
    """The model's provider asked to slow down for longer than the call may wait."""

    def __init__(self, model: str, retry_after_s: float) -> None:
        super().__init__(f"model {model!r} is throttled by its provider for {retry_after_s:.1f}s")
        self.model = model
        self.retry_after_s = retry_after_s


class RequestRefused(EngineError):
    """The server answered 4xx: the request itself was wrong for it (never retried).

    ``detail`` is the server's message, truncated, with credentials and control
    characters removed, so it can go into an event or a log as it is.
    """

    def __init__(self, model: str, status: int, detail: str) -> None:
        super().__init__(f"model {model!r} refused the request (HTTP {status}): {detail}")
        self.model = model
        self.status = status
        self.detail = detail


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A bearer token echoed back whole ("Authorization: Bearer ..."), whoever resolved it.
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
_DETAIL_CHARS = 300
# Statuses that say the Model, not the request, is wrong: a key refused, no such path.
_MISCONFIGURED = (401, 403, 404)
# How servers word "no such model" (OpenAI's code, vLLM, Ollama, llama.cpp's router),
# whatever status they send it with.
_NO_SUCH_MODEL = re.compile(
    r"model_not_found|\bmodel\b[^\n]{0,200}?\b(not found|does not exist)",
    re.IGNORECASE,
)


def scrub(text: str, secrets: Sequence[str] = (), limit: int = _DETAIL_CHARS) -> str:
    """``text`` from upstream made safe to show: secrets replaced (and any bearer token
    echoed back), control characters dropped (no terminal escapes in a log), at most
    ``limit`` characters."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _BEARER.sub(r"\1***", text)
    text = _CONTROL.sub(" ", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def misconfigured(status: int, detail: str) -> bool:
    """Whether a 4xx answer (``detail`` its body) says the Model itself is wrong."""
    return status in _MISCONFIGURED or bool(_NO_SUCH_MODEL.search(detail))


class ThrottleBoard(Protocol):
    """Where the fleet shares a model's throttle (the daemon backs it with Redis)."""

    async def throttled_until(self, model: str) -> float:
        """Epoch seconds until which ``model``'s provider throttles (0: not throttled)."""
        ...

    async def throttle(self, model: str, until: float) -> None:
        """Record that ``model`` is throttled until ``until`` (epoch seconds)."""
        ...


@dataclass(slots=True)
class ReplicaStats:
    """What ``describe model`` shows per replica."""

    requests: int = 0
    failures: int = 0
    throttles: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    busy_s: float = 0.0

    def to_dict(self) -> dict[str, float]:
        """Plain data, with the cache hit ratio and tokens per second of busy time."""
        return {
            "requests": self.requests,
            "failures": self.failures,
            "throttles": self.throttles,
            "promptTokens": self.prompt_tokens,
            "cachedTokens": self.cached_tokens,
            "outputTokens": self.output_tokens,
            "cacheHitRatio": round(self.cached_tokens / self.prompt_tokens, 4)
            if self.prompt_tokens
            else 0.0,
            "tokensPerSecond": round(self.output_tokens / self.busy_s, 2) if self.busy_s else 0.0,
        }


@dataclass(slots=True)
class Replica:
    """One server of a model."""

    url: str
    max_concurrent: int = 4
    slot_dir: str | None = None
    limiter: anyio.CapacityLimiter = field(init=False)
    down_until: float = 0.0  # monotonic seconds; skipped until then
    failures_in_row: int = 0
    last_error: str = ""
    stats: ReplicaStats = field(default_factory=ReplicaStats)

    def __post_init__(self) -> None:
        self.limiter = anyio.CapacityLimiter(self.max_concurrent)

    @property
    def healthy(self) -> bool:
        """Whether calls may go to it now."""
        return time.monotonic() >= self.down_until

    @property
    def in_flight(self) -> int:
        """Calls it serves now."""
        return int(self.limiter.borrowed_tokens)

    def failed(self, why: str) -> None:
        """A connection error, 5xx or garbage: skip it for a while (longer each time)."""
        self.failures_in_row += 1
        self.stats.failures += 1
        low, high = _UNHEALTHY_S
        self.down_until = time.monotonic() + min(high, low * 2 ** (self.failures_in_row - 1))
        self.last_error = why

    def ok(self) -> None:
        """It answered: healthy again."""
        self.failures_in_row = 0
        self.down_until = 0.0


def retry_after_s(headers: Mapping[str, str], now: float) -> float:
    """Seconds a ``Retry-After`` header asks for (delta seconds or an HTTP date)."""
    value = headers.get("retry-after", "").strip()
    if not value:
        return _DEFAULT_RETRY_AFTER_S
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return _DEFAULT_RETRY_AFTER_S
    return max(0.0, when.timestamp() - now)


class _Retry(Exception):
    """This replica could not serve; try the next, or (throttled) wait (internal)."""

    def __init__(self, why: str, *, throttled: bool = False) -> None:
        super().__init__(why)
        self.throttled = throttled


TraceInject = Callable[[MutableMapping[str, str]], None]
_trace_inject: TraceInject | None = None


def propagate_traces(inject: TraceInject | None) -> None:
    """Make every model call carry the caller's trace context (``traceparent``): the
    daemon passes its telemetry's injector (this layer does not import opentelemetry),
    None stops it. A call made inside an inference span then continues that trace at the
    model server (vLLM, SGLang and llama.cpp's server read it)."""
    global _trace_inject
    _trace_inject = inject


async def _add_trace_context(request: httpx.Request) -> None:
    if _trace_inject is not None:
        _trace_inject(request.headers)


class RemoteClient:
    """The HTTP side of a remote model: one pooled client, replica choice and retries."""

    def __init__(
        self,
        model: str,
        replicas: Sequence[Replica],
        *,
        api_key: str | None = None,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 120.0,
        throttle_wait_s: float = 10.0,
        attempts: int = 3,
        board: ThrottleBoard | None = None,
    ) -> None:
        if not replicas:
            raise ValueError("a remote model needs at least one endpoint")
        self.model = model
        self.replicas = list(replicas)
        self.throttle_wait_s = throttle_wait_s
        self.attempts = max(1, attempts)
        self.board = board
        self._secrets = (api_key,) if api_key else ()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(
            headers=headers,
            event_hooks={"request": [_add_trace_context]},
            timeout=httpx.Timeout(request_timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=sum(r.max_concurrent for r in replicas) + 4),
        )
        self.throttled_until = 0.0  # epoch seconds, as this daemon knows it
        self._board_read_at = -math.inf

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.http.aclose()

    def scrub(self, text: str) -> str:
        """Upstream text with this model's credentials and control characters removed."""
        return scrub(text, self._secrets)

    def order(self, key: str) -> list[Replica]:
        """Replicas in the order ``key`` (an agent) tries them."""
        return [self.replicas[i] for i in ring_order(key, [r.url for r in self.replicas])]

    # ------------------------------------------------------------------ throttle

    async def throttle(self, until: float) -> None:
        """The provider said 429/503: no call of this model before ``until``, fleet-wide."""
        self.throttled_until = max(self.throttled_until, until)
        if self.board is not None:
            try:
                await self.board.throttle(self.model, until)
            except Exception as e:  # the board is a hint; the local throttle holds anyway
                log.warning("%s: could not share the throttle: %s", self.model, e)

    async def wait_throttle(self, waited_s: float) -> float:
        """Wait out the model's throttle if it ends within the call's allowance.

        Returns the seconds waited. Raises :class:`ModelThrottled` when it lasts longer.
        """
        now = time.time()
        if self.board is not None and time.monotonic() - self._board_read_at > _BOARD_CACHE_S:
            try:
                shared = await self.board.throttled_until(self.model)
            except Exception as e:
                log.warning("%s: could not read the shared throttle: %s", self.model, e)
            else:
                self.throttled_until = max(self.throttled_until, shared)
                self._board_read_at = time.monotonic()
        left = self.throttled_until - now
        if left <= 0:
            return 0.0
        if waited_s + left > self.throttle_wait_s:
            raise ModelThrottled(self.model, left)
        await anyio.sleep(left)
        return left

    # ------------------------------------------------------------------ calls

    def _candidates(self, key: str, pinned: Replica | None) -> list[Replica]:
        if pinned is not None:
            return [pinned]
        ordered = self.order(key)
        healthy = [r for r in ordered if r.healthy]
        return healthy or ordered[:1]  # all down: try the agent's own one (it may be back)

    @asynccontextmanager
    async def call(
        self,
        key: str,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        pinned: Replica | None = None,
        stream: bool = False,
    ) -> AsyncIterator[tuple[Replica, httpx.Response]]:
        """Send one request for agent ``key``, retrying on another replica when one fails.

        Yields the replica and a successful (2xx) response; with ``stream`` its body is
        read by the caller. ``pinned`` keeps the call on one replica (it holds the
        agent's slot). Raises :class:`ModelThrottled`, :class:`EngineUnavailable` when
        no replica could serve, :class:`ModelMisconfigured` for 401/403/404 or "no such
        model", :class:`RequestRefused` for another 4xx (a bad request).
        """
        waited = 0.0
        reasons: list[str] = []
        for attempt in range(self.attempts):
            waited += await self.wait_throttle(waited)
            for replica in self._candidates(key, pinned):
                started = time.monotonic()
                async with replica.limiter:
                    try:
                        async with self._send(replica, method, path, body, stream) as response:
                            replica.stats.requests += 1
                            yield replica, response
                            replica.stats.busy_s += time.monotonic() - started
                            return
                    except _Retry as e:
                        reasons.append(f"{replica.url}: {e}")
                        if e.throttled:  # the model's limit, not this replica's: wait
                            break
            if attempt + 1 < self.attempts:
                await anyio.sleep(min(2.0, 0.2 * 2**attempt))
        left = self.throttled_until - time.time()
        if left > 0:
            raise ModelThrottled(self.model, left)
        why = "; ".join(reasons[-3:]) or "no replica answered"
        raise EngineUnavailable(f"model {self.model!r} is unavailable: {why}")

    @asynccontextmanager
    async def _send(
        self,
        replica: Replica,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        stream: bool,
    ) -> AsyncIterator[httpx.Response]:
        request = self.http.build_request(method, replica.url + path, json=body)
        try:
            response = await self.http.send(request, stream=True)
        except httpx.TransportError as e:
            replica.failed(f"{type(e).__name__}: {self.scrub(str(e))}")
            raise _Retry(replica.last_error) from e
        try:
            if response.status_code in (429, 503):
                replica.stats.throttles += 1
                await self.throttle(time.time() + retry_after_s(response.headers, time.time()))
                raise _Retry(f"HTTP {response.status_code} (throttled)", throttled=True)
            if response.status_code >= 500:
                replica.failed(f"HTTP {response.status_code}")
                raise _Retry(replica.last_error)
            if response.status_code >= 400:
                status = response.status_code
                text = self.scrub((await response.aread()).decode(errors="replace"))
                if misconfigured(status, text):
                    # Not this replica's fault nor the request's: every call would get
                    # the same answer until the Model (key, URL, name) is fixed.
                    raise ModelMisconfigured(
                        self.model, f"HTTP {status} on {method} {replica.url}{path}: {text}"
                    )
                raise RequestRefused(self.model, status, text)
            if not stream:
                try:
                    await response.aread()
                except httpx.TransportError as e:
                    replica.failed(f"{type(e).__name__}: {self.scrub(str(e))}")
                    raise _Retry(replica.last_error) from e
                try:
                    parsed = response.json()
                except ValueError:
                    parsed = None
                if not isinstance(parsed, dict):
                    replica.failed("garbage answer (not a JSON object)")
                    raise _Retry(replica.last_error)
            replica.ok()
            yield response
        except httpx.TransportError as e:
            # Mid-stream: the caller has seen part of the answer, so no silent retry.
            why = self.scrub(str(e))
            replica.failed(f"{type(e).__name__}: {why}")
            raise EngineUnavailable(f"model {self.model!r}: connection lost mid-call: {why}") from e
        finally:
            await response.aclose()

    def garbage(self, replica: Replica, what: str) -> EngineUnavailable:
        """A 2xx answer that does not parse: the replica is faulty (skipped for a while)."""
        replica.failed(f"garbage answer: {what}")
        return EngineUnavailable(f"model {self.model!r} answered garbage ({what})")
