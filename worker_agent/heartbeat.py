"""Heartbeats: proof of life every interval, with what the agent is running."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from schemas import AgentHeartbeat, ContainerState
from schemas.bounds import MAX_IN_FLIGHT
from schemas.resources import Capacity
from schemas.topology import STATUS_EXCHANGE, heartbeat_routing_key
from transport.errors import BrokerUnavailable
from transport.ports import EventPublisher

from . import limits
from .errors import AgentRevoked

#: An engine error is said in a heartbeat in at most this many bytes.
MAX_ENGINE_ERROR_BYTES = 1000

log = logging.getLogger(__name__)


class Heartbeat:
    """Publishes an AgentHeartbeat every ``interval_s`` until stopped.

    It keeps beating through a graceful shutdown, so that a draining agent never looks dead.
    """

    def __init__(
        self,
        publisher: EventPublisher,
        agent_id: str,
        queues: tuple[str, ...],
        max_concurrent: int,
        interval_s: float,
        in_flight: Callable[[], tuple[ContainerState, ...]],
        refused: Callable[[], Awaitable[bool]] | None = None,
        capacity: Capacity | None = None,
        engine: Callable[[], tuple[bool, str]] | None = None,
    ) -> None:
        #: Whether the Docker engine answers, and why not (``engine.EngineHealth``).
        self._engine = engine or (lambda: (True, ""))
        #: Asked when a heartbeat cannot be sent: does the broker refuse our credentials?
        self._refused = refused
        self._refusals = 0
        self._publisher = publisher
        self._agent_id = agent_id
        self._queues = queues
        self._max_concurrent = max_concurrent
        self._interval_s = interval_s
        self._in_flight = in_flight
        #: Declared with every beat: the control plane refuses runs no live agent could take.
        self._capacity = capacity or Capacity()
        #: Set when the agent's shutdown begins; the heartbeat goes on until it is over.
        self.draining = False
        #: Set once the agent has listed (adopted) its containers: before that, a run missing
        #: from ``in_flight`` proves nothing.
        self.synced = False
        self.sequence = 0

    def message(self) -> AgentHeartbeat:
        """The heartbeat to send now.

        It lists at most MAX_IN_FLIGHT attempts, so that it always fits in a message. More
        can only be held after adopting more containers than there are slots (the agent
        restarted with fewer); the list is then incomplete and says so (not ``synced``), so
        that no run left out of it is taken for vanished.
        """
        in_flight = self._in_flight()
        engine_ok, engine_error = self._engine()
        complete = len(in_flight) <= MAX_IN_FLIGHT
        if not complete:
            log.warning(
                "heartbeat lists %d of the %d attempts in flight: the contract's limit",
                MAX_IN_FLIGHT,
                len(in_flight),
            )
            in_flight = in_flight[:MAX_IN_FLIGHT]
        return AgentHeartbeat(
            agent_id=self._agent_id,
            sequence=self.sequence,
            queues=self._queues,
            max_concurrent=self._max_concurrent,
            interval_s=self._interval_s,
            in_flight=in_flight,
            draining=self.draining,
            synced=self.synced and complete,
            cpus=self._capacity.cpus,
            memory_mb=self._capacity.memory_mb,
            gpus=self._capacity.gpus,
            engine_ok=engine_ok,
            engine_error=limits.clip(limits.clean(engine_error), MAX_ENGINE_ERROR_BYTES),
        )

    async def beat(self) -> None:
        """Publish one heartbeat now."""
        message = self.message()
        self.sequence += 1
        await self._publisher.publish(
            STATUS_EXCHANGE, heartbeat_routing_key(self._agent_id), message
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.beat()
            except BrokerUnavailable as exc:
                log.warning("heartbeat not sent: %s", exc)
                refused = self._refused is not None and await self._refused()
                # Twice in a row, a heartbeat's confirm deadline apart: one refusal may be an
                # authentication backend's hiccup, and stopping every container is drastic.
                self._refusals = self._refusals + 1 if refused else 0
                if self._refusals >= 2:
                    raise AgentRevoked(
                        "the broker refuses this agent's credentials (its identity was revoked "
                        "or its secret rotated)"
                    ) from exc
            else:
                self._refusals = 0
            # Fixed-rate schedule: a slow publish does not stretch the interval.
            next_at += self._interval_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))
