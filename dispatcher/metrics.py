"""Prometheus metrics of the control plane and the failure monitor, served at ``/metrics``
when a port is given (``transport.metrics.serve_metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from transport.metrics import DEAD_LETTERED, DETECTION, LAUNCHES

__all__ = [
    "AGENTS_ALIVE",
    "AGENTS_LOST",
    "DEAD_LETTERED",
    "DEAD_LETTERS_SEEN",
    "DECISIONS",
    "DETECTION",
    "LAUNCHES",
    "RUNS",
]

AGENTS_ALIVE = Gauge("hd_agents_alive", "Agents whose heartbeats arrive (failure monitor's view).")
AGENTS_LOST = Gauge("hd_agents_lost", "Agents declared lost and not back.")
MONITOR_LAG = Gauge(
    "hd_monitor_lag_seconds",
    "How late the failure monitor reads heartbeats (a backed-up queue); silence counts beyond it.",
)
RUNS = Gauge("hd_runs", "Runs by state, as PostgreSQL holds them.", ["state"])
DEAD_LETTERS_SEEN = Counter(
    "hd_dead_letters_seen_total",
    "Dead letters the control plane counted, by the queue they came from (broker's included).",
    ["queue"],
)
DECISIONS = Counter(
    "hd_monitor_decisions_total", "Failures decided by the monitor, by reason.", ["reason"]
)
