"""The ops/ files parse and hang together (no Docker here to run them)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

OPS = Path(__file__).resolve().parents[3] / "ops"


def test_collector_pipelines_use_defined_components() -> None:
    config = yaml.safe_load((OPS / "otel-collector.yaml").read_text())
    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for name in pipeline.get(kind, []):
                assert name in config[kind], f"{kind} {name} is used but not defined"
    assert set(config["service"]["pipelines"]) == {"traces", "metrics"}


def test_compose_wires_the_daemon_to_the_collector() -> None:
    compose = yaml.safe_load((OPS / "compose.yaml").read_text())
    services = compose["services"]
    assert {"agentos", "otel-collector", "jaeger", "prometheus", "grafana", "redis"} <= set(
        services
    )
    env = services["agentos"]["environment"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://otel-collector:")
    prometheus = yaml.safe_load((OPS / "prometheus.yaml").read_text())
    assert "otel-collector:8889" in prometheus["scrape_configs"][0]["static_configs"][0]["targets"]


def test_dashboard_queries_metrics_the_daemon_exports() -> None:
    dashboard = json.loads((OPS / "grafana" / "dashboards" / "agentos.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (
        "agentos_tasks_total",
        "gen_ai_client_token_usage",
        "agentos_wake_duration_seconds_bucket",
        "agentos_quota_throttles_total",
        "agentos_agent_active_time_seconds_total",
    ):
        assert metric in exprs
    assert {p["id"] for p in dashboard["panels"]} == set(range(1, len(dashboard["panels"]) + 1))


def test_systemd_unit_runs_the_daemon() -> None:
    unit = (OPS / "agentos.service").read_text()
    assert "ExecStart=" in unit
    assert "agentos daemon" in unit
    assert "KillSignal=SIGTERM" in unit
