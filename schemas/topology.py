"""Names of every exchange, queue and routing key: the broker half of the wire contract.

Pure names, no client library: a script that submits work needs only these and the codec.
Declaring them is the job of ``dispatcher.amqp.declare_topology``.
"""

from __future__ import annotations

from typing import Final

from .messages import Message

#: Direct exchange for SubmitRun / CancelRun; its one queue is consumed by the control plane.
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

#: Topic exchange for run events (``run.<event>``) and heartbeats (``agent.heartbeat``).
STATUS_EXCHANGE: Final = "hd.status"
#: The control plane's queue on the status exchange (applies events to PostgreSQL).
STATUS_STORE_QUEUE: Final = "hd.status.store"
#: The failure monitor's queue on the status exchange.
STATUS_MONITOR_QUEUE: Final = "hd.status.monitor"
HEARTBEAT_ROUTING_KEY: Final = "agent.heartbeat"

#: Fanout exchange and queue for poison messages; the reason travels in headers.
DEAD_LETTER_EXCHANGE: Final = "hd.dead-letters"
DEAD_LETTER_QUEUE: Final = "hd.dead-letters"
#: Headers a dead-lettered message carries.
DEAD_LETTER_REASON_HEADER: Final = "x-hd-reason"
DEAD_LETTER_QUEUE_HEADER: Final = "x-hd-source-queue"

#: Default agent queue name.
DEFAULT_AGENT_QUEUE: Final = "default"

_EVENT_KEYS: Final = {
    "RunLaunched": "run.launched",
    "RunStarted": "run.started",
    "RunSucceeded": "run.succeeded",
    "RunFailed": "run.failed",
    "RunLog": "run.log",
    "RunProgress": "run.progress",
    "RunAccepted": "run.accepted",
    "RunRejected": "run.rejected",
    "LocationLoaded": "location.loaded",
    "LocationFailed": "location.failed",
    "AgentHeartbeat": HEARTBEAT_ROUTING_KEY,
}


def control_queue(agent_id: str) -> str:
    """The queue of instructions for one agent, whatever queues it consumes."""
    return f"hd.control.{agent_id}"


def instructions_queue(agent_queue: str) -> str:
    """The quorum queue holding instructions for agents consuming ``agent_queue``."""
    return f"hd.instructions.{agent_queue}"


def event_routing_key(message: Message) -> str:
    """Routing key of a status event on the status exchange."""
    kind = str(type(message).__struct_config__.tag)
    try:
        return _EVENT_KEYS[kind]
    except KeyError:
        raise ValueError(f"{kind} is not a status event") from None
