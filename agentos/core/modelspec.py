"""The old import path of ``kind: Model``.

The Model schema moved to :mod:`agentos.core.spec.model` with the other resource
kinds; this module keeps ``from agentos.core.modelspec import ...`` working.
"""

from agentos.core.spec.model import (
    DEFAULT_IDLE_STOP_S,
    ENGINE_KINDS,
    Credentials,
    Endpoint,
    EngineKind,
    ModelApi,
    ModelPrices,
    ModelResource,
    ModelSpec,
    ModelTimeouts,
    SecretRef,
    check_http_url,
)

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
