"""An agent that keeps a running markdown digest of what changes in a folder.

It exists to show a polling agent end to end: ``observe`` compares the folder with what
the durable state says was there last time and returns ``None`` when nothing changed (so
a heartbeat costs no model call and the agent can hibernate), ``plan`` reads the changed
files and decides which are worth a summary, ``act`` asks the model for a one-line
summary of each and appends them to the digest, and ``learn`` records what was seen.

Config (the Agent spec's ``config``):

* ``path``: the folder to watch; a relative path is relative to the daemon's working
  directory. It is created when missing.
* ``digest``: the markdown file to append to; defaults to ``<folder>-digest.md`` next to
  the folder. It must not be inside the folder, or every digest would be a change.
* ``batch``: how many changed files to handle per loop iteration (default 20). State is
  saved after each iteration, so a large backlog is resumed, not redone, after a crash.

Send ``rescan`` to its inbox to summarise every file again; any other message just
makes it look now instead of at the next heartbeat. A task's result is the digest's
lines it wrote, as a person reads them (``agentos tasks folder-digest``).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import anyio.to_thread
import msgspec

from agentos import Agent, Context

__all__ = ["DigestState", "FileStamp", "FolderDigest"]

MAX_FILE_BYTES = 256 * 1024
EXCERPT_CHARS = 1_500
SUMMARY_MAX_TOKENS = 40
DEFAULT_BATCH = 20

# The model is a small *base* model: it does not follow instructions, it continues text.
# So the prompt is a document whose obvious continuation is one more summary line. The
# examples are one line each because the excerpt is flattened to one line too, and the
# generation stops at the first newline.
FEW_SHOT = (
    "Each file below is followed by a one-line summary of what it contains.\n"
    "\n"
    "File: notes/groceries.txt\n"
    "Content: eggs, milk, flour, butter. Pick up the birthday cake on Friday before 5pm.\n"
    "Summary: A shopping list and a reminder to collect a birthday cake on Friday.\n"
    "\n"
    "File: src/retry.py\n"
    "Content: import time def retry(fn, attempts=3): for i in range(attempts): try: return "
    "fn() except OSError: time.sleep(2 ** i) raise RuntimeError('gave up')\n"
    "Summary: Python helper that retries a function on OSError with exponential backoff.\n"
    "\n"
    "File: logs/server.log\n"
    "Content: 12:00:01 INFO started on :8080 12:03:17 ERROR db timeout after 5s 12:03:22 "
    "ERROR db timeout after 5s 12:04:00 INFO recovered\n"
    "Summary: Server log with two database timeouts shortly after start, then recovery.\n"
    "\n"
)


class FileStamp(msgspec.Struct, frozen=True):
    """What identifies a version of a file without reading it."""

    mtime_ns: int
    size: int


class DigestState(msgspec.Struct):
    """Durable state: the files seen at the last scan and what the agent has done so far."""

    seen: dict[str, FileStamp] = msgspec.field(default_factory=dict)
    digests_written: int = 0
    files_summarised: int = 0
    files_skipped: int = 0
    files_removed: int = 0
    last_digest_at: float = 0.0


ChangeKind = Literal["new", "changed", "removed"]


@dataclass(frozen=True, slots=True)
class Change:
    """A file that differs from the last scan; ``name`` is relative to the folder."""

    name: str
    kind: ChangeKind
    stamp: FileStamp | None  # None when the file was removed


@dataclass(frozen=True, slots=True)
class Job:
    """What to do about one change: summarise ``excerpt``, or just report ``note``."""

    change: Change
    excerpt: str | None
    note: str = ""


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of the digest."""

    change: Change
    text: str
    summarised: bool


