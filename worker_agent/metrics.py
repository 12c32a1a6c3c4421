"""Prometheus metrics of the agent, served at ``/metrics`` when a port is given.

The agent exports these only: containers started (``LAUNCHES``), messages it dead-lettered
(``DEAD_LETTERED``, counted by the transport's publisher) and the time from a container's
exit to its report (``DETECTION``, kind ``container_exit``). The control plane exports the
same three under the same names, so they are defined once, in ``transport.metrics``.
"""

from __future__ import annotations

from transport.metrics import DEAD_LETTERED, DETECTION, LAUNCHES

__all__ = ["DEAD_LETTERED", "DETECTION", "LAUNCHES"]
