"""Prometheus: the metrics both sides export under one name, and the ``/metrics`` server.

A metric's name is registered once per interpreter, so a metric that the control plane and
the agent both export is defined here, once; each side's own ``metrics`` module lists what it
exports, and defines the rest.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram, start_http_server

from .errors import PortUnavailable

log = logging.getLogger(__name__)

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


def serve_metrics(port: int, address: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``port``; 0 serves nothing."""
    if not 0 <= port <= 65535:
        raise PortUnavailable(f"--metrics-port {port} is no port: give 1 to 65535, or 0 for none")
    if port:
        try:
            start_http_server(port, addr=address)
        except OSError as exc:
            raise PortUnavailable(
                f"cannot serve metrics on port {port} ({exc.strerror}): another process uses "
                "it; pass --metrics-port with a free port, or 0 for none"
            ) from None
        log.info("metrics at http://%s:%d/metrics", address, port)
