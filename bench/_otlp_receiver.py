"""A small OTLP/HTTP receiver, run as its own process, for the tracing benchmark.

A real collector runs beside the daemon, not inside it; a receiver in the benchmark's
own process would bill its HTTP parsing and protobuf decoding to the daemon's event
loop. This one accepts ``POST /v1/traces``, ``/v1/metrics`` and ``/v1/logs`` (protobuf,
gzip or not), answers 200 at once, keeps the bodies, and decodes them only when asked:
``GET /stats`` returns the spans received, by name, the attribute keys seen per span
name and the metric names, as JSON; ``POST /reset`` forgets everything.

Usage: ``python _otlp_receiver.py`` prints ``port N`` on stdout once it listens on a
free loopback port, and serves until stdin closes or it is terminated.
"""

from __future__ import annotations

import gzip
import json
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

_lock = threading.Lock()
_bodies: dict[str, list[bytes]] = {"traces": [], "metrics": [], "logs": []}


def _decode(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    return body


def stats() -> dict[str, object]:
    """What arrived so far, decoded."""
    with _lock:
        traces, metrics, logs = (list(_bodies[k]) for k in ("traces", "metrics", "logs"))
    by_name: dict[str, int] = {}
    keys: dict[str, set[str]] = {}
    traces_seen: set[bytes] = set()
    for body in traces:
        for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    by_name[span.name] = by_name.get(span.name, 0) + 1
                    keys.setdefault(span.name, set()).update(a.key for a in span.attributes)
                    traces_seen.add(span.trace_id)
    metric_names: set[str] = set()
    # Per metric, the largest total one request carried (histogram counts, sum values):
    # with cumulative temporality, the last export's totals.
    totals: dict[str, float] = {}
    for body in metrics:
        for rm in ExportMetricsServiceRequest.FromString(body).resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    metric_names.add(m.name)
                    if m.HasField("histogram"):
                        total = float(sum(p.count for p in m.histogram.data_points))
                    else:
                        total = sum(p.as_double or p.as_int for p in m.sum.data_points)
                    totals[m.name] = max(totals.get(m.name, 0.0), total)
    return {
        "spans": sum(by_name.values()),
        "traces": len(traces_seen),
        "spans_by_name": by_name,
        "attributes_by_name": {k: sorted(v) for k, v in keys.items()},
        "trace_posts": len(traces),
        "metric_posts": len(metrics),
        "log_posts": len(logs),
        "metrics": sorted(metric_names),
        "metric_totals": totals,
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the exporter reuses its connection

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        signal = self.path.rstrip("/").rsplit("/", 1)[-1]
        if self.path == "/reset":
            with _lock:
                for v in _bodies.values():
                    v.clear()
            self._reply(200, b"{}", "application/json")
            return
        if not self.path.startswith("/v1/") or signal not in _bodies:
            self._reply(404, b"", "text/plain")
            return
        data = _decode(body, self.headers.get("Content-Encoding", ""))
        with _lock:
            _bodies[signal].append(data)
        # An empty Export*ServiceResponse: full success.
        self._reply(200, b"", "application/x-protobuf")

    def do_GET(self) -> None:
        if self.path != "/stats":
            self._reply(404, b"", "text/plain")
            return
        self._reply(200, json.dumps(stats()).encode(), "application/json")


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"port {server.server_address[1]}", flush=True)
    sys.stdin.read()  # the parent closes our stdin (or exits) to stop us
    server.shutdown()


if __name__ == "__main__":
    main()
