"""Names of every exchange, queue and routing key: the broker half of the wire contract.

Pure names, no client library: a script that submits work needs only these and the codec.
Declaring them is the job of ``transport.topology.declare_topology``.

Every status event's routing key names its source, so that the broker can hold each identity
to its own keys (a topic permission per agent) and a consumer can bind only what it follows:

- run events: ``run.<event>.<source>.<run_id>``, ``<event>`` one of claimed, launched, started,
  succeeded, failed, log, progress (from agents), accepted, rejected, retrying, ended (from the
  control plane);
- heartbeats: ``agent.heartbeat.<agent_id>``;
- location events: ``location.<event>.<agent_id>``, ``<event>`` one of loaded, failed.

A source is an agent id (a safe name, see ``schemas.bounds.SAFE_NAME_PATTERN``), or one of the
reserved sources, which start with ``_`` so that no agent id can take them: CONTROL_SOURCE for
the control plane's answers and verdicts, MONITOR_SOURCE for the failure monitor's own
RunFailed decisions. Neither part of a key can hold ``.``, ``*`` or ``#``.
"""

from __future__ import annotations

import uuid
from typing import Final

from .bounds import is_safe_name
from .envelope import Message, RunMessage, kind_of

#: Direct exchange for requests (SubmitRun, CancelRun, RunStateWanted, LocationsWanted); its
#: one queue is consumed by the control plane.
REQUESTS_EXCHANGE: Final = "hd.requests"
REQUESTS_QUEUE: Final = "hd.requests"
REQUESTS_ROUTING_KEY: Final = "request"

#: Direct exchange for LaunchRun / TerminateRun; routing key = agent queue name.
INSTRUCTIONS_EXCHANGE: Final = "hd.instructions"

#: Direct exchange for instructions to one agent (TerminateRun), routing key = agent id.
CONTROL_EXCHANGE: Final = "hd.control"

#: Direct exchange for location snapshots, routing key = agent queue. Every agent binds a
#: queue of its own, so that each replica (not one of them) receives the snapshot.
LOCATIONS_EXCHANGE: Final = "hd.locations"

#: Topic exchange for status events; see the module docstring for the keys.
STATUS_EXCHANGE: Final = "hd.status"
#: The control plane's queue on the status exchange (applies events to PostgreSQL).
STATUS_STORE_QUEUE: Final = "hd.status.store"
#: The failure monitor's queue on the status exchange.
STATUS_MONITOR_QUEUE: Final = "hd.status.monitor"

#: Binding patterns on the status exchange.
RUN_EVENTS: Final = "run.#"
AGENT_EVENTS: Final = "agent.#"
LOCATION_EVENTS: Final = "location.#"

#: Source of the control plane's run events: accepted, rejected, retrying, ended.
CONTROL_SOURCE: Final = "_control"
#: Source of the failure monitor's own RunFailed decisions.
MONITOR_SOURCE: Final = "_monitor"
RESERVED_SOURCES: Final = frozenset({CONTROL_SOURCE, MONITOR_SOURCE})

#: Fanout exchange and queue for poison messages; the reason travels in headers.
DEAD_LETTER_EXCHANGE: Final = "hd.dead-letters"
DEAD_LETTER_QUEUE: Final = "hd.dead-letters"
#: The control plane's own queue of dead letters (the one above is the operators').
DEAD_LETTER_WATCH_QUEUE: Final = "hd.dead-letters.watch"
#: Headers a dead-lettered message carries.
DEAD_LETTER_REASON_HEADER: Final = "x-hd-reason"
DEAD_LETTER_QUEUE_HEADER: Final = "x-hd-source-queue"

#: Default agent queue name.
DEFAULT_AGENT_QUEUE: Final = "default"

_RUN_EVENTS: Final = {
    "RunClaimed": "claimed",
    "RunLaunched": "launched",
    "RunStarted": "started",
    "RunSucceeded": "succeeded",
    "RunFailed": "failed",
    "RunLog": "log",
    "RunProgress": "progress",
    "RunAccepted": "accepted",
    "RunRejected": "rejected",
    "RunRetrying": "retrying",
    "RunEnded": "ended",
}
_LOCATION_EVENTS: Final = {"LocationLoaded": "loaded", "LocationFailed": "failed"}


def _safe(name: str, what: str) -> str:
    if not is_safe_name(name):
        raise ValueError(f"{what} {name!r} is not a safe name (letters, digits, '_', '-')")
    return name


def control_queue(agent_id: str) -> str:
    """The queue of instructions for one agent, whatever queues it consumes."""
    return f"hd.control.{_safe(agent_id, 'agent id')}"


def instructions_queue(agent_queue: str) -> str:
    """The quorum queue holding instructions for agents consuming ``agent_queue``."""
    return f"hd.instructions.{_safe(agent_queue, 'agent queue')}"


def heartbeat_routing_key(agent_id: str) -> str:
    """Routing key of an agent's heartbeats."""
    return f"agent.heartbeat.{_safe(agent_id, 'agent id')}"


def follow_pattern(run_id: uuid.UUID) -> str:
    """Binding pattern for every event of one run, whatever its source."""
    return f"run.*.*.{run_id}"


def event_routing_key(message: Message, source: str | None = None) -> str:
    """Routing key of a status event; ``source`` defaults to the message's ``agent_id``.

    Raises ValueError for a message that is not a status event, for a missing source, and
    for a source that is neither a safe name nor a reserved source.
    """
    kind = kind_of(message)
    if kind not in _RUN_EVENTS and kind not in _LOCATION_EVENTS and kind != "AgentHeartbeat":
        raise ValueError(f"{kind} is not a status event")
    if source is None:
        source = getattr(message, "agent_id", None)
        if source is None:
            raise ValueError(f"this {kind} carries no agent_id: name its source")
    if source not in RESERVED_SOURCES:
        _safe(source, "source")
    if isinstance(message, RunMessage):
        return f"run.{_RUN_EVENTS[kind]}.{source}.{message.run_id}"
    if kind in _LOCATION_EVENTS:
        return f"location.{_LOCATION_EVENTS[kind]}.{source}"
    return f"agent.heartbeat.{source}"
