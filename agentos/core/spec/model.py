"""``kind: Model``: an inference model the fleet declares and the daemon routes agents to.

A fleet mixes a small local model with larger remote ones; each is declared once, with
where it is served (endpoints, the replicas), what it costs (prices per 1k tokens), how
long to wait for it (timeouts) and what to use when it is down (``fallback``); a local
engine also says how many llama.cpp threads it runs (``threads``) and an embedded
server how long it may sit idle before it is stopped (``idleStop``). An
agent names one in ``spec.model``. Credentials are references only (an environment
variable or a file the daemon reads when it connects): a spec is stored in Redis and
printed by ``get -o yaml``, so a secret written inline is refused at apply rather than
kept. Pure: validation only, no I/O.
"""

import re
from collections.abc import Mapping
from typing import Any, Literal, Self
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field, field_validator, model_validator

from agentos.core.chat import TEMPLATES
from agentos.core.durations import Duration, PositiveDuration
from agentos.core.spec.route import ModelCapabilities, ModelPlacement, ModelPrices, Tier
from agentos.core.specbase import API_VERSION, Metadata, Name, _error, _errors, _Model, _SubPath

__all__ = [
    "DEFAULT_IDLE_STOP_S",
    "ENGINE_KINDS",
    "Credentials",
    "Endpoint",
    "EngineKind",
    "ModelApi",
    "ModelPrices",
    "ModelResource",
    "ModelSpec",
    "ModelTimeouts",
    "SecretRef",
    "check_http_url",
]

EngineKind = Literal["llama", "llamaserver", "openai", "sim"]
ENGINE_KINDS: tuple[str, ...] = ("llama", "llamaserver", "openai", "sim")
ModelApi = Literal["chat", "completions"]
DEFAULT_IDLE_STOP_S = 600.0
"""How long an embedded llamaserver sits without calls before it is stopped (``idleStop``)."""

_SECRET_QUERY = re.compile(r"(key|token|secret|password|passwd|auth|signature)", re.IGNORECASE)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_http_url(value: str, by_reference: str) -> str:
    """``value`` without a trailing ``/`` if it is an http(s) URL that carries no secret;
    else ValueError saying how to give the credential instead (``by_reference``)."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL; got {value!r}")
    if parts.password is not None or parts.username is not None:
        raise ValueError(
            f"the URL carries a user or password; give credentials by reference ({by_reference})"
        )
    for key, _ in parse_qsl(parts.query, keep_blank_values=True):
        if _SECRET_QUERY.search(key):
            raise ValueError(
                f"the URL's query parameter {key!r} looks like a secret; give credentials "
                f"by reference ({by_reference})"
            )
    return value.rstrip("/")


class SecretRef(_Model):
    """Where a secret is read from when the daemon connects: ``env`` or ``file``, one of them."""

    env: str | None = None
    file: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _a_reference(cls, data: Any) -> Any:
        if isinstance(data, str | int | float):
            raise _error(
                "credentials are given by reference only: {env: VARIABLE} or {file: PATH} "
                "(a secret written inline would be stored in Redis and printed by get -o yaml)"
            )
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.env is None) == (self.file is None):
            raise _error("needs exactly one of: env, file")
        if self.env is not None and not _ENV_NAME.fullmatch(self.env):
            raise _error(f"not an environment variable name: {self.env!r}", "env")
        return self


class Credentials(_Model):
    """Credentials of a model's server, by reference."""

    api_key: SecretRef | None = None


class Endpoint(_Model):
    """One replica of a served model."""

    url: str
    max_concurrent: int = Field(default=4, ge=1, strict=True)
    # Where this server's slot files appear on the daemon's disk (llamaserver with an
    # endpoint): without one, KV cannot move and hibernation keeps the history only.
    slot_dir: str | None = None

    @field_validator("url")
    @classmethod
    def _plain_http_url(cls, value: str) -> str:
        return check_http_url(value, "credentials.apiKey: {env: VARIABLE}")


class ModelTimeouts(_Model):
    """How long calls to the model may take."""

    connect: PositiveDuration = 5.0
    request: PositiveDuration = 120.0
    # A throttled model (429/503 with Retry-After) is waited for up to this long within a
    # call; beyond it the call fails over (fallback) or the task is retried later.
    throttle_wait: Duration = 10.0


