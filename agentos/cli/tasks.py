"""The commands on an agent's tasks: sending it a message and following what it does.

``send`` (with ``--wait``, the task's result) and ``tasks`` (recent tasks, dead letters,
and ``tasks cancel|drop|retry``). Each is a thin shell over one
:class:`agentos.client.Client` call; :mod:`agentos.cli` registers them on the app.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

import anyio
import typer

from agentos.cli.common import (
    AgentArg,
    Output,
    OutputOpt,
    _client,
    _emit,
    _fail,
    _print_text,
    _run,
    err,
    out,
    printable,
)
from agentos.cli.render import _dead_table, _task_line, _tasks_table
from agentos.cli.waits import _who
from agentos.client import Client, read_message_arg
from agentos.core.durations import parse_duration
from agentos.core.machine import machine_record
from agentos.core.taskview import DONE, describe_view

__all__ = ["send", "tasks"]


def send(
    name: AgentArg,
    message: Annotated[str, typer.Argument(help="The text; @FILE reads a file, - reads stdin.")],
    key: Annotated[
        str | None, typer.Option(help="Idempotency key: a message with a key is run once.")
    ] = None,
    traceparent: Annotated[
        str | None, typer.Option(help="W3C traceparent to continue the sender's trace.")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the task and print its result.")] = False,
    timeout: Annotated[str, typer.Option(help="How long --wait waits.")] = "60s",
    wait_answer: Annotated[
        bool,
        typer.Option(
            help="With --wait: keep waiting while the task waits for an answer (it prints "
            "the question and the `agentos answer` command), or return then."
        ),
    ] = True,
    output: Annotated[
        Output,
        typer.Option(
            "--output", "-o", help="table: the result as stored; json|yaml: the task record."
        ),
    ] = Output.table,
) -> None:
    """Put a message in an agent's inbox; with --wait, print the task's result."""
    try:
        timeout_s = parse_duration(timeout)
    except ValueError as e:
        _fail(f"--timeout: {e}", 2)
    try:
        body = read_message_arg(message)
    except OSError as e:
        _fail(f"cannot read message file: {e}", 2)

    async def go() -> None:
        async with await _client() as client:
            msg_id = await client.send(name, body, key=key, traceparent=traceparent)
            if not wait:
                sent = {"agent": name, "messageId": msg_id, "taskId": f"m-{msg_id}"}
                _emit(sent, output, lambda: f"sent {msg_id} to {name}")
                return
            task = f"m-{msg_id}"

            async def changed(view: dict[str, Any]) -> None:
                if view["status"] in ("waiting", "retrying", "parked"):
                    err.print(printable(describe_view(view)), markup=False)

            record = await client.wait_task(
                name, task, timeout_s=timeout_s, on_change=changed, until_waiting=not wait_answer
            )
            if record.get("status") == "waiting":  # --no-wait-answer
                if output is not Output.table:
                    _emit(await client.task_view(name, task), output, lambda: "")
                return
        if output is not Output.table:
            _emit(machine_record(record), output, lambda: "")
        if record.get("status") == "failed":
            _fail(f"task m-{msg_id} failed: {record.get('error', '')}")
        if output is Output.table:
            _print_text(record.get("result", ""))

    _run(go)


_TASK_ACTIONS = ("drop", "retry", "cancel")
_CANCEL_WAIT_S = 10.0  # how long `tasks cancel` waits to see the task end


def tasks(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="NAME | cancel NAME TASK | drop NAME TASK | retry NAME TASK",
            help="An agent (every agent if left out); or `cancel NAME TASK` to end a "
            "queued, running or waiting task (cancelled: not retried, not a crash), "
            "`drop NAME TASK` to remove a poison message for good (waiting in the inbox "
            "or a dead letter), `retry NAME TASK` to send a dead letter again.",
            show_default=False,
        ),
    ] = None,
    dead: Annotated[
        bool,
        typer.Option(
            "--dead", help="List the agent's dead letters (messages that failed too often)."
        ),
    ] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep refreshing.")] = False,
    count: Annotated[int, typer.Option("--count", "-n", min=1, max=10_000)] = 20,
    as_: Annotated[
        str | None,
        typer.Option("--as", help="Who cancels, drops or retries (default: the OS user)."),
    ] = None,
    reason: Annotated[
        str, typer.Option("--reason", help="Why (cancel: kept with the task's event).")
    ] = "",
    output: OutputOpt = Output.table,
) -> None:
    """Recent tasks (one per wake-up) with their trigger, status, attempt and result;
    dead letters with --dead; `tasks cancel` to end a task; `tasks drop` and `tasks
    retry` for poison messages."""
    words = list(args or [])
    if len(words) == 3 and words[0] in _TASK_ACTIONS:
        return _task_action(*words, by=_who(as_), output=output, reason=reason)
    if len(words) > 1:
        _fail(
            "usage: agentos tasks [NAME] | tasks cancel|drop|retry NAME TASK",
            2,
        )
    name = words[0] if words else None
    if dead:
        if name is None:
            _fail("--dead needs an agent: agentos tasks NAME --dead", 2)
        return _dead_letters(name, count, output)

    async def go() -> None:
        async with await _client() as client:
            seen: dict[str, str] = {}
            while True:
                rows = await client.tasks(name, count=count)
                if not follow:
                    _emit([machine_record(r) for r in rows], output, partial(_tasks_table, rows))
                    return
                for row in reversed(rows):
                    key = row.get("id", "")
                    if seen.get(key) != row.get("status"):
                        seen[key] = row.get("status", "")
                        out.print(_task_line(row), markup=False)
                await anyio.sleep(1)

    _run(go)


def _task_action(
    action: str, name: str, task: str, *, by: str, output: Output, reason: str = ""
) -> None:
    async def go() -> None:
        async with await _client() as client:
            if action == "cancel":
                who = f"{by} ({reason})" if reason else by
                where = await client.cancel_task(name, task, by=who, reason=reason)
                status = await _settled_status(client, name, task)
                done = {"agent": name, "task": task, "was": where, "status": status}
                text = (
                    f"task {task} of {name} cancelled"
                    if status == "cancelled"
                    else f"task {task} of {name}: cancel requested (it was {where}; "
                    f"status {status} so far)"
                )
            elif action == "drop":
                where = await client.drop(name, task, by=by)
                done = {"agent": name, "task": task, "droppedFrom": where}
                text = f"task {task} of {name} dropped (from the {where})"
            else:
                msg_id = await client.retry_dead(name, task, by=by)
                done = {"agent": name, "task": task, "messageId": msg_id, "taskId": f"m-{msg_id}"}
                text = f"task {task} of {name} sent again as m-{msg_id}"
        _emit(done, output, lambda: printable(text))

    _run(go)


async def _settled_status(client: Client, name: str, task: str) -> str:
    """The task's status once it has ended, or as it is after a few seconds."""
    status = ""
    with anyio.move_on_after(_CANCEL_WAIT_S):
        while True:
            status = (await client.store.tasks.get(name, task)).get("status", "")
            if status in DONE:
                break
            await anyio.sleep(0.1)
    return status


def _dead_letters(name: str, count: int, output: Output) -> None:
    async def go() -> None:
        async with await _client() as client:
            letters = await client.dead_letters(name, count=count)
        _emit([machine_record(d) for d in letters], output, partial(_dead_table, letters))

    _run(go)
