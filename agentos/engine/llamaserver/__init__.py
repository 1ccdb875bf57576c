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
child process on loopback (:mod:`agentos.engine.llamaserver_child`; slot files under
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

The package, by job: :mod:`.engine` (the Engine calls), :mod:`.text` and :mod:`.chat`
(the two kinds of call), :mod:`.slots` and :mod:`.kv` (slots, their files and
hibernation), :mod:`.lifecycle` (the embedded server's idle stop), :mod:`.probe` (the
engine's own synchronous requests), :mod:`.template` (which template the embedded
server gets) and :mod:`.state` (sessions, counters, chat state).
"""

from __future__ import annotations

from agentos.engine.gguf import gguf_has_chat_template, model_sha256
from agentos.engine.llamaserver.chat import COMPACT_JSON
from agentos.engine.llamaserver.engine import LlamaServerEngine
from agentos.engine.llamaserver.state import LlamaServerStats
from agentos.engine.llamaserver.template import DEFAULT_TEMPLATE, ServerTemplate, server_template
from agentos.engine.llamaserver_child import EmbeddedServer

__all__ = [
    "COMPACT_JSON",
    "DEFAULT_TEMPLATE",
    "EmbeddedServer",
    "LlamaServerEngine",
    "LlamaServerStats",
    "ServerTemplate",
    "gguf_has_chat_template",
    "model_sha256",
    "server_template",
]