class FolderDigest(Agent):
    """Summarises new and changed files of a folder into a markdown digest."""

    State = DigestState

    def __init__(self) -> None:
        # Files handled during the current task. A file that is rewritten faster than it
        # can be summarised (a log being appended to) would otherwise keep the loop going
        # for ever; with this it waits for the next wake-up instead.
        self._task_id = ""
        self._handled: set[str] = set()
        self._rescan = False

    async def observe(self, ctx: Context) -> list[Change] | None:
        if ctx.task.id != self._task_id:
            self._task_id = ctx.task.id
            self._handled = set()
            self._rescan = False
        message = ctx.take_message()
        if message is not None and message.body.strip().lower() == "rescan":
            self._rescan = True

        folder, _ = await anyio.to_thread.run_sync(_locate, ctx.config)
        current = await anyio.to_thread.run_sync(_scan, folder)
        state: DigestState = ctx.state
        changes: list[Change] = []
        for name, stamp in current.items():
            if name in self._handled:
                continue
            old = state.seen.get(name)
            if old is None:
                changes.append(Change(name, "new", stamp))
            elif old != stamp or self._rescan:
                changes.append(Change(name, "changed", stamp))
        changes.extend(
            Change(name, "removed", None)
            for name in sorted(state.seen)
            if name not in current and name not in self._handled
        )
        batch = _batch_size(ctx.config)
        return changes[:batch] or None

    async def plan(self, ctx: Context, observation: list[Change]) -> list[Job]:
        folder, _ = await anyio.to_thread.run_sync(_locate, ctx.config)
        return await anyio.to_thread.run_sync(_prepare, folder, observation)

    async def act(self, ctx: Context, plan: list[Job]) -> list[Entry]:
        entries: list[Entry] = []
        for job in plan:
            if job.excerpt is None:
                entries.append(Entry(job.change, job.note, summarised=False))
            else:
                # Engine errors (a failed or throttled call) propagate on purpose: the task
                # fails before learn, so these files stay unseen and are retried later
                # instead of being recorded without a summary.
                summary = await _summarise(ctx, job.change.name, job.excerpt)
                entries.append(Entry(job.change, summary, summarised=True))
        folder, digest = await anyio.to_thread.run_sync(_locate, ctx.config)
        await anyio.to_thread.run_sync(_append_digest, digest, folder, entries, time.time())
        ctx.set_result(_readable(entries, digest))
        return entries

    async def learn(self, ctx: Context, outcome: list[Entry]) -> None:
        state: DigestState = ctx.state
        for entry in outcome:
            change = entry.change
            self._handled.add(change.name)
            if change.stamp is None:
                state.seen.pop(change.name, None)
                state.files_removed += 1
                continue
            # Skipped files are recorded too, so a big or binary file is reported once
            # per version rather than on every heartbeat.
            state.seen[change.name] = change.stamp
            if entry.summarised:
                state.files_summarised += 1
            else:
                state.files_skipped += 1
        state.digests_written += 1
        state.last_digest_at = time.time()
        ctx.log.info("digest updated with %d file(s)", len(outcome))


def _readable(entries: list[Entry], digest: Path) -> str:
    """The task's result: one line per file, as the digest has it."""
    lines = [f"{e.change.name} ({e.change.kind}): {e.text}" for e in entries]
    return f"{len(entries)} file(s) added to {digest}:\n" + "\n".join(lines)


async def _summarise(ctx: Context, name: str, excerpt: str) -> str:
    # Every summary stands on its own: keeping earlier files in the context would let
    # them leak into this one's summary, and the context (and the KV cache hibernation
    # has to store) would grow with every file ever seen.
    await ctx.llm.reset()
    prompt = f"{FEW_SHOT}File: {name}\nContent: {excerpt}\nSummary:"
    completion = await ctx.llm.generate(
        prompt, max_tokens=SUMMARY_MAX_TOKENS, stop=("\n",), temperature=0.0
    )
    summary = " ".join(completion.text.split())
    if not summary:
        return "(the model gave no summary)"
    if completion.finish_reason == "length":
        summary += " …"
    return summary


