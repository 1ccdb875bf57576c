"""OTLP export in a process of its own, through the SDK's standard exporters.

Encoding spans to protobuf and posting them is pure Python work: on a thread of the
daemon it holds the GIL the event loop needs (measured: 35-55% of a 2-core daemon's task
throughput for one trace per task). So the daemon only queues plain tuples; a thread
pickles them (C code, microseconds per span) in batches of ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``
or every ``OTEL_BSP_SCHEDULE_DELAY`` and writes them into a pipe; this module's
``main``, run as ``python -m agentos.telemetry.export`` with the daemon's environment,
encodes the spans and aggregates the measurements (:mod:`.aggregate`) for the standard
``OTLPSpanExporter`` / ``OTLPMetricExporter`` (HTTP or gRPC, headers, compression,
certificates, timeouts, resource and metric interval all from the ``OTEL_*`` variables).

Nothing here may slow agents: the daemon's queue is bounded (``OTEL_BSP_MAX_QUEUE_SIZE``,
default 16384 here) and drops what does not fit, counting it; a dead or slow collector
fills the exporter's pipe, then that queue, never the event loop. The exporter process
ends when its input closes (the daemon shut down or died): it exports what it holds, then
exits; it ignores SIGINT and SIGTERM, which the daemon's process group also receives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import IO, Any

from agentos.telemetry.spans import Record

log = logging.getLogger("agentos.telemetry")

_HEADER = struct.Struct(">I")
_PIPE_SIZE = 1 << 20  # Linux: room for startup and slow exports before our queue fills


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        value = int(env.get(name, "") or default)
    except ValueError:
        log.warning("%s is not an integer; using %d", name, default)
        return default
    return value if value > 0 else default


class PipeSink:
    """The daemon's side: a bounded queue of records and measurements, a writer thread,
    and the exporter process it writes to."""

    def __init__(self, env: Mapping[str, str], child_env: Mapping[str, str]) -> None:
        self.max_queue = _int_env(env, "OTEL_BSP_MAX_QUEUE_SIZE", 16384)
        self.batch = min(_int_env(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512), self.max_queue)
        self.delay_s = _int_env(env, "OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
        self.dropped = 0
        self.dropped_measurements = 0
        self.sent = 0  # spans written to the exporter process
        self._spans: deque[Record] = deque()
        self._measures: deque[tuple[int, float, Mapping[str, Any] | None]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._dead = False
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentos.telemetry.export"],
            stdin=subprocess.PIPE,
            env=dict(child_env),
            close_fds=True,
        )
        assert self.proc.stdin is not None
        self._out: IO[bytes] = self.proc.stdin
        try:
            import fcntl

            fcntl.fcntl(self._out.fileno(), 1031, _PIPE_SIZE)  # F_SETPIPE_SZ
        except (ImportError, OSError):
            pass
        self._thread = threading.Thread(target=self._run, name="agentos-otel-export", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ hot path

    def emit(self, record: Record) -> None:
        spans = self._spans
        n = len(spans)
        if n >= self.max_queue:
            self._drop()
            return
        spans.append(record)
        if n + 1 == self.batch:
            self._wake.set()

    def measure(self, instrument: int, value: float, attributes: Mapping[str, Any] | None) -> None:
        if len(self._measures) >= self.max_queue:
            self.dropped_measurements += 1
            return
        self._measures.append((instrument, value, attributes))

    def _drop(self, n: int = 1) -> None:
        if not self.dropped:
            log.warning("telemetry queue full (%d spans): dropping spans", self.max_queue)
        self.dropped += n

    # ------------------------------------------------------------ writer thread

    def _run(self) -> None:
        while True:
            self._wake.wait(self.delay_s)
            self._wake.clear()
            stopping = self._stop
            while self._spans or self._measures:
                self._write_one()
            if stopping:
                return

    def _write_one(self) -> None:
        spans, measures = self._spans, self._measures
        part = [spans.popleft() for _ in range(min(self.batch, len(spans)))]
        taken = [measures.popleft() for _ in range(len(measures))]
        if not self._dead:
            data = pickle.dumps((part, taken), protocol=pickle.HIGHEST_PROTOCOL)
            try:
                self._out.write(_HEADER.pack(len(data)))
                self._out.write(data)
                self._out.flush()
                self.sent += len(part)
                return
            except (OSError, ValueError):
                self._dead = True
                log.warning("the telemetry exporter process exited; dropping telemetry from now on")
        self.dropped += len(part)
        self.dropped_measurements += len(taken)

    def shutdown(self, timeout_s: float) -> None:
        """Write what is queued, close the pipe and give the exporter ``timeout_s`` to
        export and exit; kill it after that."""
        deadline = time.monotonic() + timeout_s
        self._stop = True
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(OSError):
            self._out.close()
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("the telemetry exporter did not finish within %.1fs; killed", timeout_s)
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- exporter process


def _read_exactly(stream: IO[bytes], n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = stream.read(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


class Traces:
    """Span export in the exporter process, through the standard exporter.

    With OTLP/HTTP the records are encoded by :class:`~agentos.telemetry.encode.SpanEncoder`
    and posted by the standard exporter's own HTTP client (its endpoint, headers,
    compression, certificates, timeout and retries, all from ``OTEL_*``); otherwise, and
    for records that encoder does not cover, ``ReadableSpan`` go through the exporter's
    ``export`` as usual.
    """

    def __init__(self, exporter: Any, env: Mapping[str, str]) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        from agentos.telemetry.encode import SpanEncoder
        from agentos.telemetry.otlp import SCHEMA_URL, Converter

        self.exporter = exporter
        self._converter = Converter(env)
        self.client: Any = None
        client = getattr(exporter, "_client", None)
        limits = self._converter.limits
        if (
            isinstance(exporter, OTLPSpanExporter)
            and callable(getattr(client, "export", None))
            and limits.max_span_attribute_length is None
        ):
            try:
                self.encoder = SpanEncoder(
                    self._converter.resource,
                    "agentos",
                    SCHEMA_URL,
                    limits.max_span_attributes or (1 << 31),
                )
                self.client = client
            except (TypeError, ValueError) as e:
                log.warning("spans are encoded by the SDK (%s)", e)

    def export(self, records: list[Record]) -> None:
        rest = records
        if self.client is not None:
            encoded, rest = [], []
            for r in records:
                data = self.encoder.span(r)
                if data is None:
                    rest.append(r)
                else:
                    encoded.append(data)
            if encoded:
                self.client.export(self.encoder.request(encoded))  # it logs its failures
        if rest:
            self.exporter.export([self._converter.span(r) for r in rest])

    def shutdown(self) -> None:
        self.exporter.shutdown()


def main() -> None:
    """Read batches from stdin and export them until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Background work: on a busy machine the agents' CPU comes first; when export falls
    # behind, the pipe and then the daemon's bounded queue absorb it, or drop.
    with contextlib.suppress(OSError):
        os.nice(10)
    logging.basicConfig(level=logging.WARNING, format="agentos-otel-export: %(message)s")
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from agentos.telemetry.aggregate import Aggregator, Periodic
    from agentos.telemetry.otlp import SCHEMA_URL, otlp_exporters, resource

    env = os.environ
    span_exporter, metric_exporter = otlp_exporters(env)
    traces = Traces(span_exporter, env) if span_exporter is not None else None
    metrics = None
    if metric_exporter is not None:
        interval = _int_env(env, "OTEL_METRIC_EXPORT_INTERVAL", 15000)
        scope = InstrumentationScope("agentos", None, SCHEMA_URL)
        aggregator = Aggregator(metric_exporter, resource(env), scope, time.time_ns())
        metrics = Periodic(aggregator, interval / 1000)
    stdin = sys.stdin.buffer
    try:
        while (header := _read_exactly(stdin, _HEADER.size)) is not None:
            data = _read_exactly(stdin, _HEADER.unpack(header)[0])
            if data is None:
                break
            spans, measures = pickle.loads(data)
            if spans and traces is not None:
                try:
                    traces.export(spans)
                except Exception:
                    log.exception("span export failed")
            if metrics is not None and measures:
                try:
                    metrics.aggregator.add(measures)
                except Exception:  # an unhashable attribute value: lose the batch, not the process
                    log.exception("metric aggregation failed")
    finally:
        if metrics is not None:
            metrics.stop()
        if traces is not None:
            traces.shutdown()


if __name__ == "__main__":
    main()
