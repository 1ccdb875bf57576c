"""Tests for agentos.core.results: what a person reads as a task's result, never a repr."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import uuid
from typing import Any

import msgspec
import pytest
from pydantic import BaseModel

from agentos.core.results import DEFAULT_RESULT_LIMIT, render_result, summarize
from agentos.sdk import Agent, Context, Message
from agentos.testing import AgentHarness


class Answer(BaseModel):
    id: str
    answer: str
    at: datetime.datetime


@dataclasses.dataclass(frozen=True)
class Reply:
    answer: Answer
    remember: tuple[str, str] | None = None


class Point(msgspec.Struct):
    x: int
    y: int


class Color(enum.Enum):
    BLUE = "blue"


class Opaque:
    def __str__(self) -> str:
        return "opaque!"


WHEN = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.UTC)
ANSWER = Answer(id="1796-0", answer="blue", at=WHEN)
ID = uuid.UUID(int=1)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, ""),
        ("", ""),
        ("hello, world", "hello, world"),
        ('{"already": "json"}', '{"already": "json"}'),  # a str is never re-encoded
        ("naïve\nmulti-line", "naïve\nmulti-line"),
        (0, "0"),
        (1.5, "1.5"),
        (True, "true"),
        (False, "false"),
        ([1, "a", None], '[1,"a",null]'),
        ((1, 2), "[1,2]"),
        ({"b": 1, "a": [True]}, '{"b":1,"a":[true]}'),  # field order kept
        ({1: "one"}, '{"1":"one"}'),
        (ANSWER, '{"id":"1796-0","answer":"blue","at":"2024-05-01T12:00:00Z"}'),
        (
            Reply(ANSWER, ("color", "blue")),
            '{"answer":{"id":"1796-0","answer":"blue","at":"2024-05-01T12:00:00Z"},'
            '"remember":["color","blue"]}',
        ),
        (Point(1, 2), '{"x":1,"y":2}'),
        (
            {"when": WHEN, "id": ID, "c": Color.BLUE},
            f'{{"when":"2024-05-01T12:00:00Z","id":"{ID}","c":"blue"}}',
        ),
        ({"o": Opaque()}, '{"o":"opaque!"}'),  # a part JSON cannot carry: its str()
        (Opaque(), '"opaque!"'),
        ({Opaque(): 1}, '{"opaque!":1}'),
        (b"ab", '"YWI="'),
    ],
)
def test_render_result(value: Any, text: str) -> None:
    assert render_result(value) == text


def test_render_result_of_a_cycle_is_its_str() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    assert render_result(cycle) == "[[...]]"


def test_rendered_data_is_json_a_script_can_parse() -> None:
    assert json.loads(render_result(Reply(ANSWER))) == {
        "answer": {"id": "1796-0", "answer": "blue", "at": "2024-05-01T12:00:00Z"},
        "remember": None,
    }


@pytest.mark.parametrize(
    ("value", "limit", "text"),
    [
        ("x" * 10, 10, "x" * 10),  # exactly the limit: whole
        ("x" * 100, 40, "x" * 5 + "…[truncated; 100 characters in all]"),
        ("x" * 100, 10, "x" * 9 + "…"),  # no room for the marker: an ellipsis
        ("abc", 1, "…"),
        ([1] * 30, 45, "[1,1,1,1,1,…[truncated; 61 characters in all]"),
        ("x" * (DEFAULT_RESULT_LIMIT + 1), DEFAULT_RESULT_LIMIT, None),
    ],
)
def test_render_result_cuts_with_a_marker(value: Any, limit: int, text: str | None) -> None:
    rendered = render_result(value, limit=limit)
    assert len(rendered) <= limit
    if text is not None:
        assert rendered == text
    else:
        assert rendered.endswith(f"…[truncated; {DEFAULT_RESULT_LIMIT + 1:,} characters in all]")


@pytest.mark.parametrize(
    ("text", "width", "cell"),
    [
        ("", 10, ""),
        ("short", 10, "short"),
        ("exactly10!", 10, "exactly10!"),
        ("eleven char", 10, "eleven ch…"),
        ("line one\nline two", 40, "line one line two"),
        ("  tabs\tand   runs \r\n ", 40, "tabs and runs"),
        ("word boundary here", 14, "word boundary…"),
        ("cut at a space after", 9, "cut at a…"),
        ('{"a":1,"b":2}', 8, '{"a":1,…'),
        ("abc", 1, "…"),
    ],
)
def test_summarize(text: str, width: int, cell: str) -> None:
    assert summarize(text, width) == cell
    assert len(summarize(text, width)) <= width
    assert "\n" not in summarize(text, width)


def test_limits_below_one_are_errors() -> None:
    with pytest.raises(ValueError, match="limit"):
        render_result("text", limit=0)
    with pytest.raises(ValueError, match="width"):
        summarize("text", 0)


# -- ctx.set_result ------------------------------------------------------------------------


class Chooser(Agent):
    """Sets its result explicitly when a message asks for it, else returns one."""

    async def act(self, ctx: Context, message: Message) -> str:
        if message.body == "set":
            ctx.set_result(Point(1, 2))
        return "returned"


@pytest.mark.anyio
async def test_set_result_is_kept_for_its_task_only() -> None:
    h = AgentHarness(Chooser)
    assert (h.ctx.has_result, h.ctx.result) == (False, None)
    done = await h.message("set")
    assert done.outcome == "returned"  # act's return value is unchanged...
    assert (h.ctx.has_result, h.ctx.result) == (True, Point(1, 2))  # ...the result is set
    assert render_result(h.ctx.result if h.ctx.has_result else done.outcome) == '{"x":1,"y":2}'
    await h.message("plain")
    assert (h.ctx.has_result, h.ctx.result) == (False, None)  # begin() forgot it
    h.ctx.set_result(None)
    assert (h.ctx.has_result, h.ctx.result) == (True, None)  # None is a result too
