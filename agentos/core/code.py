"""Where an agent's code is and which version of it was applied.

`agentos apply` looks for the entrypoint's module next to the spec file (the file's
directory, then its parents, as Python would from a project root) or under
``spec.codePath``, and stores that directory and a hash of the module file with the
spec. A daemon imports the module from there, and an edited module changes the hash:
`apply` reports ``configured (code changed)`` and daemons load the new code at the
agent's next idle point. A module found nowhere near the spec file (an installed
package, a module on the daemon's own path) gets neither: the daemon imports it as
Python would, once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agentos.core.spec import AgentResource, Document, SpecError, SpecIssue

__all__ = ["CodeNotFound", "code_identity", "module_candidates", "with_code"]


class CodeNotFound(ValueError):
    """``spec.codePath`` does not hold the entrypoint's module; says where it looked."""


def module_candidates(base: Path, module: str) -> tuple[Path, Path]:
    """The files ``module`` (``a.b``) would be under ``base``: ``a/b.py``, ``a/b/__init__.py``."""
    rel = Path(*module.split("."))
    return base / rel.with_suffix(".py"), base / rel / "__init__.py"


def _digest(file: Path) -> str:
    """A hash of a module file, or of every ``.py`` file of a package (its
    ``__init__.py``'s folder, with their paths): an edit to any of them changes it."""
    if file.name != "__init__.py":
        return hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    h = hashlib.sha256()
    for path in sorted(file.parent.rglob("*.py")):
        h.update(str(path.relative_to(file.parent)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def code_identity(
    entrypoint: str, source: str, code_path: str | None
) -> tuple[str | None, str | None]:
    """``(codePath, codeHash)`` of an agent applied from the spec file ``source``: the
    directory its entrypoint's module is imported from (absolute) and a hash of that
    module file; ``(None, None)`` when the module is not near the spec file. Raises
    :class:`CodeNotFound` when a given ``code_path`` does not hold it."""
    module = entrypoint.partition(":")[0]
    spec_file = Path(source)
    spec_dir = spec_file.parent if spec_file.is_file() else None
    if code_path is not None:
        base = Path(code_path).expanduser()
        if not base.is_absolute():
            base = (spec_dir or Path.cwd()) / base
        bases = [base.resolve()]
    elif spec_dir is not None:
        here = spec_dir.resolve()
        bases = [here, *here.parents]
    else:
        return None, None
    for base in bases:
        for candidate in module_candidates(base, module):
            if candidate.is_file():
                return str(base), _digest(candidate)
    if code_path is not None:
        looked = " and ".join(str(c) for c in module_candidates(bases[0], module))
        raise CodeNotFound(f"codePath: module {module!r} not found (looked for {looked})")
    return None, None


def with_code(documents: Sequence[Document]) -> list[dict[str, Any]]:
    """The canonical bodies of ``documents``, agents with their code's place and hash
    (:func:`code_identity`). Raises :class:`SpecError` (file:line) when
    a ``codePath`` does not hold its agent's module."""
    bodies, issues = [], []
    for doc in documents:
        body = doc.canonical()
        if isinstance(doc.resource, AgentResource):
            spec = doc.resource.spec
            try:
                path, digest = code_identity(spec.entrypoint, doc.source, spec.code_path)
            except CodeNotFound as e:
                issues.append(SpecIssue(doc.source, doc.line_of("spec", "codePath"), "", str(e)))
                continue
            body["spec"].pop("codeHash", None)  # apply's to write, never the file's
            if path is not None:
                body["spec"]["codePath"] = path
            if digest is not None:
                body["spec"]["codeHash"] = digest
        bodies.append(body)
    if issues:
        raise SpecError(issues)
    return bodies
