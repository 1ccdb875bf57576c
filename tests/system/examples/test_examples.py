"""Tests for the example agents: they are what a new user runs first, so they must work.

They run through :class:`agentos.testing.AgentHarness` on the sim engine, whose text is
deterministic nonsense: the tests check what the agents do with the model's answers
(where they go, when the model is asked at all), never what the answers say, so the same
agents work unchanged on a real model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from agentos.core.spec import AgentResource, load_paths
from agentos.engine.sim import SimEngine
from agentos.runtime.loop import AgentCodeError
from agentos.testing import AgentHarness, ToolCall
from examples.file_clerk import FileClerk
from examples.folder_digest import MAX_FILE_BYTES, DigestState, FileStamp, FolderDigest
from examples.inbox_assistant import MAX_ANSWERS, AssistantState, InboxAssistant

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).parents[3]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ------------------------------------------------------------------------ folder digest


def digest_harness(folder: Path, digest: Path | None = None, **config: Any) -> AgentHarness:
    cfg: dict[str, Any] = {"path": str(folder), **config}
    if digest is not None:
        cfg["digest"] = str(digest)
    return AgentHarness(FolderDigest, config=cfg, name="folder-digest")


def bump(path: Path, text: str) -> None:
    """Rewrite ``path`` with a later mtime, so the change shows even on coarse clocks."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def entries(digest: Path) -> list[str]:
    return [line for line in digest.read_text().splitlines() if line.startswith("- ")]


async def test_folder_digest_summarises_new_files_once(tmp_path: Path) -> None:
    folder, digest = tmp_path / "watched", tmp_path / "digest.md"
    folder.mkdir()
    (folder / "a.txt").write_text("Meeting notes: ship the release on Monday.\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.md").write_text("# Plan\n\n- write docs\n- fix the bug\n")
    (folder / ".hidden").write_text("editor swap file")
    h = digest_harness(folder, digest)

    await h.run("heartbeat")

    assert h.llm.usage.calls == 2
    lines = entries(digest)
    assert len(lines) == 2
    assert lines[0].startswith("- **new** `a.txt`: ")
    assert lines[1].startswith("- **new** `sub/b.md`: ")
    assert all(len(line.split(": ", 1)[1]) > 0 for line in lines)
    state = h.state
    assert isinstance(state, DigestState)  # survived the harness's encode/decode
    assert set(state.seen) == {"a.txt", "sub/b.md"}
    assert isinstance(state.seen["a.txt"], FileStamp)
    assert (state.files_summarised, state.files_skipped, state.digests_written) == (2, 0, 1)

    # Nothing changed: no model call, nothing appended, and the loop ran no step.
    text = digest.read_text()
    result = await h.run("heartbeat")
    assert result.steps == 0
    assert h.llm.usage.calls == 2
    assert digest.read_text() == text


async def test_folder_digest_reports_changed_and_removed_files(tmp_path: Path) -> None:
    folder, digest = tmp_path / "watched", tmp_path / "out" / "digest.md"
    folder.mkdir()
    (folder / "a.txt").write_text("first version")
    (folder / "b.txt").write_text("stays the same")
    (folder / "c.txt").write_text("will be removed")
    h = digest_harness(folder, digest)
    await h.run("heartbeat")
    assert h.llm.usage.calls == 3

    bump(folder / "a.txt", "second version, somewhat longer")
    (folder / "c.txt").unlink()
    (folder / "d.txt").write_text("a new file")
    await h.run("heartbeat")

    assert h.llm.usage.calls == 5  # a.txt again and d.txt; b.txt is unchanged
    new_lines = entries(digest)[3:]
    assert [line.split(":")[0] for line in new_lines] == [
        "- **changed** `a.txt`",
        "- **new** `d.txt`",
        "- **removed** `c.txt`",
    ]
    assert set(h.state.seen) == {"a.txt", "b.txt", "d.txt"}
    assert h.state.files_removed == 1
    assert digest.read_text().count("# Digest of") == 1


