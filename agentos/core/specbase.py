"""The pieces every resource kind shares: names, metadata, time zones, the model base and
issue paths.

The resource kinds live in the :mod:`agentos.core.spec` package (agents, quota
policies, models, tool servers), task limits in :mod:`agentos.core.limits`; all build on
these, and the loader (``spec.loader``) reads the issues raised here (``_errors``) to
point at exact sub-paths. Pure: no I/O.
"""

import json
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Final, TypeAlias
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

__all__ = ["API_VERSION", "NAME_PATTERN", "Metadata", "Name", "TimeZoneName"]

API_VERSION: Final = "agentos/v1"

NAME_PATTERN: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
"""Names of resources, quota classes and rules: lowercase DNS labels, 1-63 characters.

They end up inside Redis hash tags (``{agent-name}``), so braces must never get in."""

_NAME_RE = re.compile(NAME_PATTERN)

# Errors raised by our own validators carry the precise sub-paths they are about in their
# context, so that the loader can point at ``spec.rules[2].then.class`` even though the
# check had to run on the whole policy. Several issues can travel in one error because a
# validator can raise only once, and the loader must still report all of them.
_ERROR_TYPE: Final = "agentos_spec"
_ISSUES_KEY: Final = "agentos_issues"

_SubPath: TypeAlias = tuple[str | int, ...]


def _errors(issues: Sequence[tuple[_SubPath, str]]) -> PydanticCustomError:
    message = "; ".join((f"{_render_path(sub)}: {text}" if sub else text) for sub, text in issues)
    return PydanticCustomError(_ERROR_TYPE, message, {_ISSUES_KEY: list(issues)})


def _error(message: str, *subpath: str | int) -> PydanticCustomError:
    return _errors([(subpath, message)])


def _show(value: object) -> str:
    """Render an input value the way it would look in YAML, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def _render_path(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            # pydantic's marker for "the key itself was invalid": the key is already
            # the last part of the path, which is what a reader wants to see.
            continue
        else:
            out += f".{part}" if out else part
    return out


# --------------------------------------------------------------------------- field types


def _check_name(value: str) -> str:
    if len(value) > 63 or not _NAME_RE.fullmatch(value):
        raise ValueError(
            "expected a lowercase DNS label (1-63 characters of a-z, 0-9 and '-', starting "
            f"and ending with a letter or digit); got {_show(value)}"
        )
    return value


Name = Annotated[
    str,
    AfterValidator(_check_name),
    WithJsonSchema({"type": "string", "pattern": NAME_PATTERN, "minLength": 1, "maxLength": 63}),
]


def _check_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(
            f'unknown time zone {_show(value)} (expected an IANA name such as "UTC" or '
            '"Europe/Paris")'
        ) from None
    return value


TimeZoneName = Annotated[
    str,
    AfterValidator(_check_timezone),
    WithJsonSchema({"type": "string", "description": 'IANA time zone, e.g. "UTC".'}),
]


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


class Metadata(_Model):
    """Identity of a resource: its name (unique per kind) and free-form labels."""

    name: Name
    labels: dict[str, str] = Field(default_factory=dict)
