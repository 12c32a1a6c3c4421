"""Prometheus metrics of every process, served at ``/metrics`` when a port is given."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

AGENTS_ALIVE = Gauge("hd_agents_alive", "Agents whose heartbeats arrive (failure monitor's view).")
AGENTS_LOST = Gauge("hd_agents_lost", "Agents declared lost and not back.")
RUNS = Gauge("hd_runs", "Runs by state, as PostgreSQL holds them.", ["state"])
DETECTION = Histogram(
    "hd_failure_detection_seconds",
    "From the last sign of life to the failure being acted on (agent lost, container exit).",
    ["kind"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 6, 8, 10, 15, 30, 60),
)
DEAD_LETTERED = Counter(
    "hd_messages_dead_lettered_total", "Messages sent to the dead-letter queue.", ["queue"]
)
LAUNCHES = Counter(
    "hd_launches_total",
    "Launches: LaunchRun published (control plane), containers started (agent).",
)
DEAD_LETTERS_SEEN = Counter(
    "hd_dead_letters_seen_total",
    "Dead letters the control plane counted, by the queue they came from (broker's included).",
    ["queue"],
)
DECISIONS = Counter(
    "hd_monitor_decisions_total", "Failures decided by the monitor, by reason.", ["reason"]
)


def serve_metrics(port: int, address: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``port``; 0 serves nothing."""
    if port:
        try:
            start_http_server(port, addr=address)
        except OSError as exc:
            from .errors import ConfigError

            raise ConfigError(
                f"cannot serve metrics on port {port} ({exc.strerror}): another process uses "
                "it; pass --metrics-port with a free port, or 0 for none"
            ) from None
        log.info("metrics at http://%s:%d/metrics", address, port)
