"""Declaring the project's exchanges and queues, idempotently.

The names come from ``schemas.topology``; the queue arguments (quorum queues, the monitor's
bound, the expiry of control queues) are set here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import aio_pika
import aio_pika.abc
from pamqp.common import Arguments

from schemas.topology import (
    AGENT_EVENTS,
    CONTROL_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_WATCH_QUEUE,
    INSTRUCTIONS_EXCHANGE,
    LOCATION_EVENTS,
    LOCATIONS_EXCHANGE,
    REQUESTS_EXCHANGE,
    REQUESTS_QUEUE,
    REQUESTS_ROUTING_KEY,
    RUN_EVENTS,
    STATUS_EXCHANGE,
    STATUS_MONITOR_QUEUE,
    STATUS_STORE_QUEUE,
    control_queue,
    instructions_queue,
)

from .connection import REFUSED, TRANSIENT, Connection
from .errors import BrokerRefused, BrokerUnavailable

log = logging.getLogger(__name__)

_QUORUM: Arguments = {"x-queue-type": "quorum"}


async def declare_topology(
    channel: aio_pika.abc.AbstractChannel, agent_queues: Sequence[str] = ()
) -> None:
    """Declare every exchange and queue of the project; safe to call any number of times."""
    direct, topic, fanout = (
        aio_pika.ExchangeType.DIRECT,
        aio_pika.ExchangeType.TOPIC,
        aio_pika.ExchangeType.FANOUT,
    )
    dead = await channel.declare_exchange(DEAD_LETTER_EXCHANGE, fanout, durable=True)
    dead_queue = await channel.declare_queue(DEAD_LETTER_QUEUE, durable=True, arguments=_QUORUM)
    await dead_queue.bind(dead, routing_key="")

    requests = await channel.declare_exchange(REQUESTS_EXCHANGE, direct, durable=True)
    requests_queue = await channel.declare_queue(REQUESTS_QUEUE, durable=True, arguments=_QUORUM)
    await requests_queue.bind(requests, routing_key=REQUESTS_ROUTING_KEY)

    await channel.declare_exchange(INSTRUCTIONS_EXCHANGE, direct, durable=True)
    await channel.declare_exchange(CONTROL_EXCHANGE, direct, durable=True)
    await channel.declare_exchange(LOCATIONS_EXCHANGE, direct, durable=True)
    for agent_queue in agent_queues:
        await declare_instructions_queue(channel, agent_queue)

    status = await channel.declare_exchange(STATUS_EXCHANGE, topic, durable=True)
    # The failure monitor's queue is declared by the monitor itself: declared here, it would
    # fill up with heartbeats wherever no monitor runs.
    store_queue = await channel.declare_queue(STATUS_STORE_QUEUE, durable=True, arguments=_QUORUM)
    for pattern in (RUN_EVENTS, AGENT_EVENTS, LOCATION_EVENTS):
        await store_queue.bind(status, routing_key=pattern)
    # The control plane's own copy of every dead letter: counted, alerted on, and a dead
    # LaunchRun fails its run. The operators' queue above is bounded and only listed.
    watch = await channel.declare_queue(DEAD_LETTER_WATCH_QUEUE, durable=True, arguments=_QUORUM)
    await watch.bind(dead, routing_key="")


async def declare_topology_if_allowed(
    connection: Connection, agent_queues: Sequence[str] = ()
) -> bool:
    """Declare the topology, as a development broker's single user may; False when this
    identity may not (least privilege: the control plane's identity owns the topology, and
    an agent's or the monitor's only uses it). The refusal closes only its own channel."""
    try:
        async with connection.channel() as channel:
            await declare_topology(channel, agent_queues)
    except REFUSED as exc:
        log.info("this identity may not declare the topology (%s): using the control plane's", exc)
        return False
    return True


async def declare_instructions_queue(
    channel: aio_pika.abc.AbstractChannel, agent_queue: str, bind: bool = True
) -> aio_pika.abc.AbstractQueue:
    """Declare the quorum queue of one agent queue name and bind it. Without ``bind`` (an
    identity that may configure nothing) the queue, declared and bound by the control plane
    when the agent was added, is only looked up (a passive declare)."""
    queue = await channel.declare_queue(
        instructions_queue(agent_queue), durable=True, arguments=_QUORUM, passive=not bind
    )
    if bind:
        exchange = await channel.get_exchange(INSTRUCTIONS_EXCHANGE, ensure=False)
        await queue.bind(exchange, routing_key=agent_queue)
    return queue


async def declare_target(channel: aio_pika.abc.AbstractChannel, exchange: str, key: str) -> None:
    """Make sure the queue an instruction is routed to exists before the first message for it,
    so that an agent started later (or coming back) finds its instructions waiting.

    Raises BrokerRefused when the broker refuses the name, BrokerUnavailable when it is gone.
    """
    try:
        if exchange == INSTRUCTIONS_EXCHANGE:
            await declare_instructions_queue(channel, key)
        elif exchange == CONTROL_EXCHANGE:
            await declare_control_queue(channel, key)
    except REFUSED as exc:
        raise BrokerRefused(f"the broker refused the queue for {exchange}/{key}: {exc}") from exc
    except (ValueError, *TRANSIENT) as exc:
        if isinstance(exc, ValueError):  # an unsafe name, refused before asking the broker
            raise BrokerRefused(str(exc)) from exc
        raise BrokerUnavailable(f"cannot declare the queue for {exchange}/{key}: {exc!r}") from exc


async def declare_control_queue(
    channel: aio_pika.abc.AbstractChannel, agent_id: str, bind: bool = True
) -> aio_pika.abc.AbstractQueue:
    """Declare one agent's control queue (TerminateRun for that agent only) and bind it.

    Instructions wait there while the agent is away, so that a returning agent is fenced.
    An agent id that never comes back leaves a queue that expires after a week unused.
    """
    queue = await channel.declare_queue(
        control_queue(agent_id),
        durable=True,
        arguments={"x-queue-type": "quorum", "x-expires": 7 * 24 * 3600 * 1000},
        passive=not bind,
    )
    if bind:
        exchange = await channel.declare_exchange(
            CONTROL_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
        )
        await queue.bind(exchange, routing_key=agent_id)
    return queue


#: The failure monitor's queue is bounded: with no monitor running, old heartbeats are
#: dropped rather than piling up.
MONITOR_QUEUE_ARGUMENTS: Arguments = {
    "x-queue-type": "quorum",
    "x-max-length": 100_000,
    "x-overflow": "drop-head",
}


async def declare_monitor_queue(channel: aio_pika.abc.AbstractChannel) -> None:
    """Declare the failure monitor's queue on the status exchange (the monitor does this)."""
    queue = await channel.declare_queue(
        STATUS_MONITOR_QUEUE, durable=True, arguments=MONITOR_QUEUE_ARGUMENTS
    )
    exchange = await channel.get_exchange(STATUS_EXCHANGE, ensure=False)
    # Heartbeats only: run events (output batches above all) would cost the monitor a decode
    # each, and push heartbeats out of its bounded queue when it lags.
    await queue.bind(exchange, routing_key=AGENT_EVENTS)
    for stale in (RUN_EVENTS, "run.*"):  # bindings of earlier versions
        await queue.unbind(exchange, routing_key=stale)


async def declare_consumed_queue(
    channel: aio_pika.abc.AbstractChannel, name: str, arguments: Arguments | None = None
) -> aio_pika.abc.AbstractQueue:
    """A queue of the topology, declared (not just looked up) on ``channel``.

    A robust channel restores after a reconnect only the queues declared on it, and with
    them their consumers; a queue merely looked up would silently lose its consumer.
    """
    return await channel.declare_queue(name, durable=True, arguments=arguments or _QUORUM)