class ModelSpec(_Model):
    """The desired state of one model."""

    engine: EngineKind
    served_model: str | None = Field(default=None, min_length=1)  # the name sent to the server
    endpoints: tuple[Endpoint, ...] = ()
    api: ModelApi | None = None  # openai: chat (default) or completions
    credentials: Credentials | None = None
    context_length: int | None = Field(default=None, gt=0, strict=True)
    slots: int | None = Field(default=None, ge=1, strict=True)  # llama, embedded llamaserver
    model_path: str | None = None  # a GGUF file (llama, embedded llamaserver)
    # How chat turns are rendered on a local engine: a built-in template (gemma, chatml,
    # plain) or a Jinja file; None: the GGUF's own template, else plain.
    chat_template: str | None = Field(default=None, min_length=1)
    # llama.cpp threads (llama, embedded llamaserver); None: from the CPUs the daemon may
    # use (agentos.settings.default_llama_threads).
    threads: int | None = Field(default=None, ge=1, strict=True)
    # An embedded llamaserver with no call for this long is stopped, and started again by
    # the next call; None: DEFAULT_IDLE_STOP_S.
    idle_stop: PositiveDuration | None = None
    timeouts: ModelTimeouts = Field(default_factory=ModelTimeouts)
    prices: ModelPrices = Field(default_factory=ModelPrices)
    fallback: Name | None = None
    # Where it runs and how far data sent to it may go; what it can do (routes filter
    # on both). Left out of the canonical form unless given.
    placement: ModelPlacement | None = None
    capabilities: ModelCapabilities | None = None

    @model_validator(mode="after")
    def _fits_engine(self) -> Self:
        issues: list[tuple[_SubPath, str]] = []
        if self.engine == "openai" and not self.endpoints:
            issues.append((("endpoints",), "an openai model needs at least one endpoint (url)"))
        if self.engine in ("llama", "sim"):
            for key, value in (
                ("endpoints", self.endpoints),
                ("credentials", self.credentials),
                ("api", self.api),
            ):
                if value:
                    issues.append(((key,), f"a {self.engine} model runs in the daemon; no {key}"))
        if self.engine == "openai":
            for key, local in (("slots", self.slots), ("modelPath", self.model_path)):
                if local is not None:
                    issues.append(((key,), f"only local engines take {key}, not openai"))
        if self.engine == "llamaserver" and self.endpoints and self.model_path is not None:
            issues.append(
                (("modelPath",), "the server at the endpoint loads its own model; no modelPath")
            )
        embedded = self.engine == "llama" or (self.engine == "llamaserver" and not self.endpoints)
        if self.threads is not None and not embedded:
            issues.append(
                (
                    ("threads",),
                    "only a model the daemon runs (llama, llamaserver without endpoints) "
                    f"takes threads; not {self._where()}",
                )
            )
        if self.idle_stop is not None and (self.engine != "llamaserver" or self.endpoints):
            issues.append(
                (
                    ("idleStop",),
                    "only an embedded llamaserver (no endpoints) is stopped when idle; "
                    f"not {self._where()}",
                )
            )
        if self.chat_template is not None and self.engine not in ("llama", "llamaserver"):
            issues.append(
                (("chatTemplate",), f"only llama and llamaserver render chat; not {self.engine}")
            )
        elif (
            self.chat_template is not None
            and self.chat_template not in TEMPLATES
            and not self.chat_template.endswith((".jinja", ".j2", ".jinja2"))
        ):
            issues.append(
                (
                    ("chatTemplate",),
                    f"expected one of {', '.join(TEMPLATES)} or a Jinja file "
                    f"(.jinja, .j2); got {self.chat_template!r}",
                )
            )
        for index, endpoint in enumerate(self.endpoints):
            if endpoint.slot_dir is not None and self.engine != "llamaserver":
                issues.append(
                    (("endpoints", index, "slotDir"), "only llamaserver endpoints take slotDir")
                )
        if issues:
            raise _errors(issues)
        return self

    def _where(self) -> str:
        if self.engine == "llamaserver" and self.endpoints:
            return "a llamaserver with endpoints"
        return f"engine {self.engine}"

    @property
    def runs_in_daemon(self) -> bool:
        """Whether the daemon runs the model itself (llama, sim, an embedded llamaserver)."""
        return self.engine in ("llama", "sim") or (
            self.engine == "llamaserver" and not self.endpoints
        )

    @property
    def tier(self) -> Tier:
        """``placement.tier``, or ``local`` for a model the daemon runs, else ``hosted``."""
        if self.placement is not None and self.placement.tier is not None:
            return self.placement.tier
        return "local" if self.runs_in_daemon else "hosted"

    @property
    def data_boundary(self) -> str:
        """``placement.dataBoundary``, or by tier: local ``host``, regional ``site``,
        hosted ``any``."""
        if self.placement is not None and self.placement.data_boundary is not None:
            return self.placement.data_boundary
        return {"local": "host", "regional": "site", "hosted": "any"}[self.tier]

    @property
    def tools_capable(self) -> bool:
        """Whether calls that offer tools may go to this model."""
        return self.capabilities is None or self.capabilities.tools

    @property
    def max_context(self) -> int | None:
        """The context length calls must fit (capabilities, else contextLength)."""
        if self.capabilities is not None and self.capabilities.context_length is not None:
            return self.capabilities.context_length
        return self.context_length

    @property
    def idle_stop_s(self) -> float:
        """Seconds an embedded server may sit without calls before it is stopped."""
        return DEFAULT_IDLE_STOP_S if self.idle_stop is None else self.idle_stop

    @property
    def resolved_api(self) -> ModelApi:
        """The API the engine speaks: ``completions`` for llama.cpp servers, else as given."""
        if self.api is not None:
            return self.api
        return "chat" if self.engine == "openai" else "completions"


class ModelResource(_Model):
    """``kind: Model``."""

    api_version: Literal["agentos/v1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["Model"] = "Model"
    metadata: Metadata
    spec: ModelSpec

    @model_validator(mode="before")
    @classmethod
    def _not_reserved(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            meta = data.get("metadata")
            if isinstance(meta, Mapping) and meta.get("name") == "default":
                raise _error(
                    '"default" is the daemon\'s own engine (--engine); name the model otherwise',
                    "metadata",
                    "name",
                )
        return data

    @model_validator(mode="after")
    def _no_self_fallback(self) -> Self:
        if self.spec.fallback == self.metadata.name:
            raise _error("a model cannot be its own fallback", "spec", "fallback")
        return self