def _locate(config: Mapping[str, Any]) -> tuple[Path, Path]:
    """The watched folder and the digest file, absolute; refuses a digest inside the folder."""
    raw = config.get("path")
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError('config.path must name the folder to watch, e.g. "./var/watched"')
    folder = Path(raw).expanduser().resolve()
    given = config.get("digest")
    if given is None:
        digest = folder.parent / f"{folder.name}-digest.md"
    elif isinstance(given, str) and given.strip():
        digest = Path(given).expanduser().resolve()
    else:
        raise ValueError("config.digest must be a file path")
    if digest.is_relative_to(folder):
        raise ValueError(
            f"config.digest ({digest}) is inside the watched folder ({folder}); the agent "
            "would keep summarising its own digest. Put it outside the folder."
        )
    return folder, digest


def _batch_size(config: Mapping[str, Any]) -> int:
    value = config.get("batch", DEFAULT_BATCH)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.batch must be a positive integer, got {value!r}")
    return value


def _scan(folder: Path) -> dict[str, FileStamp]:
    """Stamp every visible regular file below ``folder``, by path relative to it."""
    folder.mkdir(parents=True, exist_ok=True)
    found: dict[str, FileStamp] = {}
    for root, dirs, files in os.walk(folder):
        # Hidden files are editor swap files, VCS internals and the like: noise, not content.
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file in sorted(files):
            if file.startswith("."):
                continue
            path = Path(root, file)
            try:
                info = path.stat()
            except OSError:  # removed between listing and stat
                continue
            if not stat.S_ISREG(info.st_mode):  # sockets, FIFOs: reading one could block
                continue
            found[path.relative_to(folder).as_posix()] = FileStamp(info.st_mtime_ns, info.st_size)
    return found


def _prepare(folder: Path, changes: list[Change]) -> list[Job]:
    """Read each changed file and decide whether it gets a summary."""
    jobs: list[Job] = []
    for change in changes:
        if change.stamp is None:
            jobs.append(Job(change, None, "removed"))
            continue
        if change.stamp.size > MAX_FILE_BYTES:
            jobs.append(Job(change, None, f"skipped: {_kib(change.stamp.size)} is over 256 KiB"))
            continue
        try:
            with (folder / change.name).open("rb") as f:
                # One byte more than the limit catches a file that grew since the scan.
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            jobs.append(Job(change, None, f"skipped: cannot read ({e.strerror or e})"))
            continue
        if len(data) > MAX_FILE_BYTES:
            jobs.append(Job(change, None, "skipped: grew over 256 KiB while being read"))
            continue
        text = _as_text(data)
        if text is None:
            jobs.append(Job(change, None, "skipped: binary file"))
            continue
        # Flatten to one line: the few-shot format is line based, and a newline in the
        # content would read to a base model like the end of the example.
        excerpt = " ".join(text[: EXCERPT_CHARS * 2].split())[:EXCERPT_CHARS]
        if not excerpt:
            jobs.append(Job(change, None, "empty file"))
            continue
        jobs.append(Job(change, excerpt))
    return jobs


def _as_text(data: bytes) -> str | None:
    """The file's text, or None when it looks binary (NUL bytes, or not UTF-8)."""
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def _kib(size: int) -> str:
    return f"{size / 1024:.0f} KiB"


def _append_digest(digest: Path, folder: Path, entries: list[Entry], now: float) -> None:
    digest.parent.mkdir(parents=True, exist_ok=True)
    when = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines: list[str] = []
    if not digest.exists() or digest.stat().st_size == 0:
        lines.append(f"# Digest of {folder}\n")
    lines.append(f"\n## {when}\n\n")
    for entry in entries:
        name = entry.change.name.replace("`", "'")
        if entry.change.kind == "removed":
            lines.append(f"- **removed** `{name}`\n")
        else:
            lines.append(f"- **{entry.change.kind}** `{name}`: {entry.text}\n")
    with digest.open("a", encoding="utf-8") as f:
        f.write("".join(lines))
