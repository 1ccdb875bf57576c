"""``LlamaServerEngine``: the :class:`~agentos.engine.base.Engine` calls on llama.cpp's server.

The design (slots, hibernation through slot files, the embedded server, chat lowering)
is in :mod:`agentos.engine.llamaserver`. This module starts the engine and hands each
call to the module that does it: text calls to :mod:`.text`, chat to :mod:`.chat`,
hibernation to :mod:`.kv` (over the slots of :mod:`.slots`); the embedded server's
idle stop is in :mod:`.lifecycle` and the template choice in :mod:`.template`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import httpx

import agentos.engine.llamaserver as _package
from agentos.core.chat import Reply, ToolSpec
from agentos.core.modelspec import DEFAULT_IDLE_STOP_S
from agentos.engine.base import Completion, Engine, KVSnapshot, SessionInfo, StreamChunk
from agentos.engine.gguf import ensure_default_model, gguf_has_chat_template
from agentos.engine.llamaserver import chat, kv, text
from agentos.engine.llamaserver.lifecycle import ServerLife
from agentos.engine.llamaserver.probe import SyncProbe
from agentos.engine.llamaserver.slots import Conn, SlotTable
from agentos.engine.llamaserver.state import LlamaServerStats, Session
from agentos.engine.llamaserver.template import builtin_of, server_template
from agentos.engine.llamaserver_child import EmbeddedServer
from agentos.engine.remote import RemoteClient, Replica, ThrottleBoard
from agentos.settings import default_home, default_llama_threads

__all__ = ["LlamaServerEngine"]

log = logging.getLogger("agentos.engine.llamaserver")


class LlamaServerEngine:
    """llama.cpp's server with slot-file KV hibernation (see :mod:`agentos.engine.llamaserver`).

    ``chat_template`` (the Model's ``chatTemplate``) applies to the embedded server: a
    built-in name (``gemma``, ``chatml``, ``plain``) or a Jinja file; None keeps the
    GGUF's own template, or gives :data:`DEFAULT_TEMPLATE` (``gemma``) to a GGUF that
    has none. A remote server renders with its own. ``api_key`` goes to every request;
    given to an embedded server, the server requires it too. A session holds either a
    text context (:meth:`generate`, :meth:`stream`) or a conversation (:meth:`chat`);
    mixing them on one session is refused until :meth:`reset_session`.
    """

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
        chat_template: str | None = None,
        idle_stop_s: float | None = DEFAULT_IDLE_STOP_S,
    ) -> None:
        if idle_stop_s is not None and not idle_stop_s > 0:
            raise ValueError(f"idle_stop_s must be > 0 (None: never), got {idle_stop_s}")
        if n_threads is not None and n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        self._model = model
        self.server: EmbeddedServer | None = None
        self.stats = LlamaServerStats()
        # The embedded server's idle stop and restarts, once it is up (None: at endpoints).
        self._life: ServerLife | None = None
        # Made before anything can fail, so that the cleanup below can always close it.
        self._probe = SyncProbe(
            api_key=api_key,
            connect_timeout_s=connect_timeout_s,
            request_timeout_s=request_timeout_s,
        )
        try:
            if not endpoints:
                if home is None:
                    home = default_home()
                path = Path(model_path) if model_path is not None else ensure_default_model(home)
                template = server_template(chat_template, gguf_has_chat_template(path))
                folder = home / "llamaserver" / f"{model}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
                self.server = EmbeddedServer(
                    model_path=path,
                    slot_dir=folder / "slots",
                    n_ctx=n_ctx,
                    n_parallel=slots,
                    n_threads=n_threads or default_llama_threads(),
                    chat_template=template.chat_template,
                    use_jinja=template.use_jinja,
                    api_key=api_key,
                )
                replicas = [Replica(self.server.url, slots, str(self.server.slot_dir))]
                # Looked up on the package: tests replace it there.
                self._model_id = _package.model_sha256(path)
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
                if chat_template is not None:
                    log.warning(
                        "llamaserver model %s: chatTemplate %r is ignored; the server at the "
                        "endpoint renders chat with its own template",
                        model,
                        chat_template,
                    )
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
            self._slots = SlotTable(self._call, self.stats)
            self._props: dict[str, dict[str, Any]] = {}
            self._slot_ctx = 0
            for replica in replicas:
                props = self._probe.props(replica.url, model=model, scrub=self.client.scrub)
                self._props[replica.url] = props
                total = int(props.get("total_slots") or replica.max_concurrent)
                replica.max_concurrent = total
                replica.limiter.total_tokens = total
                settings = props.get("default_generation_settings") or {}
                self._slot_ctx = int(settings.get("n_ctx") or 0)
            first = self._props[replicas[0].url]
            # The agentos built-in the server renders with, if it is one: it gives the stops.
            self._template = builtin_of(str(first.get("chat_template") or ""))
            # A base model's turn may run on into a new turn; under the gemma template the
            # model must not open one, so its turn-opening token is banned (its text is not
            # rendered, so no stop string can catch it).
            self._banned = (
                self._probe.special_ids(replicas[0].url, "<start_of_turn>")
                if self._template == "gemma"
                else []
            )
            self._fingerprint = kv.fingerprint(
                first,
                model_id=self._model_id,
                slot_ctx=self._slot_ctx or n_ctx,
                embedded=self.server is not None,
            )
            self._conn = Conn(self._call, self.client, self._slots, self.stats, self._slot_ctx)
            if not self.kv_hibernation:
                log.warning(
                    "llamaserver model %s: no slotDir for its endpoint(s); hibernation keeps the "
                    "token history only and waking re-prefills it",
                    model,
                )
            if self.server is not None:
                self._life = ServerLife(
                    self.server,
                    model=model,
                    idle_stop_s=idle_stop_s,
                    stats=self.stats,
                    on_restart=self._after_restart,
                )
                self._life.watch()
        except BaseException:
            # Nothing else would stop the server child or close the pools of an engine
            # that never finished starting (a hash, a template or /props that failed).
            self._probe.close()
            if self.server is not None:
                self.server.stop()
            raise

    def close(self) -> None:
        """Stop the embedded server (if any) and its idle watcher; close the clients."""
        self._probe.close()
        if self._life is not None:
            self._life.close()

    async def aclose(self) -> None:
        """Close the connection pool and stop the embedded server (off the event loop:
        a server takes up to seconds to stop)."""
        await self.client.aclose()
        await anyio.to_thread.run_sync(self.close)

    # ------------------------------------------------------------------ idle stop

    @property
    def server_running(self) -> bool:
        """Whether the embedded server is up (False when stopped for idleness, or for a
        server at an endpoint, which this engine does not run)."""
        return self._life is not None and self._life.running

    @property
    def _watcher(self) -> threading.Thread | None:
        return self._life.watcher if self._life is not None else None

    @property
    def _sessions(self) -> dict[str, Session]:
        return self._slots.sessions

    @asynccontextmanager
    async def _call(
        self,
        session_id: str,
        method: str,
        path: str,
        body: Mapping[str, Any],
        *,
        pinned: Replica,
        stream: bool = False,
    ) -> AsyncIterator[tuple[Replica, httpx.Response]]:
        """:meth:`RemoteClient.call`, with the embedded server started first if it was
        stopped, and counted as in flight so the idle watcher leaves it running."""
        life = self._life
        if life is not None:
            await life.awake()
        try:
            async with self.client.call(
                session_id, method, path, body, pinned=pinned, stream=stream
            ) as got:
                yield got
        finally:
            if life is not None:
                life.release()

    def _after_restart(self, server: EmbeddedServer) -> None:
        """A new server process: empty slots, perhaps a new port."""
        self.stats.restarts += 1
        replica = self.client.replicas[0]
        if replica.url != server.url:
            self._props[server.url] = self._props.pop(replica.url)
            replica.url = server.url
        replica.ok()
        self._slots.restarted()

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
        """Tokens ``text`` encodes to: exact off the event loop, else cached or estimated
        (see :meth:`SyncProbe.count_tokens`)."""
        return self._probe.count_tokens(self.client.replicas[0].url, text)

    # ------------------------------------------------------------------ sessions

    def open_session(self, session_id: str) -> None:
        self._slots.open(session_id, self.client.order(session_id), self.slots)

    def close_session(self, session_id: str) -> None:
        self._slots.close(session_id)

    def has_session(self, session_id: str) -> bool:
        return session_id in self._sessions

    def session_info(self, session_id: str) -> SessionInfo:
        s = self._slots.get(session_id)
        return SessionInfo(session_id, s.chat.n_tokens if s.chat else len(s.tokens), 0)

    def conversation(self, session_id: str) -> list[dict[str, Any]]:
        """The session's chat messages so far (copies); empty for a text session."""
        chat = self._slots.get(session_id).chat
        return [json.loads(json.dumps(m)) for m in chat.messages] if chat else []

    async def reset_session(self, session_id: str) -> None:
        await self._slots.reset(session_id, self._slots.get(session_id))

    async def export_kv(self, session_id: str) -> KVSnapshot:
        """The slot's KV (when a slot directory is shared), its token history and, for a
        chat session, the conversation (see :func:`.kv.export_kv`)."""
        # A stopped server's slots are gone, and a restarted one's are empty until used.
        down = self.server is not None and not self.server_running
        return await kv.export_kv(
            self._conn, session_id, fingerprint=self._fingerprint, server_down=down
        )

    async def import_kv(self, session_id: str, snapshot: KVSnapshot) -> bool:
        """Restore the slot from ``snapshot`` into whichever slot the session holds; a
        chat session gets its conversation back too. False when the bytes are unusable."""
        return await kv.import_kv(self._conn, session_id, snapshot, fingerprint=self._fingerprint)

    async def prefill(
        self, session_id: str, tokens: Sequence[int], conversation: bytes = b""
    ) -> float:
        """Put ``tokens`` in the session's slot (see :func:`.kv.prefill`)."""
        return await kv.prefill(self._conn, session_id, tokens, conversation)

    # ------------------------------------------------------------------ calls

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
        return await text.generate(
            self._conn,
            session_id,
            prompt,
            max_tokens=max_tokens,
            stop=stop,
            temperature=temperature,
            grammar=grammar,
            json_schema=json_schema,
        )

    def stream(
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
        return text.stream(
            self._conn,
            session_id,
            prompt,
            max_tokens=max_tokens,
            stop=stop,
            temperature=temperature,
            grammar=grammar,
            json_schema=json_schema,
        )

    async def chat(
        self,
        session_id: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[ToolSpec] = (),
        tool_choice: str = "auto",
        parallel_tool_calls: bool = True,
        response_format: Mapping[str, Any] | None = None,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
    ) -> Reply:
        """Send the conversation with ``messages`` appended to ``/v1/chat/completions``
        on the session's slot; the reply is appended too (see :func:`.chat.chat`)."""
        return await chat.chat(
            self._conn,
            session_id,
            messages,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            response_format=response_format,
            max_tokens=max_tokens,
            stop=stop,
            temperature=temperature,
            template=self._template,
            banned=self._banned,
        )

    # ------------------------------------------------------------------ status

    def describe(self) -> dict[str, Any]:
        """Replicas, health, slots held and counters, for ``describe model``."""
        return {
            "engine": self.name,
            "servedModel": self._model,
            "embedded": self.server is not None,
            "serverRunning": self.server_running if self.server is not None else None,
            "idleStop": self._life.idle_stop_s if self._life is not None else None,
            "idleStops": self.stats.idle_stops,
            "restarts": self.stats.restarts,
            "chatTemplate": self._template or "the server's own",
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


if TYPE_CHECKING:
    _protocol_check: Engine = LlamaServerEngine()
