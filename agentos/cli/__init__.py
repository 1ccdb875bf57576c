"""The `agentos` command: how operators run the daemon and look at the fleet.

Every command is a thin shell over :class:`agentos.client.Client` or
:class:`agentos.daemon.Daemon`. Settings come from flags and ``AGENTOS_*`` variables
here and nowhere else. Exit codes: 0 ok, 1 failure (Redis away, unknown agent, ...),
2 usage or validation error. Errors are one plain sentence; ``--debug`` adds the
traceback.

The package splits it by job: :mod:`~agentos.cli.common` (consoles, output modes,
errors), :mod:`~agentos.cli.render` (tables and text), :mod:`~agentos.cli.fleet`,
:mod:`~agentos.cli.tasks`, :mod:`~agentos.cli.quota` and :mod:`~agentos.cli.evaluate`
(the commands), :mod:`~agentos.cli.launch` (``daemon`` and ``up``'s flags) and
:mod:`~agentos.cli.serve` (the process they run). This module builds the app from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from agentos.cli import (
    evaluate,
    fleet,
    launch,
    logs,
    models,
    quota,
    restart,
    tasks,
    toolservers,
    waits,
)
from agentos.cli.common import STATE
from agentos.settings import Settings

__all__ = ["app", "main"]

app = typer.Typer(
    name="agentos",
    help="Run and operate fleets of always-on LLM agents.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        fleet.version()
        raise typer.Exit()


@app.callback()
def _main(
    redis: Annotated[
        str | None,
        typer.Option(
            "--redis",
            envvar="AGENTOS_REDIS_URL",
            help="Redis URL (redis://, rediss://, unix://; redis+cluster:// or "
            "rediss+cluster:// for a Redis Cluster). Default: the embedded server "
            "that `agentos up` starts under AGENTOS_HOME.",
            show_envvar=True,
        ),
    ] = None,
    namespace: Annotated[
        str,
        typer.Option(envvar="AGENTOS_NAMESPACE", help="Key prefix of this fleet in Redis."),
    ] = "agentos",
    home: Annotated[
        Path | None,
        typer.Option(envvar="AGENTOS_HOME", help="agentos home folder (default ~/.agentos)."),
    ] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks and debug logs.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_print_version,
            help="Print the agentos version and exit.",
        ),
    ] = False,
) -> None:
    settings = Settings.from_env({}, redis_url=redis, namespace=namespace, home=home)
    STATE.settings = settings
    STATE.debug = debug


# In the order `agentos --help` lists them.
for _cmd in (
    fleet.apply,
    quota.quota,
    fleet.get,
    fleet.ps,
    fleet.describe,
    fleet.events,
    logs.logs,
    tasks.send,
    tasks.tasks,
    waits.pending,
    waits.answer,
    waits.event,
    quota.usage,
    evaluate.eval_tasks,
    fleet.hibernate,
    fleet.wake,
    restart.restart,
    fleet.schema,
    fleet.version,
    launch.daemon,
    launch.up,
):
    app.command(name="eval" if _cmd is evaluate.eval_tasks else None)(_cmd)
fleet.delete_app.command("model")(models.delete_model)
fleet.delete_app.command("toolserver")(toolservers.delete_toolserver)
app.add_typer(fleet.delete_app, name="delete")
app.add_typer(quota.policy_app, name="policy")
app.add_typer(restart.rollout_app, name="rollout")


def main() -> None:
    """Console-script entry point."""
    app()