async def test_folder_digest_skips_big_and_binary_files(tmp_path: Path) -> None:
    folder, digest = tmp_path / "watched", tmp_path / "digest.md"
    folder.mkdir()
    (folder / "big.txt").write_text("x" * (MAX_FILE_BYTES + 1))
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (folder / "empty.txt").write_text("   \n")
    (folder / "ok.txt").write_text("just text")
    h = digest_harness(folder, digest)

    await h.run("heartbeat")

    assert h.llm.usage.calls == 1  # only ok.txt reaches the model
    lines = {line.split("`")[1]: line for line in entries(digest)}
    assert "skipped" in lines["big.txt"]
    assert "256 KiB" in lines["big.txt"]
    assert "binary" in lines["image.png"]
    assert "binary" in lines["latin1.txt"]
    assert "empty" in lines["empty.txt"]
    assert h.state.files_skipped == 4
    # Skipped files are remembered too, so they are not reported on every heartbeat.
    assert (await h.run("heartbeat")).steps == 0


async def test_folder_digest_default_digest_is_outside_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "inbox" / "watched"  # does not exist yet: the agent creates it
    h = digest_harness(folder)

    assert (await h.run("start")).steps == 0
    assert folder.is_dir()

    (folder / "note.txt").write_text("hello")
    await h.run("heartbeat")
    digest = tmp_path / "inbox" / "watched-digest.md"
    assert len(entries(digest)) == 1
    assert list(folder.iterdir()) == [folder / "note.txt"]


async def test_folder_digest_refuses_a_digest_inside_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "watched"
    h = digest_harness(folder, folder / "digest.md")
    with pytest.raises(AgentCodeError, match="inside the watched folder"):
        await h.run("heartbeat")


async def test_folder_digest_works_in_batches_and_resumes_after_restart(tmp_path: Path) -> None:
    folder, digest = tmp_path / "watched", tmp_path / "digest.md"
    folder.mkdir()
    for i in range(5):
        (folder / f"f{i}.txt").write_text(f"file number {i}")
    h = digest_harness(folder, digest, batch=2)

    result = await h.run("heartbeat")
    assert result.steps == 3  # 2 + 2 + 1, state saved after each
    assert h.state.digests_written == 3

    # A new process (a daemon restart, or the agent moving) starts from the saved state.
    restarted = AgentHarness(
        FolderDigest,
        config=h.config,
        name="folder-digest",
        state=h.codec.decode(h.codec.encode(h.state)),
    )
    assert (await restarted.run("heartbeat")).steps == 0
    assert restarted.llm.usage.calls == 0


async def test_folder_digest_rescan_message_summarises_everything_again(tmp_path: Path) -> None:
    folder, digest = tmp_path / "watched", tmp_path / "digest.md"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha")
    (folder / "b.txt").write_text("beta")
    h = digest_harness(folder, digest)
    await h.run("heartbeat")

    result = await h.message("look now")  # any message: a scan, which finds nothing
    assert result.steps == 0
    assert h.ctx.message_taken

    result = await h.message("rescan")
    assert result.steps == 1  # once per file, not again and again
    assert h.llm.usage.calls == 4
    assert [line.split(":")[0] for line in entries(digest)[2:]] == [
        "- **changed** `a.txt`",
        "- **changed** `b.txt`",
    ]


async def test_folder_digest_resets_the_context_before_each_summary(tmp_path: Path) -> None:
    folder, digest = tmp_path / "watched", tmp_path / "digest.md"
    folder.mkdir()
    (folder / "a.txt").write_text("the first file")
    (folder / "b.txt").write_text("the second file")
    engine = SimEngine()
    h = AgentHarness(
        FolderDigest,
        config={"path": str(folder), "digest": str(digest)},
        name="folder-digest",
        engine=engine,
    )
    await h.run("heartbeat")

    context = engine.decode(engine.context_tokens("folder-digest"))
    assert "File: b.txt\nContent: the second file\nSummary:" in context
    assert "the first file" not in context


# ---------------------------------------------------------------------- inbox assistant


def assistant(tmp_path: Path) -> tuple[AgentHarness, Path]:
    outbox = tmp_path / "var" / "outbox.jsonl"
    h = AgentHarness(InboxAssistant, config={"outbox": str(outbox)}, name="inbox-assistant")
    return h, outbox


