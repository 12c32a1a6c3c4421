"""Provenance of status events: a message must come under the routing key of its source.

Routing keys name their source (``run.<event>.<source>.<run_id>``, ``agent.heartbeat.<agent>``)
so that broker permissions can pin each identity to its own keys. A message whose key does
not match what its body claims (an agent's heartbeat for another agent, an agent forging
the control plane's verdict) is refused by every reader, so the rule holds end to end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from schemas import Message, RunAccepted, RunEnded, RunFailed, RunRejected, RunRetrying
from schemas.topology import CONTROL_SOURCE, MONITOR_SOURCE, event_routing_key
from transport.errors import MessageRejected

from .errors import DispatcherError

#: Events only the control plane publishes.
CONTROL_EVENTS = (RunAccepted, RunRejected, RunRetrying, RunEnded)


class Misrouted(DispatcherError, MessageRejected):
    """A status event came under a routing key that is not its source's (a consumer
    dead-letters it)."""


def expected_key(event: Message) -> str:
    """The one routing key ``event`` may travel under."""
    if isinstance(event, CONTROL_EVENTS):
        return event_routing_key(event, CONTROL_SOURCE)
    if isinstance(event, RunFailed) and event.agent_id is None:
        return event_routing_key(event, MONITOR_SOURCE)
    return event_routing_key(event)


def check(routing_key: str | None, event: Message) -> None:
    """Raise Misrouted unless ``event`` came under its source's routing key."""
    expected = expected_key(event)
    if routing_key != expected:
        raise Misrouted(f"routing key {routing_key!r} is not its source's ({expected!r})")


class Impersonation(DispatcherError, MessageRejected):
    """An agent's event published by another broker identity (a consumer dead-letters it)."""


def sender_check(trusted: Iterable[str]) -> Callable[[str | None, Message], None]:
    """A check of who published a status event: its AMQP ``user_id``, which the broker
    verified against the connection's user.

    An agent's event must come from the agent's own identity or a trusted one (the process's
    own, an operator's); an event of a reserved source (the control plane's verdicts, the
    monitor's decisions) from a trusted identity only. A message without a ``user_id`` is
    refused: topic permissions alone cannot pin an identity to its keys, since a message
    routed into the status exchange through an exchange-to-exchange binding is not checked
    against them."""
    allowed = frozenset(trusted)

    def check_sender(user_id: str | None, event: Message) -> None:
        if user_id is None:
            raise Impersonation(
                "no user_id: the publisher must set it to its connection's user (the broker "
                "checks it), so that readers know who sent a status event"
            )
        if user_id in allowed:
            return
        agent = getattr(event, "agent_id", None)
        if agent is None:
            raise Impersonation(
                f"published by broker user {user_id!r}: only the control plane and the "
                "monitor speak for no agent"
            )
        if user_id != agent:
            raise Impersonation(f"published by broker user {user_id!r}, not by agent {agent!r}")

    return check_sender
