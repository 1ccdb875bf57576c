"""OpenTelemetry traces and metrics for agent tasks; the only package that imports opentelemetry.

One trace per task: a root span ``invoke_agent {agent}`` with children ``observe``,
``plan``, ``act``, ``learn``, an inference span ``{operation} {model}`` per model call,
``execute_tool {tool}`` for tools and ``agentos.hibernate`` / ``agentos.wake`` spans.
Attribute and metric names follow the OpenTelemetry GenAI semantic conventions as of
semantic-conventions 1.37 (status: Development; ``gen_ai.*``), the version pinned by
``opentelemetry-semantic-conventions`` 0.58b0 and newer.

They are spans of the standard SDK (``TracerProvider``), and each is the current span of
the OpenTelemetry context while the code inside it runs: a span that a library opens with
the global tracer API (httpx, a database driver, the MCP client, instrumented by the
user) inside an agent's ``act`` is a child of that ``act``, and a ``traceparent`` sent on
(:meth:`Telemetry.current_traceparent`, :meth:`Telemetry.inject`) names the current span.
A daemon that exports sets its providers as the global ones unless some were set before,
so those libraries' spans and metrics leave through the same exporters.

Export is configured only by the standard ``OTEL_*`` variables (:mod:`.otlp`): with
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the per-signal ``..._TRACES_ENDPOINT`` /
``..._METRICS_ENDPOINT``) spans and metrics go out by OTLP, over HTTP/protobuf unless
``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``; headers, service name, resource attributes,
batching (``OTEL_BSP_*``) and sampler (``OTEL_TRACES_SAMPLER``) come from their
variables too. ``--otel console`` prints to stderr for development; with nothing
configured nothing is exported and every span is the same no-op object.

Export runs off the agents' path, in the SDK's ``BatchSpanProcessor`` and
``PeriodicExportingMetricReader`` threads: a dead or slow collector fills a bounded queue
and drops telemetry (counted in ``agentos.telemetry.spans_dropped``, :mod:`.export`), it
never blocks agents. Message content is recorded only when
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` is ``true``.

The package splits it by job: :mod:`.recorder` (the :class:`Telemetry` object passed
down), :mod:`.spans` (the spans and the current-context helpers), :mod:`.configure`
(providers from the environment, the heap), :mod:`.otlp` (what the ``OTEL_*`` variables
say, the instruments) and :mod:`.export` (the batch export, its drops counted).
"""

from agentos.telemetry.configure import GC_GEN0_THRESHOLD as GC_GEN0_THRESHOLD
from agentos.telemetry.configure import settle_heap
from agentos.telemetry.otlp import DURATION_BUCKETS as DURATION_BUCKETS
from agentos.telemetry.otlp import SEMCONV_VERSION as SEMCONV_VERSION
from agentos.telemetry.otlp import TOKEN_BUCKETS as TOKEN_BUCKETS
from agentos.telemetry.recorder import Telemetry
from agentos.telemetry.spans import NOOP_SPAN, Inference
from agentos.telemetry.spans import clean as clean

__all__ = ["NOOP_SPAN", "Inference", "Telemetry", "settle_heap"]
