"""The instruction consumer of an agent: its queues, with prefetch equal to its free slots."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import aio_pika.abc

from schemas import Instruction, SchemaError, instruction_decoder

from .connection import TRANSIENT, Connection
from .delivery import Delivery
from .errors import BrokerUnavailable
from .frames import unreadable
from .ports import DeadLetterer
from .topology import declare_control_queue, declare_instructions_queue

log = logging.getLogger(__name__)


def untrusted_sender(user_id: str | None, senders: frozenset[str]) -> str:
    """The reason a message from ``user_id`` is refused by a reader that trusts ``senders``."""
    who = f"broker user {user_id!r}" if user_id else "no broker user (no user_id)"
    return f"published by {who}, not by the control plane ({', '.join(sorted(senders))})"


#: Seconds before a prefetch change that failed (the broker away) is tried again.
CAPACITY_RETRY_S = 1.0


#: Deliveries of an agent's control queue in hand at once (stops in progress and grants).
CONTROL_PREFETCH = 256


class InstructionConsumer:
    """Consumes LaunchRun / TerminateRun from the agent's instruction queues.

    The broker hands out at most as many unacknowledged instructions as the agent has free
    slots: ``run`` re-subscribes with the new prefetch whenever ``capacity_changed`` says the
    number may have changed, and with no free slot the agent does not consume at all, so that
    other replicas take the work. Each instruction is handled in a task of its own; any error,
    decoding it or handling it, dead-letters it once with the reason, and the consumer goes on.

    Each subscription is bound to the name of the queue it consumes: that is where a dead
    letter says it came from. A delivery's exchange and routing key say how it was published
    (the default exchange, a shovel, any key at all), not where it was consumed.
    """

    def __init__(
        self,
        connection: Connection,
        queues: tuple[str, ...],
        publisher: DeadLetterer,
        handler: Callable[[Delivery[Instruction]], Coroutine[Any, Any, None]],
        capacity: Callable[[], int],
        agent_id: str | None = None,
        bind: bool = True,
        senders: frozenset[str] = frozenset(),
    ) -> None:
        self._agent_id = agent_id
        #: Broker users whose instructions are taken (empty: whoever may publish them); the
        #: broker vouches for a message's ``user_id``.
        self._senders = senders
        #: False for an identity that may not bind queues (the control plane binds them).
        self.bind = bind
        self._control_channel: aio_pika.abc.AbstractChannel | None = None
        self._connection = connection
        self._agent_queues = queues
        self._publisher = publisher
        self._handler = handler
        self._capacity = capacity
        self._decoder = instruction_decoder()
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._queues: list[aio_pika.abc.AbstractQueue] = []
        self._tags: list[tuple[aio_pika.abc.AbstractQueue, str]] = []
        self._prefetch = 0
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = False

    async def start(self) -> None:
        """Declare and subscribe: the agent's own queue at once, the others per capacity."""
        try:
            self._channel = await self._connection.channel()
            for agent_queue in self._agent_queues:
                queue = await declare_instructions_queue(self._channel, agent_queue, self.bind)
                self._queues.append(queue)
            if self._agent_id is not None:
                # This agent's own queue (TerminateRun, LaunchGranted) is consumed whatever
                # the free slots. A TerminateRun is acked once its stop is done, which may take
                # its grace: the prefetch leaves room for grants behind a burst of slow stops
                # (a lost agent's runs failed over, then fenced, when it comes back).
                self._control_channel = await self._connection.channel()
                await self._control_channel.set_qos(prefetch_count=CONTROL_PREFETCH)
                control = await declare_control_queue(
                    self._control_channel, self._agent_id, self.bind
                )
                await control.consume(functools.partial(self._on_message, control.name))
        except TRANSIENT as exc:
            raise BrokerUnavailable(f"cannot consume instructions: {exc!r}") from exc
        await self._set_capacity(self._capacity())

    def capacity_changed(self) -> None:
        """The number of free slots may have changed; ``run`` catches up soon."""
        self._changed.set()

    async def run(self) -> None:
        """Keep the prefetch equal to the free slots until ``stop``; changes in a burst are
        applied once, with the latest number."""
        while not self._stopped:
            await self._changed.wait()
            self._changed.clear()
            await self._set_capacity(self._capacity())

    async def _set_capacity(self, free: int) -> None:
        """Consume with prefetch = ``free``; stop consuming at 0."""
        async with self._lock:
            if self._stopped or free == self._prefetch or self._channel is None:
                return
            try:
                await self._cancel_consumers()
                self._prefetch = free
                if free > 0:
                    await self._channel.set_qos(prefetch_count=free)
                    for queue in self._queues:
                        tag = await queue.consume(functools.partial(self._on_message, queue.name))
                        self._tags.append((queue, tag))
            except TRANSIENT as exc:
                # Not applied: the consumers were cancelled first, and a reconnect restores
                # none that are gone. Tried again shortly, whatever the free slots are then
                # (an idle agent's count would not change, and it would consume nothing).
                log.warning(
                    "could not change the prefetch to %d (%r); trying again in %.0f s",
                    free,
                    exc,
                    CAPACITY_RETRY_S,
                )
                self._prefetch = -1
                asyncio.get_running_loop().call_later(CAPACITY_RETRY_S, self._changed.set)

    async def _cancel_consumers(self) -> None:
        tags, self._tags = self._tags, []
        for queue, tag in tags:
            try:
                await queue.cancel(tag)
            except TRANSIENT as exc:
                log.debug("cancel consumer %s: %r", tag, exc)

    async def _on_message(self, source: str, raw: aio_pika.abc.AbstractIncomingMessage) -> None:
        """An instruction consumed from the queue named ``source``: handled in a task."""
        task = asyncio.create_task(self._handle(source, raw))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, source: str, raw: aio_pika.abc.AbstractIncomingMessage) -> None:
        if (why := unreadable(raw)) is not None:
            await self._dead_letter(source, raw, why)
            return
        if self._senders and raw.user_id not in self._senders:
            await self._dead_letter(source, raw, untrusted_sender(raw.user_id, self._senders))
            return
        try:
            instruction = self._decoder.decode(raw.body)
        except SchemaError as exc:
            await self._dead_letter(source, raw, f"undecodable instruction: {exc}")
            return
        except Exception as exc:
            log.exception("decoding an instruction failed")
            await self._dead_letter(source, raw, f"decoding failed: {type(exc).__name__}: {exc}")
            return
        try:
            await self._handler(Delivery(instruction, raw))
        except Exception as exc:
            log.exception("handling %s failed", type(instruction).__name__)
            await self._dead_letter(source, raw, f"handler error: {type(exc).__name__}: {exc}")

    async def _dead_letter(
        self, source: str, raw: aio_pika.abc.AbstractIncomingMessage, reason: str
    ) -> None:
        """Dead-letter an instruction once with ``reason``, then ack it (unless settled
        already). It is acked even when the dead letter could not be sent: left unacked, a
        poison instruction would come back again and again, holding a slot each time."""
        if raw.processed:
            return  # the handler settled it before failing: nothing to take back
        log.warning("dead-lettering an instruction from %s: %s", source, reason)
        await self._publisher.reject(raw, source, reason)

    async def stop(self) -> None:
        """Take no more instructions; those being handled go on."""
        async with self._lock:
            self._stopped = True
            self._changed.set()
            await self._cancel_consumers()

    async def drain(self, timeout: float) -> None:
        """Wait for the instructions being handled, at most ``timeout`` seconds."""
        if self._tasks and timeout > 0:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def close(self) -> None:
        """Close the channel; unacked instructions go back to their queue. Idempotent."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in (self._channel, self._control_channel):
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(*TRANSIENT):
                    await channel.close()
        self._channel = None
        self._control_channel = None
