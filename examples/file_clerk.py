"""A clerk for a folder: answers questions about its files by calling two tools in a loop.

The model gets the question and two tools, ``list_files`` and ``read_file``, both
confined to ``config.path`` (the folder ``folder-digest`` watches). ``ctx.llm.run``
is the loop: the model asks for a listing or a file, the clerk runs the call (in a
worker thread: file reads block), the result goes back, until the model answers or
six steps have passed. The answer is the task's result (``agentos send --wait``).

On the local base model the tool calls come from constrained output (one JSON-schema
branch per tool), so they are always well-formed; whether they are *useful* is up to
the model: point the agent at a chat model (``spec.model``) for real answers.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from agentos import Agent, Context, Message, ToolError, tool

__all__ = ["FileClerk", "list_files", "read_file"]

DEFAULT_FOLDER = "./var/watched"
MAX_STEPS = 6
MAX_LISTED = 50

SYSTEM = (
    "You are a file clerk. Answer questions about the files in one folder. "
    "Call list_files to see what is there and read_file to read one, then answer briefly."
)


def _folder(ctx: Context) -> Path:
    return Path(str(ctx.config.get("path", DEFAULT_FOLDER))).resolve()


def _inside(ctx: Context, name: str) -> Path:
    root = _folder(ctx)
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise ToolError(f"{name!r} is outside the folder")
    return path


@tool(timeout="10s", idempotent=True)
def list_files(
    ctx: Context,
    pattern: Annotated[str, Field(description="A glob such as *.md")] = "*",
) -> list[dict[str, Any]]:
    """List the files in the folder whose names match a glob, with their sizes in bytes."""
    root = _folder(ctx)
    if not root.is_dir():
        raise ToolError(f"the folder {root} does not exist")
    found = [
        {"name": str(p.relative_to(root)), "bytes": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file() and fnmatch.fnmatch(p.name, pattern)
    ]
    return found[:MAX_LISTED]


@tool(timeout="10s", idempotent=True)
def read_file(
    ctx: Context,
    name: Annotated[str, Field(description="A file name from list_files")],
    max_chars: Annotated[int, Field(ge=1, le=4000)] = 1000,
) -> str:
    """Read the start of one file in the folder."""
    path = _inside(ctx, name)
    if not path.is_file():
        raise ToolError(f"no file {name!r}")
    with path.open(encoding="utf-8", errors="replace") as f:
        return f.read(max_chars)


class FileClerk(Agent):
    """Answers each inbox message about the folder with a tool loop."""

    tools = (list_files, read_file)

    async def act(self, ctx: Context, message: Message) -> str:
        # Questions are independent: each starts from an empty conversation, so the
        # context (and the KV hibernation keeps) does not grow without end.
        await ctx.llm.reset()
        reply = await ctx.llm.run(
            [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": message.body[:2000]},
            ],
            max_steps=MAX_STEPS,
            max_tokens=120,
        )
        if reply.tool_calls:
            return f"(no answer after {MAX_STEPS} steps)"
        return reply.text.strip() or "(the model gave no answer)"
