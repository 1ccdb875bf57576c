"""``kind: ToolServer``: an MCP server whose tools agents may use, and who must approve them.

Tools reach an always-on agent from MCP servers: a child process spoken to over stdio,
or a URL spoken to over Streamable HTTP. A ToolServer declares one (exactly one of
``stdio`` and ``url``), which of its tools agents see (``tools.allow`` / ``deny``, names
or globs), how long to wait for it (``timeouts``) and which calls wait for a person
(``approval``). An agent names the servers it may use in ``spec.tools.servers`` and may
add to the approval list.

Secrets are references only, as for Models: a header that looks like a credential
(``Authorization``, ``*-Key``, ``*Token*``, ``Cookie``) takes ``{env: VAR}`` or ``{file:
PATH}``, never a literal, because a spec is stored in Redis and printed by ``get -o
yaml``; a URL carrying a user or password is refused. The environment of a stdio server
may hold literals (it is the operator's own command line) or references. Pure:
validation and name matching only, no I/O.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from agentos.core.durations import PositiveDuration
from agentos.core.spec.model import SecretRef, check_http_url
from agentos.core.specbase import API_VERSION, Metadata, Name, _error, _Model

__all__ = [
    "AgentApproval",
    "AgentTools",
    "StdioServer",
    "ToolApproval",
    "ToolFilter",
    "ToolServerResource",
    "ToolServerSpec",
    "ToolServerTimeouts",
    "matches",
    "model_tool_name",
    "qualified",
    "unreachable_approvals",
]

_SECRET_HEADER = re.compile(r"(authorization|cookie|key|token|secret|password|passwd|auth)", re.I)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MODEL_NAME_BAD = re.compile(r"[^A-Za-z0-9_-]")
PYTHON = "python"
"""``stdio.command[0]`` that means the daemon's own interpreter (its virtual environment)."""


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` is one of ``patterns`` (exact names or shell globs: ``*``, ``?``)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def qualified(server: str, tool: str) -> str:
    """The name agent code uses for a server's tool: ``SERVER.TOOL``."""
    return f"{server}.{tool}"


def model_tool_name(server: str, tool: str) -> str:
    """The name the model sees for ``SERVER.TOOL``: ``SERVER__TOOL`` with every character
    a function name may not hold made ``_``, and cut to 64 with a hash when longer."""
    name = _MODEL_NAME_BAD.sub("_", f"{server}__{tool}")
    if len(name) <= 64:
        return name
    digest = hashlib.blake2b(f"{server}.{tool}".encode(), digest_size=4).hexdigest()
    return f"{name[:55]}_{digest}"


class StdioServer(_Model):
    """A server run as a child process of the daemon, spoken to over its stdin/stdout."""

    command: tuple[str, ...] = Field(min_length=1)
    env: dict[str, str | SecretRef] = Field(default_factory=dict)
    cwd: str | None = Field(default=None, min_length=1)

    @field_validator("command")
    @classmethod
    def _words(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not word or "\0" in word for word in value):
            raise ValueError("every word of the command is a non-empty string without NUL")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str | SecretRef]) -> dict[str, str | SecretRef]:
        for name in value:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"not an environment variable name: {name!r}")
        return value


class ToolFilter(_Model):
    """Which of the server's tools agents see: ``allow`` (empty: all), minus ``deny``.
    ``idempotent`` names tools that may safely run again for the same call (added to
    those the server marks ``idempotentHint``)."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    idempotent: tuple[str, ...] = ()

    def admits(self, tool: str) -> bool:
        """Whether agents may see and call ``tool`` (its name on the server)."""
        return (not self.allow or matches(tool, self.allow)) and not matches(tool, self.deny)


class ToolServerTimeouts(_Model):
    """How long to wait for the server: to start and list its tools, and per call."""

    connect: PositiveDuration = 10.0
    call: PositiveDuration = 60.0


class ToolApproval(_Model):
    """Calls that wait for a person's yes or no, and what a wait with no answer becomes."""

    required: tuple[str, ...] = ()
    timeout: PositiveDuration = 3600.0
    on_timeout: Literal["deny", "approve"] = "deny"


class ToolServerSpec(_Model):
    """The desired state of one tool server."""

    stdio: StdioServer | None = None
    url: str | None = None
    headers: dict[str, str | SecretRef] = Field(default_factory=dict)
    tools: ToolFilter = Field(default_factory=ToolFilter)
    timeouts: ToolServerTimeouts = Field(default_factory=ToolServerTimeouts)
    approval: ToolApproval = Field(default_factory=ToolApproval)

    @field_validator("url")
    @classmethod
    def _plain_url(cls, value: str) -> str:
        return check_http_url(value, "headers: {Authorization: {env: VARIABLE}}")

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str | SecretRef]) -> dict[str, str | SecretRef]:
        for name, given in value.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"not an HTTP header name: {name!r}")
            if isinstance(given, str) and _SECRET_HEADER.search(name):
                raise ValueError(
                    f"header {name!r} looks like a credential: give it by reference "
                    "({env: VARIABLE} or {file: PATH}); a secret written inline would be "
                    "stored in Redis and printed by get -o yaml"
                )
            if isinstance(given, str) and ("\r" in given or "\n" in given):
                raise ValueError(f"header {name!r}: a value has no line breaks")
        return value

    @model_validator(mode="after")
    def _one_transport(self) -> Self:
        if (self.stdio is None) == (self.url is None):
            raise _error("needs exactly one of: stdio (a command) or url (Streamable HTTP)")
        if self.stdio is not None and self.headers:
            raise _error("only a url server takes headers", "headers")
        return self

    @property
    def transport(self) -> str:
        """``stdio`` or ``http``."""
        return "stdio" if self.stdio is not None else "http"

    def needs_approval(self, tool: str) -> bool:
        """Whether a call of ``tool`` (its name on the server) waits for a person."""
        return matches(tool, self.approval.required)


class ToolServerResource(_Model):
    """``kind: ToolServer``."""

    api_version: Literal["agentos/v1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["ToolServer"] = "ToolServer"
    metadata: Metadata
    spec: ToolServerSpec


class AgentApproval(_Model):
    """Tools of this agent that wait for a person, beyond what its servers require:
    ``SERVER.TOOL`` names or globs (``workspace.write_*``), or its own tools' names."""

    required: tuple[str, ...] = ()


class AgentTools(_Model):
    """``spec.tools`` of an Agent: the ToolServers it may use and its own approvals."""

    servers: tuple[Name, ...] = ()
    approval: AgentApproval = Field(default_factory=AgentApproval)

    @field_validator("servers")
    @classmethod
    def _once(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        seen = [n for i, n in enumerate(value) if n in value[:i]]
        if seen:
            raise ValueError(f"names a server twice: {seen[0]!r}")
        return value

    def needs_approval(self, name: str) -> bool:
        """Whether a call of ``name`` (``SERVER.TOOL``, or an own tool's name) waits for
        a person by this agent's list."""
        return matches(name, self.approval.required)


def unreachable_approvals(
    approvals: Iterable[str], servers: Mapping[str, ToolServerSpec]
) -> list[tuple[str, str]]:
    """Entries of an agent's approval list that can never apply: ``SERVER.TOOL`` where
    the server's filter denies that tool (or every tool the glob names). Returns
    ``(entry, why)`` pairs; entries that name no known server are left to the caller."""
    out: list[tuple[str, str]] = []
    for entry in approvals:
        server, dot, tool = entry.partition(".")
        spec = servers.get(server)
        if not dot or spec is None:
            continue
        flt = spec.tools
        if matches(tool, flt.deny) or (flt.allow and not _may_match(tool, flt.allow)):
            out.append((entry, f'tool server "{server}" does not let agents use {tool!r}'))
    return out


def _may_match(pattern: str, allow: Iterable[str]) -> bool:
    """Whether some name matched by ``pattern`` could be allowed (a literal name must be;
    a glob is given the benefit of the doubt unless no allowed literal fits it)."""
    if not any(c in pattern for c in "*?["):
        return matches(pattern, allow)
    return any(any(c in a for c in "*?[") or fnmatch.fnmatchcase(a, pattern) for a in allow)
