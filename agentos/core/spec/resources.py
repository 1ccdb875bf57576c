"""Any resource, its canonical form, and a validated document with the issues found in it.

Every kind (Agent, QuotaPolicy, Model, ToolServer) is told apart by ``kind``; what gets
stored and compared is :func:`canonical`, and what the loader hands back is a
:class:`Document` (the resource and where it was read from) or one :class:`SpecError`
listing every :class:`SpecIssue`. The cores that check a whole fleet after loading
(:mod:`agentos.core.fleet`, :mod:`agentos.core.models`) report through the same types.
Pure: no I/O.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Final, TypeAlias

from pydantic import Field, TypeAdapter

from agentos.core.spec.agent import AgentResource
from agentos.core.spec.model import ModelResource
from agentos.core.spec.quota import QuotaPolicyResource
from agentos.core.spec.toolserver import ToolServerResource

__all__ = [
    "KINDS",
    "AnyResource",
    "Document",
    "Resource",
    "SpecError",
    "SpecIssue",
    "canonical",
    "json_schema",
]

AnyResource: TypeAlias = AgentResource | QuotaPolicyResource | ModelResource | ToolServerResource

Resource = Annotated[AnyResource, Field(discriminator="kind")]
"""Any resource, told apart by ``kind``."""

_MODELS: Final[dict[str, type[AnyResource]]] = {
    "Agent": AgentResource,
    "QuotaPolicy": QuotaPolicyResource,
    "Model": ModelResource,
    "ToolServer": ToolServerResource,
}
KINDS: Final[tuple[str, ...]] = tuple(_MODELS)


def canonical(resource: AnyResource) -> dict[str, Any]:
    """Return the resource as plain JSON-compatible data with YAML key names.

    The form is stable (every default written out, durations as strings, unset limits
    left out) and :func:`parse_resource` on it gives an equal resource, so it is what
    gets stored and compared.
    """
    return resource.model_dump(mode="json", by_alias=True, exclude_none=True)


def json_schema() -> dict[str, Any]:
    """Return the JSON Schema of a resource document, for editor completion."""
    schema = TypeAdapter(Resource).json_schema(by_alias=True)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "agentos resource",
        **schema,
    }


@dataclasses.dataclass(frozen=True)
class SpecIssue:
    """One problem found while loading specs.

    ``line`` is 1-based; 0 means the problem has no line (a missing path, data that did
    not come from a file). ``path`` uses YAML key names, e.g. ``spec.triggers[0].schedule``;
    empty when the problem is with the file or document as a whole.
    """

    source: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line > 0 else self.source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecError(Exception):
    """Specs failed to load; ``issues`` lists every problem found, in file order."""

    def __init__(self, issues: Sequence[SpecIssue]) -> None:
        self.issues: list[SpecIssue] = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))


@dataclasses.dataclass(frozen=True)
class Document:
    """A validated resource and where it was read from (``line``: 1-based document start)."""

    resource: AnyResource
    source: str
    line: int
    lines: Mapping[tuple[str | int, ...], int] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )  # YAML path -> line, for errors found after loading (see line_of)

    @property
    def kind(self) -> str:
        """The resource kind: ``"Agent"`` or ``"QuotaPolicy"``."""
        return self.resource.kind

    @property
    def name(self) -> str:
        """The resource name (``metadata.name``)."""
        return self.resource.metadata.name

    def line_of(self, *path: str | int) -> int:
        """The line of the YAML node at ``path`` (YAML key names), else of the nearest
        parent that has one, else the document's."""
        return _line_for(path, dict(self.lines), self.line)

    def canonical(self) -> dict[str, Any]:
        """Return :func:`canonical` of the resource."""
        return canonical(self.resource)


_Lines: TypeAlias = dict[tuple[str | int, ...], int]


def _line_for(path: Sequence[str | int], lines: _Lines, default: int) -> int:
    """Return the line of the deepest YAML node that exists along ``path``."""
    parts = tuple(part for part in path if part != "[key]")
    for end in range(len(parts), -1, -1):
        found = lines.get(parts[:end])
        if found is not None:
            return found
    return default
