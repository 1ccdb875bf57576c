"""The ``openai`` engine: any OpenAI-compatible server (vLLM, SGLang, llama-server, Ollama, APIs).

A session is a conversation held here, in the daemon: the OpenAI-shaped messages
(``chat`` API: ``system``, ``user``, ``assistant`` with ``tool_calls``, ``tool`` with
``tool_call_id``) or the text so far (``completions`` API). Every call sends the whole
conversation as separate messages and only ever appends to it, and the agent's calls
stay on one replica, so a server with a prefix cache (vLLM's, SGLang's radix cache,
llama-server's slots) reprocesses only the new part. Tools, ``tool_choice``,
``parallel_tool_calls`` and ``response_format`` go to the server as they are: tool
calling is the server's own here (a local base model gets it from the ``llama`` and
``llamaserver`` engines instead).

Calls stream (``stream_options.include_usage``), so the time to the first token is
real, and are metered from the server's own ``usage`` (input = prompt tokens it
processed, cached = those it reused from its prefix cache, output = generated); the
counts are tokens as the server counted them, never characters.

Such a server gives no call to export one conversation's KV, so hibernation keeps the
conversation only: :meth:`OpenAIEngine.export_kv` returns no bytes and the messages as
the snapshot's ``conversation`` JSON, and waking resends them with the next call.
Connection failures, 5xx and garbage answers are retried on other replicas and then
raised as :class:`agentos.engine.EngineUnavailable`, never as an agent's own error; a
4xx is the request's fault (:class:`agentos.engine.remote.RequestRefused`), and one for
a request with tools says that the model refused tools.

The package, by job: :mod:`.engine` (the calls and the sessions) and :mod:`.wire`
(what the server sends back, and how it says no).
"""

from __future__ import annotations

from agentos.engine.openai.engine import OpenAIEngine

__all__ = ["OpenAIEngine"]
