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
engine keeps the token history only, and says so. An embedded server that has had no
call for ``idle_stop_s`` (the Model's ``idleStop``, 10 minutes by default) is stopped
by a watcher thread, and the next call starts it again and waits for it (seconds;
a start that fails is :class:`EngineUnavailable`, infrastructure, never the agent's
crash); a server that died on its own is started again the same way. The sessions
keep their token histories and conversations, so the first call after a restart
re-prefills its slot (the server's cache went with it). Every request to a server, the
engine's own synchronous ones (``/props``, ``/tokenize``) included, carries the Model's
credentials.

Chat (:meth:`LlamaServerEngine.chat`) goes to ``/v1/chat/completions`` with the
session's whole conversation, ``id_slot`` and ``cache_prompt``, so the server renders it
with its chat template and reuses the slot's cache for all but the new turns. llama.cpp
ignores ``tools`` for a template that knows none (measured on the default model, with
Jinja on), so on every model the conversation is *lowered*
(:func:`agentos.core.chat.lower_messages`): tools described in the system turn, past
calls and results as plain turns, and the reply constrained to
:func:`~agentos.core.chat.tool_call_schema` and parsed back into tool calls. The
session keeps the model's own text for the turns it generated, so the rendered prompt
is the slot's cache plus the new turns and nothing before them changes. A GGUF without
a chat template (the default Gemma 3 270M base model has none) gets one from the
Model's ``chatTemplate``, else the built-in ``gemma`` (see :func:`server_template`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import mmap
import os
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx

from agentos.core.chat import (
    TEMPLATES,
    Reply,
    TokenUsage,
    ToolCall,
    ToolSpec,
    grammar_safe,
    lower_messages,
    parse_constrained,
    template_stops,
    tool_call_schema,
)
from agentos.core.modelspec import DEFAULT_IDLE_STOP_S
from agentos.engine.base import (
    Completion,
    ContextOverflow,
    Engine,
    EngineError,
    EngineUnavailable,
    KVSnapshot,
    ModelMisconfigured,
    NoFreeSlot,
    SessionInfo,
    StreamChunk,
)
from agentos.engine.gguf import ensure_default_model, model_sha256
from agentos.engine.llamaserver_child import EmbeddedServer
from agentos.engine.remote import RemoteClient, Replica, RequestRefused, ThrottleBoard
from agentos.settings import default_home, default_llama_threads

__all__ = [
    "COMPACT_JSON",
    "DEFAULT_TEMPLATE",
    "EmbeddedServer",
    "LlamaServerEngine",
    "server_template",
]

log = logging.getLogger("agentos.engine.llamaserver")

DEFAULT_TEMPLATE = "gemma"
"""The template a GGUF without one gets when the Model names none.

``gemma`` renders turns with the Gemma vocabulary's own special tokens
(``<start_of_turn>``, ``<end_of_turn>``, an end-of-generation token), so a turn ends
where the model stops. Measured on the default Gemma 3 270M base model, 1 thread, the
same lowered tool prompt with ``tool_choice`` required and auto: 3 of 3 prompts gave a
call with the right arguments under both ``gemma`` and ``chatml``, in 107 prompt tokens
with ``gemma`` against 143 with ``chatml`` (whose markers are plain text to this
vocabulary), so ``gemma`` is the cheaper choice.
"""

# The built-in "plain" template (agentos.core.chat.render_turn) as Jinja for the server,
# which has no such built-in.
_PLAIN_JINJA = (
    "{%- for m in messages -%}{{ m['role'] }}: {{ m['content'] }}\n{% endfor -%}"
    "{%- if add_generation_prompt -%}assistant:{%- endif -%}"
)
_LLAMA_CPP_BUILTINS = ("gemma", "chatml")  # names llama.cpp knows without Jinja
_ESTIMATE_CHARS_PER_TOKEN = 4  # Gemma's 262k vocabulary on English text, roughly
_COUNT_CACHE = 1024  # exact token counts kept for count_tokens
_START_ATTEMPTS = 3  # a call starts a down embedded server at most this often


@dataclass(frozen=True, slots=True)
class ServerTemplate:
    """How the embedded server is told to render chat (``CommonParams`` fields)."""

    chat_template: str  # "" keeps the GGUF's own
    use_jinja: bool
    builtin: str | None  # the agentos built-in it is (for stop strings), if any


def server_template(choice: str | None, gguf_template: bool) -> ServerTemplate:
    """The template the embedded server gets for the Model's ``chatTemplate``.

    ``choice`` is a built-in name (``gemma``, ``chatml``, ``plain``), a path to a Jinja
    file, or None: the GGUF's own template when it has one (``gguf_template``), else
    :data:`DEFAULT_TEMPLATE`. Without Jinja llama.cpp takes its built-in names; with
    Jinja the string is the template's source (a bare name would render as that text).
    Raises :class:`EngineError` naming a Jinja file that cannot be read.
    """
    if choice is None:
        if gguf_template:
            return ServerTemplate("", True, None)
        choice = DEFAULT_TEMPLATE
    if choice in _LLAMA_CPP_BUILTINS:
        return ServerTemplate(choice, False, choice)
    if choice == "plain":
        return ServerTemplate(_PLAIN_JINJA, True, "plain")
    try:
        source = Path(choice).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EngineError(
            f"chatTemplate {choice!r} is not a built-in ({', '.join(TEMPLATES)}) and its Jinja "
            f"file cannot be read: {e}"
        ) from e
    if not source.strip():
        raise EngineError(f"chatTemplate file {choice} is empty")
    return ServerTemplate(source, True, None)


_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_has_chat_template(path: Path) -> bool:
    """Whether the GGUF's metadata holds ``tokenizer.chat_template``.

    Reads the key/value header only (the server would otherwise fall back to ChatML
    silently, and ``/props`` cannot tell that fallback from a GGUF's own template).
    Raises :class:`EngineError` for a file that is not GGUF.
    """
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _gguf_has_key(m, b"tokenizer.chat_template")
    except (OSError, ValueError, struct.error) as e:
        raise EngineError(f"cannot read the GGUF metadata of {path}: {e}") from e


def _gguf_has_key(m: mmap.mmap, wanted: bytes) -> bool:
    if m[:4] != b"GGUF":
        raise ValueError("not a GGUF file (bad magic)")
    (version,) = struct.unpack_from("<I", m, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported")
    (n_kv,) = struct.unpack_from("<Q", m, 16)
    pos = 24

    def skip_string(at: int) -> int:
        n: int = struct.unpack_from("<Q", m, at)[0]
        return at + 8 + n

    def skip_value(kind: int, at: int) -> int:
        if kind in _GGUF_SCALARS:
            return at + _GGUF_SCALARS[kind]
        if kind == _GGUF_STRING:
            return skip_string(at)
        if kind == _GGUF_ARRAY:
            inner, count = struct.unpack_from("<IQ", m, at)
            at += 12
            if inner in _GGUF_SCALARS:
                return at + _GGUF_SCALARS[inner] * int(count)
            for _ in range(count):
                at = skip_value(inner, at)
            return at
        raise ValueError(f"unknown GGUF value type {kind} at byte {at}")

    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", m, pos)
        key = m[pos + 8 : pos + 8 + n]
        pos += 8 + n
        (kind,) = struct.unpack_from("<I", m, pos)
        if key == wanted:
            return True
        pos = skip_value(kind, pos + 4)
    return False


@dataclass(slots=True)
class _Chat:
    """A session's conversation: what the agent sees and what the server is sent."""

    messages: list[dict[str, Any]] = field(default_factory=list)  # OpenAI-shaped
    # The plain turns sent to the server; the assistant turns hold the model's own text.
    lowered: list[dict[str, str]] = field(default_factory=list)
    described: list[ToolSpec] | None = None  # the tools `lowered` describes (None: empty)
    n_tokens: int = 0  # tokens in the slot after the last call, as the server counted

    def calls_so_far(self, new: Sequence[Mapping[str, Any]] = ()) -> int:
        return sum(len(m.get("tool_calls") or ()) for m in (*self.messages, *new))

    def to_json(self) -> bytes:
        tools = None
        if self.described is not None:
            tools = [
                {"name": t.name, "description": t.description, "parameters": dict(t.parameters)}
                for t in self.described
            ]
        state = {
            "format": _CHAT_FORMAT,
            "messages": self.messages,
            "lowered": self.lowered,
            "tools": tools,
        }
        return json.dumps(state, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> _Chat:
        """The state :meth:`to_json` wrote; ValueError says what is wrong with it."""
        try:
            state = json.loads(data)
        except ValueError as e:
            raise ValueError(f"conversation is not JSON: {e}") from None
        if not isinstance(state, dict) or state.get("format") != _CHAT_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"conversation format is {found!r}, expected {_CHAT_FORMAT!r}")
        messages, lowered, tools = state.get("messages"), state.get("lowered"), state.get("tools")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
        ):
            raise ValueError("conversation messages must be a list of objects with a role")
        if not isinstance(lowered, list) or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in lowered
        ):
            raise ValueError("conversation lowered turns must be {role, content} text objects")
        described: list[ToolSpec] | None = None
        if tools is not None:
            if not isinstance(tools, list) or not all(
                isinstance(t, dict)
                and isinstance(t.get("name"), str)
                and isinstance(t.get("description"), str)
                and isinstance(t.get("parameters"), dict)
                for t in tools
            ):
                raise ValueError(
                    "conversation tools must be null or a list of {name, description, parameters}"
                )
            described = [ToolSpec(t["name"], t["description"], t["parameters"]) for t in tools]
        return cls(messages, lowered, described)


_CHAT_FORMAT = "agentos.llamaserver.chat/1"


def _builtin_of(chat_template: str) -> str | None:
    """Which agentos built-in a server's ``/props`` ``chat_template`` is (None: another)."""
    if chat_template in _LLAMA_CPP_BUILTINS:
        return chat_template
    return "plain" if chat_template == _PLAIN_JINJA else None


def _estimate(text: str) -> int:
    return max(1, -(-len(text) // _ESTIMATE_CHARS_PER_TOKEN))


# llama.cpp builds its JSON grammars with llguidance, whose default lets the model
# pretty-print: the 270M model wrote a 30-token call as '{\n  "tool": ...}' where the
# compact form is 14 tokens. Decoding dominates a tool loop on a CPU, so tool calls are
# constrained compact (the option is ignored by servers built without llguidance).
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


async def _remove(path: Path) -> None:
    """Delete a slot file off the event loop, even while the caller is being cancelled."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(functools.partial(path.unlink, missing_ok=True))


def _constraint(
    tools: Sequence[ToolSpec], tool_choice: str, response_format: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """The JSON Schema the reply is constrained to, or None for free text.

    With tools, the tool-call schema (answer-only under ``none``, so the reply keeps the
    form the lowered conversation taught the model); without, the caller's
    ``response_format``.
    """
    if tools:
        return {**tool_call_schema(tools, tool_choice), "x-guidance": COMPACT_JSON}
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise EngineError("response_format json_schema needs {json_schema: {schema: {...}}}")
        return dict(schema)
    if kind == "json_object":
        return {"type": "object"}
    if kind in (None, "text"):
        return None
    raise EngineError(f"response_format type {kind!r} is not text, json_object or json_schema")


@dataclass(slots=True)
class _Session:
    replica: Replica
    slot: int
    tokens: list[int] = field(default_factory=list)  # a text session's history
    restored: int = -1  # tokens the last restore put in the slot (-1: none)
    chat: _Chat | None = None  # a chat session's conversation (None: text, or empty)
    cold: bool = False  # its slot was emptied by a server restart and not used since


@dataclass(slots=True)
class LlamaServerStats:
    """Counters tests and ``describe model`` read."""

    saves: int = 0
    restores: int = 0
    restore_failures: int = 0
    last_cache_n: int = 0  # timings.cache_n of the latest call
    last_restore_check: tuple[int, int] | None = None  # (restored, cache_n of the next call)
    idle_stops: int = 0  # times the embedded server was stopped for idleness
    restarts: int = 0  # times a call started it again


class LlamaServerEngine:
    """llama.cpp's server with slot-file KV hibernation (see the module docstring).

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
        # The embedded server's lifecycle (see the module docstring). Lock order: _life
        # (held while the server starts or stops) before _state (calls in flight).
        self._idle_stop_s = idle_stop_s
        self._life = threading.Lock()
        self._state = threading.Condition()
        self._in_flight = 0
        self._last_call = time.monotonic()
        self._running = False
        self._closing = False
        self._watcher: threading.Thread | None = None
        # Made before anything can fail, so that the cleanup below can always close it.
        self._sync = httpx.Client(
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
            timeout=httpx.Timeout(request_timeout_s, connect=connect_timeout_s),
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
            self._sessions: dict[str, _Session] = {}
            self._props: dict[str, dict[str, Any]] = {}
            self._dirty: set[tuple[str, int]] = set()  # slots closed since their last use: erase
            self._counts: OrderedDict[str, int] = OrderedDict()  # text -> exact token count
            self._slot_ctx = 0
            for replica in replicas:
                props = self._get_props(replica)
                self._props[replica.url] = props
                total = int(props.get("total_slots") or replica.max_concurrent)
                replica.max_concurrent = total
                replica.limiter.total_tokens = total
                settings = props.get("default_generation_settings") or {}
                self._slot_ctx = int(settings.get("n_ctx") or 0)
            first = self._props[replicas[0].url]
            # The agentos built-in the server renders with, if it is one: it gives the stops.
            self._template = _builtin_of(str(first.get("chat_template") or ""))
            # A base model's turn may run on into a new turn; under the gemma template the
            # model must not open one, so its turn-opening token is banned (its text is not
            # rendered, so no stop string can catch it).
            self._banned = self._special_ids("<start_of_turn>") if self._template == "gemma" else []
            self._fingerprint = self._make_fingerprint(n_ctx)
            if not self.kv_hibernation:
                log.warning(
                    "llamaserver model %s: no slotDir for its endpoint(s); hibernation keeps the "
                    "token history only and waking re-prefills it",
                    model,
                )
            if self.server is not None:
                self._running = True
                self._last_call = time.monotonic()  # its start took seconds
                if idle_stop_s is not None:
                    self._watcher = threading.Thread(
                        target=self._watch_idle, name=f"llamaserver-idle-{model}", daemon=True
                    )
                    self._watcher.start()
        except BaseException:
            # Nothing else would stop the server child or close the pools of an engine
            # that never finished starting (a hash, a template or /props that failed).
            self._sync.close()
            if self.server is not None:
                self.server.stop()
            raise

    def _get_props(self, replica: Replica) -> dict[str, Any]:
        try:
            response = self._sync.get(replica.url + "/props")
        except httpx.HTTPError as e:
            raise EngineUnavailable(
                f"llama.cpp server at {replica.url} did not answer /props: {e}"
            ) from e
        if response.status_code in (401, 403):
            # The Model's fault, not the server's: retrying will not help.
            detail = self.client.scrub(response.text)
            raise ModelMisconfigured(
                self._model,
                f"llama.cpp server at {replica.url} refused the model's credentials "
                f"(HTTP {response.status_code} on /props: {detail}); check the Model's "
                "credentials.apiKey",
            )
        try:
            response.raise_for_status()
            props = response.json()
        except (httpx.HTTPError, ValueError) as e:
            raise EngineUnavailable(
                f"llama.cpp server at {replica.url} did not answer /props: "
                f"{self.client.scrub(str(e))}"
            ) from e
        if not isinstance(props, dict):
            raise EngineUnavailable(f"llama.cpp server at {replica.url}: /props is not an object")
        return props

    def _special_ids(self, text: str) -> list[int]:
        """The id of the one special token ``text`` is, else [] (an unknown vocabulary)."""
        replica = self.client.replicas[0]
        try:
            response = self._sync.post(
                replica.url + "/tokenize",
                json={"content": text, "add_special": False, "parse_special": True},
            )
            response.raise_for_status()
            ids = [int(t) for t in response.json()["tokens"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return []
        return ids if len(ids) == 1 else []

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
        """Stop the embedded server (if any) and its idle watcher; close the clients."""
        with self._state:
            self._closing = True
            self._state.notify_all()
        if self._watcher is not None:
            self._watcher.join()
        self._sync.close()
        if self.server is not None:
            with self._life:
                self._running = False
                self.server.stop()

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
        return self.server is not None and self._running and self.server.alive

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
        await self._awake()
        try:
            async with self.client.call(
                session_id, method, path, body, pinned=pinned, stream=stream
            ) as got:
                yield got
        finally:
            self._release()

    async def _awake(self) -> None:
        """Count a call in flight, starting the embedded server first if it is down."""
        if self.server is None:
            return
        for _ in range(_START_ATTEMPTS):
            with self._state:
                if self._closing:
                    raise EngineUnavailable(f"model {self._model}: its engine is closing")
                if self._running and self.server.alive:
                    self._in_flight += 1
                    return
            await anyio.to_thread.run_sync(self._start_again)
        raise EngineUnavailable(
            f"model {self._model}: its embedded llama.cpp server exits as soon as it starts "
            f"(log: {self.server.log_path})"
        )

    def _release(self) -> None:
        if self.server is None:
            return
        with self._state:
            self._in_flight -= 1
            self._last_call = time.monotonic()
            self._state.notify_all()

    def _start_again(self) -> None:
        """Start the stopped (or dead) embedded server (blocking, seconds).

        Raises :class:`EngineUnavailable` when it does not start.
        """
        server = self.server
        assert server is not None
        with self._life:
            if self._closing or (self._running and server.alive):
                return
            why = "stopped while idle" if not self._running else "exited"
            started = time.perf_counter()
            try:
                server.start()
            except EngineError as e:
                raise EngineUnavailable(
                    f"model {self._model}: its embedded llama.cpp server ({why}) did not "
                    f"start again: {e}"
                ) from e
            self._after_restart(server)
            with self._state:
                self._running = True
                self._last_call = time.monotonic()  # a full idle period from now
                self._state.notify_all()
            log.info(
                "llamaserver model %s: embedded server started again (%s) in %.1fs",
                self._model,
                why,
                time.perf_counter() - started,
            )

    def _after_restart(self, server: EmbeddedServer) -> None:
        """A new server process: empty slots, perhaps a new port."""
        self.stats.restarts += 1
        replica = self.client.replicas[0]
        if replica.url != server.url:
            self._props[server.url] = self._props.pop(replica.url)
            replica.url = server.url
        replica.ok()
        self._dirty.clear()
        # A copy (one step under the GIL): this runs in a worker thread while the event
        # loop may open or close sessions.
        for s in list(self._sessions.values()):
            s.restored = -1  # nothing restored is in the new server's slots
            s.cold = True

    def _watch_idle(self) -> None:
        """Stop the embedded server once it has had no call for ``idle_stop_s``."""
        assert self.server is not None
        assert self._idle_stop_s is not None
        idle_s = self._idle_stop_s
        while True:
            with self._state:
                while True:
                    if self._closing:
                        return
                    if self._running and not self._in_flight:
                        left = self._last_call + idle_s - time.monotonic()
                        if left <= 0:
                            break
                        self._state.wait(left)
                    else:
                        self._state.wait()
            # _life is held while it stops: a call that comes now waits for the stop,
            # then starts the server again.
            with self._life:
                with self._state:
                    idle = self._running and not self._in_flight and not self._closing
                    if not idle or time.monotonic() < self._last_call + idle_s:
                        continue
                    self._running = False
                self.server.stop()
                self.stats.idle_stops += 1
                log.info(
                    "llamaserver model %s: embedded server stopped after %s without calls",
                    self._model,
                    f"{idle_s:g}s",
                )

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
        """Tokens ``text`` encodes to: exact off the event loop, else cached or estimated.

        The tokenizer lives in the server, so an exact count is an HTTP round trip. Called
        on the event loop (the SDK sizes a call's quota there) it must not block: it
        returns the exact count when this text was counted before, else an estimate of
        one token per 4 characters; the call's real usage settles the quota afterwards.
        From a thread (or with no loop) it asks the server, with the Model's credentials.
        """
        cached = self._counts.get(text)
        if cached is not None:
            self._counts.move_to_end(text)
            return cached
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # no loop in this thread: blocking is fine
        else:
            return _estimate(text)
        n = self._tokenize_sync(text)
        if n is None:
            return _estimate(text)
        self._counts[text] = n
        if len(self._counts) > _COUNT_CACHE:
            self._counts.popitem(last=False)
        return n

    def _tokenize_sync(self, text: str) -> int | None:
        replica = self.client.replicas[0]
        try:
            response = self._sync.post(
                replica.url + "/tokenize", json={"content": text, "add_special": False}
            )
            response.raise_for_status()
            return len(response.json()["tokens"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None  # away or refusing: the caller estimates

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
        s = self._session(session_id)
        return SessionInfo(session_id, s.chat.n_tokens if s.chat else len(s.tokens), 0)

    def conversation(self, session_id: str) -> list[dict[str, Any]]:
        """The session's chat messages so far (copies); empty for a text session."""
        chat = self._session(session_id).chat
        return [json.loads(json.dumps(m)) for m in chat.messages] if chat else []

    async def _slot_action(
        self, s: _Session, session_id: str, action: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        async with self._call(
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
        s.chat = None
        s.restored = -1
        self._dirty.add((s.replica.url, s.slot))
        await self._clean(session_id, s)

    async def export_kv(self, session_id: str) -> KVSnapshot:
        """The slot's KV (when a slot directory is shared), its token history and, for a
        chat session, the conversation (:attr:`KVSnapshot.conversation`).

        A chat session's tokens are its conversation as the server renders and
        tokenizes it: what a re-prefill sends when the KV cannot be used.
        """
        s = self._session(session_id)
        # A stopped server's slots are gone, and a restarted one's are empty until used.
        cold = s.cold or (self.server is not None and not self.server_running)
        conversation = b""
        if s.chat is not None:
            conversation = s.chat.to_json()
            tokens = tuple(await self._chat_tokens(session_id, s, s.chat.lowered))
            s.chat.n_tokens = len(tokens)  # what session_info reports is what was saved
        else:
            tokens = tuple(s.tokens)
        if not s.replica.slot_dir or not tokens or cold:
            # A cold slot holds nothing of the session: its history is all there is.
            return KVSnapshot(self._fingerprint, tokens, None, conversation=conversation)
        filename = f"agentos-{uuid.uuid4().hex}.bin"
        path = Path(s.replica.slot_dir) / filename
        try:
            saved = await self._slot_action(s, session_id, "save", {"filename": filename})
            data = await anyio.to_thread.run_sync(path.read_bytes)  # tens of MB: off the loop
        except (OSError, EngineError) as e:
            log.warning("%s: slot save failed (%s); keeping the token history only", session_id, e)
            return KVSnapshot(self._fingerprint, tokens, None, conversation=conversation)
        finally:
            await _remove(path)
        self.stats.saves += 1
        n_saved = int(saved.get("n_saved", len(tokens)))
        return KVSnapshot(self._fingerprint, tokens, data, n_saved, conversation)

    async def import_kv(self, session_id: str, snapshot: KVSnapshot) -> bool:
        """Restore the slot from ``snapshot`` into whichever slot the session holds; a
        chat session gets its conversation back too. False when the bytes are unusable."""
        s = self._session(session_id)
        if snapshot.data is None or snapshot.fingerprint != self._fingerprint:
            return False
        chat = None
        if snapshot.conversation:
            try:
                chat = _Chat.from_json(snapshot.conversation)
            except ValueError as e:
                log.warning("%s: snapshot's conversation is unusable: %s", session_id, e)
                return False
        if not s.replica.slot_dir:
            return False
        filename = f"agentos-{uuid.uuid4().hex}.bin"
        path = Path(s.replica.slot_dir) / filename
        expected = snapshot.n_kv if snapshot.n_kv is not None else len(snapshot.tokens)
        data = snapshot.data
        try:
            await anyio.to_thread.run_sync(path.write_bytes, data)
            restored = await self._slot_action(s, session_id, "restore", {"filename": filename})
        except (OSError, EngineError) as e:
            log.warning("%s: slot restore refused: %s", session_id, e)
            self.stats.restore_failures += 1
            self._dirty.add((s.replica.url, s.slot))
            return False
        finally:
            await _remove(path)
        self._dirty.discard((s.replica.url, s.slot))
        s.cold = False
        n = int(restored.get("n_restored", -1))
        if n != expected:
            log.warning(
                "%s: restore put %d tokens in the slot, expected %d", session_id, n, expected
            )
            self.stats.restore_failures += 1
            self._dirty.add((s.replica.url, s.slot))
            await self._clean(session_id, s)
            return False
        if chat is not None:
            chat.n_tokens = len(snapshot.tokens)
            s.tokens, s.chat = [], chat
        else:
            s.tokens, s.chat = list(snapshot.tokens), None
        s.restored = n
        self.stats.restores += 1
        return True

    async def prefill(
        self, session_id: str, tokens: Sequence[int], conversation: bytes = b""
    ) -> float:
        """Put ``tokens`` in the session's slot; with ``conversation`` (a chat session's
        :attr:`KVSnapshot.conversation`) the session continues that chat, whose rendered
        prompt starts with those tokens. Raises :class:`EngineError` for a conversation
        it cannot read (the session is left as it was)."""
        s = self._session(session_id)
        chat = None
        if conversation:
            try:
                chat = _Chat.from_json(conversation)
            except ValueError as e:
                raise EngineError(f"{session_id}: cannot continue its conversation: {e}") from e
        await self._clean(session_id, s)
        started = time.perf_counter()
        if tokens:
            body = {"prompt": list(tokens), "n_predict": 0, "id_slot": s.slot, "cache_prompt": True}
            async with self._call(session_id, "POST", "/completion", body, pinned=s.replica):
                pass
        if chat is not None:
            chat.n_tokens = len(tokens)
            s.tokens, s.chat = [], chat
        else:
            s.tokens, s.chat = list(tokens), None
        s.cold = False
        return time.perf_counter() - started

    # ------------------------------------------------------------------ calls

    async def _tokenize(self, session_id: str, s: _Session, text: str) -> list[int]:
        body = {"content": text, "add_special": not s.tokens}
        async with self._call(session_id, "POST", "/tokenize", body, pinned=s.replica) as (
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
        if s.chat is not None:
            raise EngineError(
                f"session {session_id!r} holds a chat conversation; text calls (generate, "
                "stream) need a reset session"
            )
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
            body["json_schema"] = grammar_safe(json_schema)  # the server builds a grammar too
        return s, new, body

    def _finish(
        self, s: _Session, new: list[int], out: Sequence[int], timings: Mapping[str, Any]
    ) -> tuple[int, int]:
        cache_n = int(timings.get("cache_n") or 0)
        prompt_n = int(timings.get("prompt_n") or 0)
        s.tokens.extend(new)
        s.tokens.extend(out)
        self._count(s, prompt_n, cache_n, len(out))
        return prompt_n, cache_n

    def _count(self, s: _Session, prompt_n: int, cache_n: int, output_n: int) -> None:
        s.cold = False
        self.stats.last_cache_n = cache_n
        if s.restored >= 0:
            self.stats.last_restore_check = (s.restored, cache_n)
            if cache_n + 8 < s.restored:
                log.warning("restored %d tokens but the server reused %d", s.restored, cache_n)
            s.restored = -1
        s.replica.stats.prompt_tokens += prompt_n + cache_n
        s.replica.stats.cached_tokens += cache_n
        s.replica.stats.output_tokens += output_n

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
        async with self._call(session_id, "POST", "/completion", body, pinned=s.replica) as (
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
        async with self._call(
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

    # ------------------------------------------------------------------ chat

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
        on the session's slot; the reply is appended too (see the module docstring).

        With ``tools`` the reply is constrained to one call (``call_{n}``, ``n`` counting
        the conversation's calls) or, unless ``tool_choice`` is ``required`` or names a
        tool, an answer: a local base model makes one call per reply, so
        ``parallel_tool_calls`` changes nothing. Without tools ``response_format``
        (``json_schema``, ``json_object``) constrains the text. Usage is the server's:
        input = ``timings.prompt_n``, cached = ``timings.cache_n``, output =
        ``timings.predicted_n``. Raises :class:`ContextOverflow` when the conversation no
        longer fits the slot and :class:`EngineError` as :meth:`generate` does; on any
        failure the conversation is left as it was.
        """
        started = time.perf_counter()
        s = self._session(session_id)
        if s.tokens and s.chat is None:
            raise EngineError(
                f"session {session_id!r} holds a text context (generate, stream); chat needs "
                "a reset session"
            )
        schema = _constraint(tools, tool_choice, response_format)
        chat = s.chat or _Chat()
        new = [dict(m) for m in messages]
        turns = lower_messages(new, tools, described=chat.described)
        body: dict[str, Any] = {
            "messages": [*chat.lowered, *turns],
            "id_slot": s.slot,
            "cache_prompt": True,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        stops = [*stop, *(template_stops(self._template) if self._template else ())]
        if stops:
            body["stop"] = stops
        if schema is not None:
            body["json_schema"] = schema
        if self._banned:
            body["logit_bias"] = [[t, False] for t in self._banned]
        await self._clean(session_id, s)
        try:
            async with self._call(
                session_id, "POST", "/v1/chat/completions", body, pinned=s.replica
            ) as (replica, response):
                data = response.json()
        except RequestRefused as e:
            if e.status == 400 and "exceed_context_size" in e.detail:
                raise ContextOverflow(
                    f"session {session_id!r}: the conversation and {max_tokens} new tokens "
                    f"exceed the slot's context ({e.detail})"
                ) from e
            raise
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            ended = str(choice.get("finish_reason") or "stop")
            timings = data.get("timings") or {}
            prompt_n = int(timings.get("prompt_n") or 0)
            cache_n = int(timings.get("cache_n") or 0)
            output_n = int(
                timings.get("predicted_n")
                or (data.get("usage") or {}).get("completion_tokens")
                or 0
            )
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise self.client.garbage(replica, f"/v1/chat/completions without a choice: {e}") from e
        if not isinstance(text, str):
            raise self.client.garbage(replica, "/v1/chat/completions content is not text")
        calls: tuple[ToolCall, ...] = ()
        content: str | None = text
        if tools:
            content, calls = parse_constrained(text, f"call_{chat.calls_so_far(new)}")
        reason = "tool_calls" if calls else "length" if ended == "length" else "stop"
        reply = Reply(
            content,
            calls,
            reason,
            TokenUsage(prompt_n, cache_n, output_n),
            time_to_first_token_s=float(timings.get("prompt_ms") or 0.0) / 1000,
            duration_s=time.perf_counter() - started,
        )
        chat.messages.extend(new)
        chat.messages.append(reply.message())
        # The model's own text, not a re-lowering of the reply: the slot holds its tokens.
        chat.lowered.extend(turns)
        chat.lowered.append({"role": "assistant", "content": text})
        if tools:
            chat.described = list(tools)
        elif chat.described is None:
            chat.described = []
        chat.n_tokens = prompt_n + cache_n + output_n
        s.chat = chat
        self._count(s, prompt_n, cache_n, output_n)
        return reply

    async def _chat_tokens(
        self, session_id: str, s: _Session, lowered: Sequence[Mapping[str, str]]
    ) -> list[int]:
        """The conversation as the server renders and tokenizes it (for a re-prefill)."""
        if not lowered:
            return []
        body: dict[str, Any] = {"messages": list(lowered)}
        async with self._call(session_id, "POST", "/apply-template", body, pinned=s.replica) as (
            replica,
            response,
        ):
            prompt = response.json().get("prompt")
        if not isinstance(prompt, str):
            raise self.client.garbage(replica, "/apply-template without a prompt")
        body = {"content": prompt, "add_special": True, "parse_special": True}
        async with self._call(session_id, "POST", "/tokenize", body, pinned=s.replica) as (
            replica,
            response,
        ):
            try:
                return [int(t) for t in response.json()["tokens"]]
            except (KeyError, TypeError, ValueError) as e:
                raise self.client.garbage(replica, "/tokenize without tokens") from e

    # ------------------------------------------------------------------ status

    def describe(self) -> dict[str, Any]:
        """Replicas, health, slots held and counters, for ``describe model``."""
        return {
            "engine": self.name,
            "servedModel": self._model,
            "embedded": self.server is not None,
            "serverRunning": self.server_running if self.server is not None else None,
            "idleStop": self._idle_stop_s if self.server is not None else None,
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
