"""From a declared ``kind: Model`` to a running engine, with its credentials read at connect time.

A Model resource is data in Redis; the daemon turns each one its agents name into an
engine here. Credentials are references (``{env: VAR}`` or ``{file: PATH}``) resolved
only now, in the daemon's process, and handed to the HTTP client; they are never
logged, stored or put in an error message (a missing variable is named, its value
never is). An engine that cannot start because of its Model (a credential that does
not resolve, a key the server refuses, an unwritable home) raises
:class:`ModelMisconfigured` with the reason scrubbed of the credential, so the runtime
parks its agents' work and shows why; :func:`credential_digest` lets the daemon notice
that the credential's file or variable changed without keeping the secret around.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentos.core.modelspec import ModelResource, SecretRef
from agentos.engine import create_engine
from agentos.engine.base import Engine, EngineError, EngineUnavailable, ModelMisconfigured
from agentos.settings import SecretUnreadable, read_secret

if TYPE_CHECKING:  # the HTTP client is imported only by the engines that use it
    from agentos.engine.remote import ThrottleBoard


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` without ``secrets`` or control characters (remote.scrub, imported late:
    it pulls in httpx, which a local-only daemon never needs)."""
    from agentos.engine.remote import scrub as remote_scrub

    return remote_scrub(text, secrets)


__all__ = ["build_engine", "credential_digest", "engine_options", "resolve_secret"]


def resolve_secret(ref: SecretRef) -> str:
    """The secret ``ref`` points at. Raises :class:`EngineError` naming the reference only."""
    try:
        return read_secret(ref.env, ref.file)
    except SecretUnreadable as e:
        raise EngineError(f"the model's apiKey: {e}") from None


def _api_key(resource: ModelResource) -> str | None:
    credentials = resource.spec.credentials
    if credentials is None or credentials.api_key is None:
        return None
    return resolve_secret(credentials.api_key)


def credential_digest(resource: ModelResource) -> str:
    """A digest of what ``resource``'s credential resolves to now (blocking: reads a file).

    Equal digests mean the same secret (or the same reason it does not resolve); the
    secret itself is never kept.
    """
    try:
        key = _api_key(resource)
    except EngineError as e:
        return f"unresolved: {e}"
    if key is None:
        return "none"
    return hashlib.sha256(key.encode()).hexdigest()


def engine_options(
    resource: ModelResource, *, home: Path | None = None, board: ThrottleBoard | None = None
) -> tuple[str, dict[str, Any]]:
    """The backend name and keyword options that build ``resource``'s engine."""
    spec = resource.spec
    name = resource.metadata.name
    options: dict[str, Any] = {}
    endpoints = [
        {"url": e.url, "max_concurrent": e.max_concurrent, "slot_dir": e.slot_dir}
        for e in spec.endpoints
    ]
    api_key = _api_key(resource)
    timeouts = {
        "connect_timeout_s": spec.timeouts.connect,
        "request_timeout_s": spec.timeouts.request,
        "throttle_wait_s": spec.timeouts.throttle_wait,
    }
    if spec.engine == "openai":
        options = {
            "model": spec.served_model or name,
            "endpoints": endpoints,
            "api": spec.resolved_api,
            "api_key": api_key,
            "context_length": spec.context_length,
            "throttle_board": board,
            **timeouts,
        }
    elif spec.engine == "llamaserver":
        options = {
            "model": spec.served_model or name,
            "endpoints": endpoints,
            "home": home,
            "api_key": api_key,
            "throttle_board": board,
            **timeouts,
        }
        if spec.model_path is not None:
            options["model_path"] = spec.model_path
        if spec.slots is not None:
            options["slots"] = spec.slots
        if spec.context_length is not None:
            options["n_ctx"] = spec.context_length * (spec.slots or 2)
        if spec.chat_template is not None:
            options["chat_template"] = spec.chat_template
        if not spec.endpoints:
            options["idle_stop_s"] = spec.idle_stop_s
            if spec.threads is not None:
                options["n_threads"] = spec.threads
    elif spec.engine == "llama":
        options = {"home": home}
        if spec.model_path is not None:
            options["model_path"] = spec.model_path
        if spec.slots is not None:
            options["slots"] = spec.slots
        if spec.context_length is not None:
            options["n_ctx"] = spec.context_length
        if spec.chat_template is not None:
            options["chat_template"] = spec.chat_template
        if spec.threads is not None:
            options["n_threads"] = spec.threads
    else:  # sim
        options = {"model": spec.served_model or name}
        if spec.slots is not None:
            options["slots"] = spec.slots
    return spec.engine, options


def build_engine(
    resource: ModelResource, *, home: Path | None = None, board: ThrottleBoard | None = None
) -> Engine:
    """Start the engine for ``resource`` (blocking: an embedded server takes seconds).

    Raises :class:`EngineUnavailable` when its server does not answer now (worth trying
    again), :class:`ModelMisconfigured` when the Model must be fixed first: a credential
    that does not resolve, a key the server refuses, a missing dependency, a bad option
    or a home it cannot write. Every message is scrubbed of the credential.
    """
    name = resource.metadata.name
    try:
        backend, options = engine_options(resource, home=home, board=board)
    except EngineError as e:
        raise ModelMisconfigured(name, str(e)) from e
    key = options.get("api_key")
    secrets = (key,) if isinstance(key, str) else ()
    try:
        return create_engine(backend, **options)
    except ModelMisconfigured:
        raise  # already says what and is scrubbed
    except EngineUnavailable as e:
        raise EngineUnavailable(f"model {name}: {scrub(str(e), secrets)}") from e
    except (EngineError, OSError, ImportError, ValueError) as e:
        raise ModelMisconfigured(
            name, f"its engine cannot start: {type(e).__name__}: {scrub(str(e), secrets)}"
        ) from e