def outbox_lines(outbox: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in outbox.read_text().splitlines()]


def last_answer(h: AgentHarness) -> str:
    answer: str = h.state.answers[-1].answer
    return answer


async def test_assistant_remembers_and_recalls_without_the_model(tmp_path: Path) -> None:
    h, outbox = assistant(tmp_path)

    await h.message("remember Colour = blue")
    await h.message("recall colour")
    assert last_answer(h) == "colour = blue"
    await h.message("recall")
    assert "colour" in last_answer(h)
    await h.message("recall size")
    assert "don't know size" in last_answer(h)
    await h.message("forget colour")
    await h.message("recall colour")
    assert "don't know colour" in last_answer(h)
    await h.message("stats")
    assert "6 messages answered, 0 by the model" in last_answer(h)

    assert h.llm.usage.calls == 0
    state = h.state
    assert isinstance(state, AssistantState)  # survived the harness's encode/decode
    assert state.memory == {}
    assert state.handled == 7
    assert all(a.source == "local" for a in state.answers)
    assert len(outbox_lines(outbox)) == 7


async def test_assistant_answers_free_text_with_the_model(tmp_path: Path) -> None:
    h, outbox = assistant(tmp_path)
    await h.message("remember name=Ada")

    result = await h.message("What should I\ncall my cat?")

    assert result.steps == 1
    assert h.llm.usage.calls == 1
    answer = h.state.answers[-1]
    assert answer.source == "model"
    assert answer.answer.strip()
    assert "\n" not in answer.answer
    assert h.state.model_answers == 1
    written = outbox_lines(outbox)[-1]
    assert written["id"] == answer.id == h.tasks[-1].outcome.answer.id
    assert written["question"] == "What should I\ncall my cat?"
    assert written["answer"] == answer.answer
    assert written["source"] == "model"


async def test_assistant_prompt_carries_facts_and_starts_fresh(tmp_path: Path) -> None:
    engine = SimEngine()
    h = AgentHarness(
        InboxAssistant,
        config={"outbox": str(tmp_path / "outbox.jsonl")},
        name="inbox-assistant",
        engine=engine,
    )
    await h.message("remember name=Ada")
    await h.message("first question?")
    await h.message("second question?")

    context = engine.decode(engine.context_tokens("inbox-assistant"))
    assert context.startswith("system: ")
    assert "name = Ada" in context
    assert "user: second question?\nassistant:" in context
    assert "first question" not in context


async def test_assistant_keeps_only_the_last_answers(tmp_path: Path) -> None:
    h, outbox = assistant(tmp_path)
    total = MAX_ANSWERS + 5
    for i in range(total):
        await h.message(f"recall k{i}" if i % 2 else f"question number {i}?")

    answers = h.state.answers
    assert len(answers) == MAX_ANSWERS
    assert answers[-1].question == f"question number {total - 1}?"
    assert answers[0].question == "recall k5"
    assert h.state.handled == total
    assert len(outbox_lines(outbox)) == total  # the outbox is the full record


async def test_assistant_ignores_wakeups_without_a_message(tmp_path: Path) -> None:
    h, outbox = assistant(tmp_path)
    result = await h.run("start")
    assert result.steps == 0
    assert not outbox.exists()


async def test_assistant_treats_malformed_commands_as_questions(tmp_path: Path) -> None:
    h, _ = assistant(tmp_path)
    await h.message("remember when we met in Paris?")
    await h.message("recall the last time it snowed")
    assert [a.source for a in h.state.answers] == ["model", "model"]
    assert h.state.memory == {}
    await h.message("   ")
    assert h.state.answers[-1].source == "local"


# ------------------------------------------------------------------------------ the specs


