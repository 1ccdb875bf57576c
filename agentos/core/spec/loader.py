"""Loading specs: YAML text and files in, validated resources or one :class:`SpecError` out.

Operators describe their fleet in YAML; ``agentos apply`` must validate a whole set of
files before it changes anything and, when something is wrong, name every problem with
its file, line and field. So the loader indexes the line of every YAML node before it
validates, turns each pydantic error into a sentence that says what was expected (with
a "did you mean" for a misspelt field), refuses documents whose aliases expand beyond
reason, and reports duplicates across files.

It reads the files it is asked to read and nothing else; no imports of the async or
storage layers.
"""

import dataclasses
import difflib
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from agentos.core.spec.resources import (
    _MODELS,
    KINDS,
    AnyResource,
    Document,
    SpecError,
    SpecIssue,
    _line_for,
    _Lines,
)
from agentos.core.specbase import (
    _ERROR_TYPE,
    _ISSUES_KEY,
    API_VERSION,
    _render_path,
    _show,
    _SubPath,
)

__all__ = ["MAX_EXPANDED_NODES", "load_paths", "parse_resource", "parse_text"]


@dataclasses.dataclass
class _Loaded:
    """Accumulates documents and issues across every file of one load."""

    documents: list[tuple[Document, int]] = dataclasses.field(default_factory=list)
    issues: list[SpecIssue] = dataclasses.field(default_factory=list)

    def result(self) -> list[Document]:
        seen: dict[tuple[str, str], Document] = {}
        for document, name_line in self.documents:
            key = (document.kind, document.name)
            first = seen.get(key)
            if first is None:
                seen[key] = document
                continue
            self.issues.append(
                SpecIssue(
                    document.source,
                    name_line,
                    "metadata.name",
                    f'duplicate {document.kind} "{document.name}" (first defined at '
                    f"{first.source}:{first.line})",
                )
            )
        if self.issues:
            order: dict[str, int] = {}
            for issue in self.issues:
                order.setdefault(issue.source, len(order))
            raise SpecError(sorted(self.issues, key=lambda i: (order[i.source], i.line)))
        return [document for document, _ in self.documents]


def _index_lines(
    node: yaml.Node,
    path: tuple[str | int, ...],
    lines: _Lines,
    issues: list[SpecIssue],
    source: str,
    active: frozenset[int] = frozenset(),
) -> None:
    # A key maps to the line of the key itself (where a reader looks for the field), a
    # list item to the line where the item starts.
    if id(node) in active:  # a recursive alias; its lines are already known
        return
    active = active | {id(node)}
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            child = (*path, key)
            if key in first_line:
                # PyYAML silently keeps the last one; a repeated key is nearly always a
                # paste error that would drop half a spec without anyone noticing.
                issues.append(
                    SpecIssue(
                        source,
                        line,
                        _render_path(child),
                        f"duplicate key (first at line {first_line[key]})",
                    )
                )
                continue
            first_line[key] = line
            lines[child] = line
            _index_lines(value_node, child, lines, issues, source, active)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index_lines(item, (*path, index), lines, issues, source, active)


MAX_EXPANDED_NODES = 10_000
"""How many YAML nodes aliases may make a document stand for (more if it is written larger).

PyYAML composes an alias as a second reference to the anchored node, so a few hundred
bytes of anchors of anchors (the "billion laughs") stand for billions of nodes, which
the line index and validation would each walk: ``apply`` hung. A real spec is a few
hundred nodes; one that needs more can write them out.
"""


