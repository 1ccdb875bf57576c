"""The ``llamaserver`` engine: llama.cpp's HTTP server, with an agent's KV hibernated through slots.

The server does continuous batching over ``n_parallel`` slots. Each open session holds
one slot (``id_slot`` on every request) and the engine keeps the session's token ids,
so every call sends the whole history as tokens and the slot's cache reuses all but
the new ones (``timings.cache_n``). Hibernating saves the slot to a file in the
server's slot directory (``POST /slots/{id}?action=save``), reads the bytes (they go to
Redis through the snapshot store: chunks, digests, manifest last) and deletes the file;
waking writes them back and restores into whatever slot is free
(``action=restore``), checked against the token count the save reported. A restore the
server refuses (a corrupt file, another build) returns False, and the runtime
re-prefills from the token history.

With no endpoint, the engine starts its own server from the ``xllamacpp`` wheel in a
child process on loopback (:mod:`.llamaserver_child`; slot files under
``AGENTOS_HOME``) and stops it in :meth:`LlamaServerEngine.close`. With an endpoint,
slot files move only through a directory both can see (``slotDir``); without one the
engine keeps the token history only, and says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from agentos.engine.base import (
    Completion,
    ContextOverflow,
    EngineError,
    EngineUnavailable,
    KVSnapshot,
    NoFreeSlot,
    SessionInfo,
    StreamChunk,
)
from agentos.engine.gguf import ensure_default_model, model_sha256
from agentos.engine.llamaserver_child import EmbeddedServer
from agentos.engine.remote import RemoteClient, Replica, ThrottleBoard

__all__ = ["EmbeddedServer", "LlamaServerEngine"]

log = logging.getLogger("agentos.engine.llamaserver")


@dataclass(slots=True)
class _Session:
    replica: Replica
    slot: int
    tokens: list[int] = field(default_factory=list)
    restored: int = -1  # tokens the last restore put in the slot (-1: none)


@dataclass(slots=True)
class LlamaServerStats:
    """Counters tests and ``describe model`` read."""

    saves: int = 0
    restores: int = 0
    restore_failures: int = 0
    last_cache_n: int = 0  # timings.cache_n of the latest call
    last_restore_check: tuple[int, int] | None = None  # (restored, cache_n of the next call)


class LlamaServerEngine:
    """llama.cpp's server with slot-file KV hibernation (see the module docstring)."""

    def __init__(
        self,
        *,
        model: str = "gemma-3-270m",
        endpoints: Sequence[Mapping[str, Any]] = (),
        home: Path | None = None,
        model_path: str | Path | None = None,
        slots: int = 2,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        api_key: str | None = None,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 300.0,
        throttle_wait_s: float = 10.0,
        attempts: int = 3,
        throttle_board: ThrottleBoard | None = None,
    ) -> None:
        self._model = model
        self.server: EmbeddedServer | None = None
        self.stats = LlamaServerStats()
        if not endpoints:
            if home is None:
                from agentos.settings import default_home

                home = default_home()
            path = Path(model_path) if model_path is not None else ensure_default_model(home)
            folder = home / "llamaserver" / f"{model}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            self.server = EmbeddedServer(
                model_path=path,
                slot_dir=folder / "slots",
                n_ctx=n_ctx,
                n_parallel=slots,
                n_threads=n_threads or min(4, os.cpu_count() or 2),
            )
            replicas = [Replica(self.server.url, slots, str(self.server.slot_dir))]
            self._model_id = model_sha256(path)
        else:
            replicas = [
                Replica(
                    str(e["url"]),
                    int(e.get("max_concurrent", slots)),
                    e.get("slot_dir"),
                )
                for e in endpoints
            ]
            self._model_id = ""
        self.client = RemoteClient(
            model,
            replicas,
            api_key=api_key,
            connect_timeout_s=connect_timeout_s,
            request_timeout_s=request_timeout_s,
            throttle_wait_s=throttle_wait_s,
            attempts=attempts,
            board=throttle_board,
        )
        self._sessions: dict[str, _Session] = {}
        self._props: dict[str, dict[str, Any]] = {}
        self._dirty: set[tuple[str, int]] = set()  # slots closed since their last use: erase
        self._sync = httpx.Client(
            timeout=httpx.Timeout(request_timeout_s, connect=connect_timeout_s)
        )
        self._slot_ctx = 0
        for replica in replicas:
            props = self._get_props(replica)
            self._props[replica.url] = props
            total = int(props.get("total_slots") or replica.max_concurrent)
            replica.max_concurrent = total
            replica.limiter.total_tokens = total
            self._slot_ctx = int(props.get("default_generation_settings", {}).get("n_ctx") or 0)
        self._fingerprint = self._make_fingerprint(n_ctx)
        if not self.kv_hibernation:
            log.warning(
                "llamaserver model %s: no slotDir for its endpoint(s); hibernation keeps the "
                "token history only and waking re-prefills it",
                model,
            )

    def _get_props(self, replica: Replica) -> dict[str, Any]:
        try:
            response = self._sync.get(replica.url + "/props")
            response.raise_for_status()
            props = response.json()
        except (httpx.HTTPError, ValueError) as e:
            raise EngineUnavailable(
                f"llama.cpp server at {replica.url} did not answer /props: {e}"
            ) from e
        return dict(props)

    def _make_fingerprint(self, n_ctx: int) -> str:
        first = next(iter(self._props.values()))
        parts = {
            "model": self._model_id or str(first.get("model_path", "")),
            "build": str(first.get("build_info", "")),
            "slot_ctx": self._slot_ctx or n_ctx,
            "cache": "f16/f16",
            "swa_full": True if self.server is not None else "server",
            "checkpoints": 0 if self.server is not None else "server",
        }
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
        return f"llamaserver/{digest}"

    def close(self) -> None:
        """Stop the embedded server (if any) and close the clients."""
        self._sync.close()
        if self.server is not None:
            self.server.stop()

    async def aclose(self) -> None:
        """Close the connection pool and stop the embedded server."""
        await self.client.aclose()
        self.close()

    # ------------------------------------------------------------------ identity

    @property
    def name(self) -> str:
        return "llamaserver"

    @property
    def model(self) -> str:
        return self._model

    @property
    def slots(self) -> int:
        return sum(r.max_concurrent for r in self.client.replicas)

    @property
    def parallel(self) -> int:
        return self.slots

    @property
    def kv_hibernation(self) -> bool:
        """Whether slot files can reach Redis (else hibernation keeps the history only)."""
        return all(r.slot_dir for r in self.client.replicas)

    def fingerprint(self) -> str:
        return self._fingerprint

    def count_tokens(self, text: str) -> int:
        return len(self._tokenize_sync(text))

    def _tokenize_sync(self, text: str) -> list[int]:
        replica = self.client.replicas[0]
        try:
            response = self._sync.post(replica.url + "/tokenize", json={"content": text})
            return [int(t) for t in response.json()["tokens"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return list(range(max(1, len(text) // 4)))  # an estimate while it is away

    # ------------------------------------------------------------------ sessions

    def _session(self, session_id: str) -> _Session:
        s = self._sessions.get(session_id)
        if s is None:
            raise EngineError(f"no open session {session_id!r}")
        return s

    def open_session(self, session_id: str) -> None:
        if session_id in self._sessions:
            raise EngineError(f"session {session_id!r} is already open")
        taken = {(s.replica.url, s.slot) for s in self._sessions.values()}
        for replica in self.client.order(session_id):
            for slot in range(replica.max_concurrent):
                if (replica.url, slot) not in taken:
                    self._sessions[session_id] = _Session(replica, slot)
                    return
        raise NoFreeSlot(f"all {self.slots} llama.cpp server slots are held")

    def close_session(self, session_id: str) -> None:
        s = self._sessions.pop(session_id, None)
        if s is not None:
            self._dirty.add((s.replica.url, s.slot))

    def has_session(self, session_id: str) -> bool:
        return session_id in self._sessions

    def session_info(self, session_id: str) -> SessionInfo:
        return SessionInfo(session_id, len(self._session(session_id).tokens), 0)

    async def _slot_action(
        self, s: _Session, session_id: str, action: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        async with self.client.call(
            session_id, "POST", f"/slots/{s.slot}?action={action}", body or {}, pinned=s.replica
        ) as (_, response):
            return dict(response.json())

    async def _clean(self, session_id: str, s: _Session) -> None:
        key = (s.replica.url, s.slot)
        if key in self._dirty:
            await self._slot_action(s, session_id, "erase")
            self._dirty.discard(key)

    async def reset_session(self, session_id: str) -> None:
        s = self._session(session_id)
        s.tokens = []
        s.restored = -1
        self._dirty.add((s.replica.url, s.slot))
        await self._clean(session_id, s)

    async def export_kv(self, session_id: str) -> KVSnapshot:
        s = self._session(session_id)
        tokens = tuple(s.tokens)
        if not s.replica.slot_dir or not tokens:
            return KVSnapshot(self._fingerprint, tokens, None)
        filename = f"agentos-{uuid.uuid4().hex}.bin"
        path = Path(s.replica.slot_dir) / filename
        try:
            saved = await self._slot_action(s, session_id, "save", {"filename": filename})
            data = path.read_bytes()
        except (OSError, EngineError) as e:
            log.warning("%s: slot save failed (%s); keeping the token history only", session_id, e)
            return KVSnapshot(self._fingerprint, tokens, None)
        finally:
            path.unlink(missing_ok=True)
        self.stats.saves += 1
        return KVSnapshot(self._fingerprint, tokens, data, int(saved.get("n_saved", len(tokens))))

    async def import_kv(self, session_id: str, snapshot: KVSnapshot) -> bool:
        s = self._session(session_id)
        if snapshot.data is None or snapshot.fingerprint != self._fingerprint:
            return False
        if not s.replica.slot_dir:
            return False
        filename = f"agentos-{uuid.uuid4().hex}.bin"
        path = Path(s.replica.slot_dir) / filename
        expected = snapshot.n_kv if snapshot.n_kv is not None else len(snapshot.tokens)
        try:
            path.write_bytes(snapshot.data)
            restored = await self._slot_action(s, session_id, "restore", {"filename": filename})
        except (OSError, EngineError) as e:
            log.warning("%s: slot restore refused: %s", session_id, e)
            self.stats.restore_failures += 1
            self._dirty.add((s.replica.url, s.slot))
            return False
        finally:
            path.unlink(missing_ok=True)
        self._dirty.discard((s.replica.url, s.slot))
        n = int(restored.get("n_restored", -1))
        if n != expected:
            log.warning(
                "%s: restore put %d tokens in the slot, expected %d", session_id, n, expected
            )
            self.stats.restore_failures += 1
            self._dirty.add((s.replica.url, s.slot))
            await self._clean(session_id, s)
            return False
        s.tokens = list(snapshot.tokens)
        s.restored = n
        self.stats.restores += 1
        return True

    async def prefill(self, session_id: str, tokens: Sequence[int]) -> float:
        s = self._session(session_id)
        await self._clean(session_id, s)
        started = time.perf_counter()
        body = {"prompt": list(tokens), "n_predict": 0, "id_slot": s.slot, "cache_prompt": True}
        async with self.client.call(session_id, "POST", "/completion", body, pinned=s.replica):
            pass
        s.tokens = list(tokens)
        return time.perf_counter() - started

    # ------------------------------------------------------------------ calls

    async def _tokenize(self, session_id: str, s: _Session, text: str) -> list[int]:
        body = {"content": text, "add_special": not s.tokens}
        async with self.client.call(session_id, "POST", "/tokenize", body, pinned=s.replica) as (
            replica,
            response,
        ):
            try:
                return [int(t) for t in response.json()["tokens"]]
            except (KeyError, TypeError, ValueError) as e:
                raise self.client.garbage(replica, "/tokenize without tokens") from e

    async def _request(
        self,
        session_id: str,
        prompt: str,
        max_tokens: int,
        stop: Sequence[str],
        temperature: float,
        grammar: str | None,
        json_schema: Mapping[str, Any] | None,
    ) -> tuple[_Session, list[int], dict[str, Any]]:
        if not prompt:
            raise EngineError("prompt must not be empty")
        s = self._session(session_id)
        await self._clean(session_id, s)
        new = await self._tokenize(session_id, s, prompt)
        total = len(s.tokens) + len(new) + max_tokens
        if self._slot_ctx and total > self._slot_ctx:
            raise ContextOverflow(
                f"{len(s.tokens)} + {len(new)} prompt + {max_tokens} new tokens exceed the "
                f"slot's context of {self._slot_ctx}"
            )
        body: dict[str, Any] = {
            "prompt": [*s.tokens, *new],
            "id_slot": s.slot,
            "cache_prompt": True,
            "n_predict": max_tokens,
            "temperature": temperature,
            "return_tokens": True,
        }
        if stop:
            body["stop"] = list(stop)
        if grammar is not None:
            body["grammar"] = grammar
        if json_schema is not None:
            body["json_schema"] = dict(json_schema)
        return s, new, body

    def _finish(
        self, s: _Session, new: list[int], out: Sequence[int], timings: Mapping[str, Any]
    ) -> tuple[int, int]:
        cache_n = int(timings.get("cache_n") or 0)
        prompt_n = int(timings.get("prompt_n") or 0)
        self.stats.last_cache_n = cache_n
        if s.restored >= 0:
            self.stats.last_restore_check = (s.restored, cache_n)
            if cache_n + 8 < s.restored:
                log.warning("restored %d tokens but the server reused %d", s.restored, cache_n)
            s.restored = -1
        s.tokens.extend(new)
        s.tokens.extend(out)
        s.replica.stats.prompt_tokens += prompt_n + cache_n
        s.replica.stats.cached_tokens += cache_n
        s.replica.stats.output_tokens += len(out)
        return prompt_n, cache_n

    async def generate(
        self,
        session_id: str,
        prompt: str,
        *,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        grammar: str | None = None,
        json_schema: Mapping[str, Any] | None = None,
    ) -> Completion:
        started = time.perf_counter()
        s, new, body = await self._request(
            session_id, prompt, max_tokens, stop, temperature, grammar, json_schema
        )
        async with self.client.call(session_id, "POST", "/completion", body, pinned=s.replica) as (
            replica,
            response,
        ):
            data = response.json()
        try:
            text = str(data["content"])
            out = [int(t) for t in data.get("tokens") or []]
        except (KeyError, TypeError, ValueError) as e:
            raise self.client.garbage(replica, f"/completion without content: {e}") from e
        timings = data.get("timings") or {}
        prompt_n, cache_n = self._finish(s, new, out, timings)
        elapsed = time.perf_counter() - started
        return Completion(
            text=text,
            input_tokens=prompt_n,
            output_tokens=int(timings.get("predicted_n") or len(out)),
            finish_reason="length" if data.get("stop_type") == "limit" else "stop",
            time_to_first_token_s=float(timings.get("prompt_ms") or 0.0) / 1000,
            duration_s=elapsed,
            cached_tokens=cache_n,
        )

    async def stream(
        self,
        session_id: str,
        prompt: str,
        *,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        grammar: str | None = None,
        json_schema: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[StreamChunk]:
        s, new, body = await self._request(
            session_id, prompt, max_tokens, stop, temperature, grammar, json_schema
        )
        body["stream"] = True
        out: list[int] = []
        last: dict[str, Any] = {}
        async with self.client.call(
            session_id, "POST", "/completion", body, pinned=s.replica, stream=True
        ) as (replica, response):
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                try:
                    event = json.loads(line[5:])
                except ValueError as e:
                    raise self.client.garbage(replica, "a stream event is not JSON") from e
                ids = tuple(int(t) for t in event.get("tokens") or [])
                out.extend(ids)
                if event.get("stop"):
                    last = event
                    break
                if event.get("content") or ids:
                    yield StreamChunk(str(event.get("content") or ""), ids)
        self._finish(s, new, out, last.get("timings") or {})
        reason = "length" if last.get("stop_type") == "limit" else "stop"
        yield StreamChunk("", (), True, reason)

    # ------------------------------------------------------------------ status

    def describe(self) -> dict[str, Any]:
        """Replicas, health, slots held and counters, for ``describe model``."""
        return {
            "engine": self.name,
            "servedModel": self._model,
            "embedded": self.server is not None,
            "hibernation": "kv" if self.kv_hibernation else "history (no slotDir)",
            "sessions": len(self._sessions),
            "saves": self.stats.saves,
            "restores": self.stats.restores,
            "restoreFailures": self.stats.restore_failures,
            "replicas": [
                {
                    "url": r.url,
                    "healthy": r.healthy,
                    "inFlight": r.in_flight,
                    "slots": r.max_concurrent,
                    "lastError": r.last_error,
                    **r.stats.to_dict(),
                }
                for r in self.client.replicas
            ],
        }