def test_example_specs_validate() -> None:
    documents = load_paths([ROOT / "examples" / "agents.yaml", ROOT / "policies" / "default.yaml"])
    by_name = {(d.kind, d.name): d.resource for d in documents}
    assert set(by_name) == {
        ("Agent", "folder-digest"),
        ("Agent", "inbox-assistant"),
        ("Agent", "approval-gate"),
        ("Agent", "file-clerk"),
        ("QuotaPolicy", "default"),
    }
    digest = by_name["Agent", "folder-digest"]
    assistant_spec = by_name["Agent", "inbox-assistant"]
    assert isinstance(digest, AgentResource)
    assert isinstance(assistant_spec, AgentResource)
    assert digest.spec.entrypoint == "examples.folder_digest:FolderDigest"
    assert assistant_spec.spec.entrypoint == "examples.inbox_assistant:InboxAssistant"
    # The digest must not be inside the folder it summarises.
    assert not Path(digest.spec.config["digest"]).is_relative_to(digest.spec.config["path"])


def test_example_entrypoints_import() -> None:
    from agentos.runtime.loop import load_agent_class

    assert load_agent_class("examples.folder_digest:FolderDigest")[0] is FolderDigest
    assert load_agent_class("examples.inbox_assistant:InboxAssistant")[0] is InboxAssistant
    assert load_agent_class("examples.file_clerk:FileClerk")[0] is FileClerk


# ------------------------------------------------------------------------ file clerk


async def test_file_clerk_lists_reads_and_answers(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("The launch is on Tuesday.\n")
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    h = AgentHarness(FileClerk, config={"path": str(tmp_path)})
    h.script(
        ToolCall(id="c1", name="list_files", arguments={"pattern": "*.md"}),
        ToolCall(id="c2", name="read_file", arguments={"name": "notes.md"}),
        "The launch is on Tuesday.",
    )
    result = await h.message("When is the launch?")
    assert result.outcome == "The launch is on Tuesday."
    results = [m["content"] for m in h.llm.messages if m["role"] == "tool"]
    assert results == ['[{"name":"notes.md","bytes":26}]', "The launch is on Tuesday.\n"]


async def test_file_clerk_tools_stay_inside_the_folder(tmp_path: Path) -> None:
    (tmp_path / "inside.txt").write_text("ok")
    h = AgentHarness(FileClerk, config={"path": str(tmp_path)})
    h.script(ToolCall(id="c1", name="read_file", arguments={"name": "../../etc/passwd"}), "no")
    await h.message("read it")
    results = [m["content"] for m in h.llm.messages if m["role"] == "tool"]
    assert results == ["error: '../../etc/passwd' is outside the folder"]


async def test_file_clerk_gives_up_after_its_step_limit(tmp_path: Path) -> None:
    h = AgentHarness(FileClerk, config={"path": str(tmp_path)})
    h.script(*[ToolCall(id=f"c{i}", name="list_files", arguments={}) for i in range(8)])
    result = await h.message("loop forever")
    assert result.outcome == "(no answer after 6 steps)"


# ------------------------------------------------------------------------ approval gate


@pytest.mark.parametrize(("answer", "done"), [("yes", True), ("no", False)])
async def test_approval_gate_acts_only_on_yes(tmp_path: Path, answer: str, done: bool) -> None:
    from examples.approval_gate import ApprovalGate

    actions = tmp_path / "actions.jsonl"
    h = AgentHarness(ApprovalGate, config={"actions": str(actions)}, name="approval-gate")
    await h.message("rotate the staging API keys")
    assert h.waiting is not None
    assert h.waiting.choices == ("yes", "no")
    assert h.waiting.question.startswith("Carry out: ")
    calls = h.llm.usage.calls
    result = await h.answer(answer)
    assert h.waiting is None
    assert h.llm.usage.calls == calls  # the plan came from the recorded call
    assert result.outcome.startswith("done: " if done else "not done")
    assert actions.exists() is done
    assert (h.state.approved, h.state.refused) == ((1, 0) if done else (0, 1))


async def test_approval_gate_says_no_when_nobody_answers(tmp_path: Path) -> None:
    from examples.approval_gate import ApprovalGate

    actions = tmp_path / "actions.jsonl"
    h = AgentHarness(ApprovalGate, config={"actions": str(actions)})
    await h.message("drop the old table")
    result = await h.expire()
    assert result.outcome.startswith("not done (answer: no)")
    assert not actions.exists()