def _node_counts(root: yaml.Node) -> tuple[int, int]:
    """``(written, expanded)``: distinct nodes of ``root``'s graph, and how many it stands
    for once every alias is expanded (a recursive alias counts once, as it is indexed)."""
    expanded: dict[int, int] = {}

    def walk(node: yaml.Node, active: frozenset[int]) -> int:
        key = id(node)
        if key in active:
            return 1
        if key not in expanded:
            inner = active | {key}
            children: list[yaml.Node] = []
            if isinstance(node, yaml.MappingNode):
                children = [part for pair in node.value for part in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = list(node.value)
            expanded[key] = 1 + sum(walk(child, inner) for child in children)
        return expanded[key]

    total = walk(root, frozenset())
    return len(expanded), total


# libyaml's parser when PyYAML was built with it (about ten times faster: an apply of
# 100,000 agents is mostly YAML parsing), the pure-Python one otherwise.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_yaml(text: str, source: str, loaded: _Loaded) -> None:
    loader = _SafeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:  # pragma: no cover - check_node() said there is one
                continue
            written, expanded = _node_counts(node)
            if expanded > max(MAX_EXPANDED_NODES, written):
                loaded.issues.append(
                    SpecIssue(
                        source,
                        node.start_mark.line + 1,
                        "",
                        f"aliases expand this document to {expanded:,} YAML nodes (at most "
                        f"{MAX_EXPANDED_NODES:,}, or as many as are written: {written:,}); "
                        "write the repeated parts out or use fewer aliases",
                    )
                )
                continue
            lines: _Lines = {}
            _index_lines(node, (), lines, loaded.issues, source)
            data = loader.construct_document(node)
            if data is None:
                continue
            _validate_document(data, source, node.start_mark.line + 1, lines, loaded)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = ", ".join(part for part in (exc.context, exc.problem) if part)
        # libyaml puts an error at the end of the stream on the line after the last one.
        line = min(mark.line + 1, text.count("\n") + 1) if mark else 0
        loaded.issues.append(SpecIssue(source, line, "", f"invalid YAML: {what}"))
    except yaml.YAMLError as exc:
        loaded.issues.append(SpecIssue(source, 0, "", f"invalid YAML: {exc}"))
    finally:
        loader.dispose()


def _validate_document(data: Any, source: str, line: int, lines: _Lines, loaded: _Loaded) -> None:
    resource, issues = _validate(data, source, line, lines)
    loaded.issues.extend(issues)
    if resource is not None:
        loaded.documents.append(
            (
                Document(resource, source, line, dict(lines)),
                _line_for(("metadata", "name"), lines, line),
            )
        )


def _validate(
    data: Any, source: str, line: int, lines: _Lines
) -> tuple[AnyResource | None, list[SpecIssue]]:
    def issue(path: Sequence[str | int], message: str) -> SpecIssue:
        return SpecIssue(source, _line_for(path, lines, line), _render_path(path), message)

    if not isinstance(data, Mapping):
        return None, [
            issue(
                (),
                f"expected a mapping with apiVersion, kind, metadata and spec; got {_show(data)}",
            )
        ]
    issues: list[SpecIssue] = []
    if "apiVersion" not in data:
        issues.append(issue(("apiVersion",), f'missing (expected "{API_VERSION}")'))
    elif data["apiVersion"] != API_VERSION:
        issues.append(
            issue(
                ("apiVersion",),
                f'unsupported apiVersion {_show(data["apiVersion"])} (expected "{API_VERSION}")',
            )
        )
    kinds = ", ".join(KINDS)
    kind = data.get("kind")
    model = _MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        if "kind" not in data:
            issues.append(issue(("kind",), f"missing (expected one of: {kinds})"))
        else:
            issues.append(
                issue(("kind",), f"unknown kind {_show(kind)} (expected one of: {kinds})")
            )
        return None, issues

    # apiVersion is already checked above with a better message; validating the rest
    # anyway means one run reports everything that is wrong with the document.
    payload = {**data, "apiVersion": API_VERSION}
    try:
        resource = model.model_validate(payload)
    except ValidationError as exc:
        for error in exc.errors():
            for path, message in _explain(error, model):
                issues.append(issue(path, message))
        return None, issues
    return (None if issues else resource), issues


def _explain(error: ErrorDetails, root: type[BaseModel]) -> list[tuple[_SubPath, str]]:
    """Turn one pydantic error into (path, message) pairs that say what was expected."""
    loc: _SubPath = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    kind = error["type"]
    if kind == _ERROR_TYPE:
        return [((*loc, *sub), text) for sub, text in ctx[_ISSUES_KEY]]
    message = error["msg"]
    value = error.get("input")
    if kind == "extra_forbidden":
        model = _model_at(root, loc[:-1])
        if model is None:
            return [(loc, "unknown field")]
        expected = [field.alias or name for name, field in model.model_fields.items()]
        close = difflib.get_close_matches(str(loc[-1]), expected, n=1)
        hint = f'; did you mean "{close[0]}"?' if close else ""
        return [(loc, f"unknown field (expected one of: {', '.join(expected)}){hint}")]
    if kind == "missing":
        return [(loc, "required field is missing")]
    if kind == "literal_error":
        choices = ", ".join(re.findall(r"'([^']*)'", str(ctx.get("expected", ""))))
        return [(loc, f"expected one of: {choices}; got {_show(value)}")]
    for noise in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(noise)
    if message.startswith("Input should be "):
        message = "expected " + message.removeprefix("Input should be ")
        if message.startswith(("expected greater", "expected less")):
            message = message.replace("expected ", "expected a value ", 1)
        message = message.replace("a valid dictionary", "a mapping")
        if value is None or isinstance(value, str | int | float | bool | list | tuple | dict):
            message += f"; got {_show(value)}"
    return [(loc, message)]


def _strip_optional(annotation: Any) -> Any:
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin is Union or origin is types.UnionType:
            args = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _model_at(root: type[BaseModel], loc: _SubPath) -> type[BaseModel] | None:
    """Return the model class that validates the value at ``loc``, if there is one."""
    current: Any = root
    for part in loc:
        current = _strip_optional(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            for name, field in current.model_fields.items():
                if part in (name, field.alias):
                    current = field.annotation
                    break
            else:
                return None
        elif get_origin(current) in (list, tuple) and isinstance(part, int):
            current = get_args(current)[0]
        elif get_origin(current) is dict and isinstance(part, str):
            current = get_args(current)[1]
        else:
            return None
    current = _strip_optional(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def parse_text(text: str, source: str = "<stdin>") -> list[Document]:
    """Return the validated resources in ``text``, a (multi-document) YAML string.

    Empty documents are skipped. ``source`` names the text in issues.

    Raises:
        SpecError: listing every problem found (nothing is returned partially).
    """
    loaded = _Loaded()
    _read_yaml(text, source, loaded)
    return loaded.result()


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def load_paths(paths: Iterable[str | Path]) -> list[Document]:
    """Return the validated resources in the given files and directories, in order.

    A directory contributes every ``*.yaml`` / ``*.yml`` file below it, recursively, in
    sorted order, skipping hidden files and directories (names starting with "."). A file
    reached twice is read once. Documents of the same kind may not share a name.

    Raises:
        SpecError: listing every problem in every file (nothing is returned partially),
            including paths that do not exist and directories without YAML files.
    """
    loaded = _Loaded()
    read: set[Path] = set()
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files = sorted(
                candidate
                for candidate in path.rglob("*")
                if candidate.suffix in (".yaml", ".yml")
                and candidate.is_file()
                and not _is_hidden(candidate, path)
            )
            if not files:
                loaded.issues.append(
                    SpecIssue(str(path), 0, "", "directory contains no .yaml or .yml files")
                )
        elif path.exists():
            files = [path]
        else:
            loaded.issues.append(SpecIssue(str(path), 0, "", "no such file or directory"))
            continue
        for file in files:
            identity = file.resolve()
            if identity in read:
                continue
            read.add(identity)
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                loaded.issues.append(SpecIssue(str(file), 0, "", f"cannot read: {exc}"))
                continue
            _read_yaml(text, str(file), loaded)
    return loaded.result()


def parse_resource(data: Mapping[str, Any]) -> AnyResource:
    """Return the resource described by ``data`` (e.g. :func:`canonical` output read back).

    Raises:
        SpecError: listing every problem, with source ``"<data>"`` and no line numbers.
    """
    resource, issues = _validate(data, "<data>", 0, {})
    if resource is None:
        raise SpecError(issues)
    return resource
