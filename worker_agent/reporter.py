"""The reporter: what happens to the agent's containers, told to the control plane.

Promises kept here:
- an exit frees the attempt's slot at once (``Slots.exited``); it is reported from Docker's
  events stream, with the output tail, and the container is removed (unless
  ``keep_finished``) after the report, off the way of the next launch;
- a final event is never dropped: it is published until the broker confirms it;
- a run's output goes out (as RunLog and RunProgress) before its final event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any

from schemas import Message, RunLaunched, RunStarted
from schemas.topology import STATUS_EXCHANGE, event_routing_key
from transport.errors import BrokerRefused, BrokerUnavailable
from transport.ports import EventPublisher

from . import metrics
from .containers import ContainerInfo, container_name
from .errors import DockerUnavailable
from .logs import LogForwarder
from .outcome import final_event
from .ports import ContainerRuntime
from .progress import FRAME_PREFIX
from .settings import AgentSettings
from .slots import Attempt, Slots

log = logging.getLogger(__name__)


#: How long a failed container with a memory limit is given for the engine to record that
#: it was killed for memory, before it is inspected once more.
OOM_SETTLE_S = 0.3


def _maybe_oom(info: ContainerInfo) -> bool:
    """Failed, with a memory limit, and not (yet) said to be killed for memory."""
    return bool(
        info.finished
        and info.exit_code not in (0, None)
        and not info.oom_killed
        and info.resources.memory_mb
    )


class Reporter:
    """Publishes the agent's run events and follows its containers to their end."""

    def __init__(
        self,
        settings: AgentSettings,
        runtime: ContainerRuntime,
        slots: Slots,
        publisher: EventPublisher,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.slots = slots
        self._publisher = publisher
        #: Reports in progress (RunStarted after a ready check, final events).
        self._tasks: set[asyncio.Task[None]] = set()
        self._forwarders: set[asyncio.Task[tuple[str, ...] | None]] = set()
        #: Exits of containers no attempt was bound to yet: a container may die before its
        #: launch returned; the launcher asks here once it bound the container.
        self._unbound_exits: OrderedDict[str, None] = OrderedDict()

    # ---------------------------------------------------------------- publishing

    async def publish(self, event: Message) -> None:
        await self._publisher.publish(STATUS_EXCHANGE, event_routing_key(event), event)

    async def publish_until_sent(self, event: Message) -> None:
        """A final event is never dropped: retry until the broker confirms it. A refusal is
        retried too, more slowly: a full queue or a permission can be set right meanwhile."""
        delay = 1.0
        while True:
            try:
                await self.publish(event)
                return
            except (BrokerUnavailable, BrokerRefused) as exc:
                log.error(
                    "could not publish %s (%s); retrying in %.0f s",
                    type(event).__name__,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                if isinstance(exc, BrokerRefused):
                    delay = min(delay * 2, 30.0)

    async def launched(
        self,
        run_id: uuid.UUID,
        attempt: int,
        container_id: str,
        started: bool,
        until_sent: bool = False,
    ) -> None:
        """RunLaunched, and RunStarted when the container runs (and passed its ready check)."""
        agent_id = self.settings.agent_id
        publish = self.publish_until_sent if until_sent else self.publish
        await publish(
            RunLaunched(
                run_id=run_id,
                attempt=attempt,
                agent_id=agent_id,
                container_id=container_id,
                container_name=container_name(run_id, attempt),
            )
        )
        if started:
            await publish(
                RunStarted(
                    run_id=run_id, attempt=attempt, agent_id=agent_id, container_id=container_id
                )
            )

    # ------------------------------------------------------------ Docker's events

    def on_ready(self, container_id: str) -> None:
        """The container passed its ready check: RunStarted, once its launch was reported."""
        attempt = self.slots.of_container(container_id)
        if attempt is None or attempt.started:
            return
        attempt.started = True

        async def report() -> None:
            await attempt.launched.wait()
            await self.publish_until_sent(
                RunStarted(
                    run_id=attempt.run_id,
                    attempt=attempt.attempt,
                    agent_id=self.settings.agent_id,
                    container_id=container_id,
                )
            )

        self._spawn(report())

    def on_exit(self, container_id: str) -> None:
        """The container exited: report it (at once; nothing else waits)."""
        attempt = self.slots.of_container(container_id)
        if attempt is None:
            self._unbound_exits[container_id] = None
            while len(self._unbound_exits) > 1000:
                self._unbound_exits.popitem(last=False)
            return
        if attempt.finishing:
            return
        self.slots.exited(attempt)
        self._spawn(self._finish(attempt, container_id))

    def exited_unbound(self, container_id: str) -> bool:
        """Whether the container's exit was seen before an attempt was bound to it."""
        if container_id not in self._unbound_exits:
            return False
        del self._unbound_exits[container_id]
        return True

    def forward_output(self, attempt: Attempt, container_id: str) -> None:
        """Follow the container's output: progress always, lines when forwarding is on."""
        if attempt.forwarding is not None:
            return
        settings = self.settings
        forwarder = LogForwarder(
            self.runtime,
            self.publish,
            attempt.run_id,
            attempt.attempt,
            settings.agent_id,
            container_id,
            batch_interval_s=settings.log_batch_interval_s,
            max_line_chars=settings.log_max_line_chars,
            max_lines=settings.log_max_lines_per_run,
            forward_lines=settings.log_forwarding,
            redact=attempt.redact or None,
            tail_lines=settings.output_tail_lines,
            exited=attempt.exited,
        )
        attempt.forwarding = asyncio.create_task(forwarder.run())
        self._forwarders.add(attempt.forwarding)
        attempt.forwarding.add_done_callback(self._forwarders.discard)

    async def _finish(self, attempt: Attempt, container_id: str) -> None:
        """Report an exit with its output tail; then remove the container and free the slot."""
        await attempt.launched.wait()
        known_tail: tuple[str, ...] | None = None
        if attempt.forwarding is not None:
            # The output's last lines go out before the final event.
            await asyncio.wait([attempt.forwarding], timeout=10)
            if attempt.forwarding.done() and not attempt.forwarding.cancelled():
                known_tail = attempt.forwarding.result()
        while True:
            try:
                info = await self.runtime.inspect(container_id)
                if known_tail is not None:
                    # The output was read whole after the exit: its tail is known, without
                    # reading the container's log again.
                    tail = known_tail
                    break
                wanted = self.settings.output_tail_lines
                # Progress frames travel as RunProgress: the tail is the ordinary output.
                tail = tuple(
                    line
                    for line in await self.runtime.output_tail(
                        container_id, wanted * 4, attempt.redact
                    )
                    if not line.startswith(FRAME_PREFIX)
                )[-wanted:]
                break
            except DockerUnavailable as exc:
                log.error(
                    "Docker engine unreachable while reporting run %s: %s", attempt.run_id, exc
                )
                await asyncio.sleep(1.0)
        if info is not None and _maybe_oom(info):
            # The engine may handle a container's exit before the kernel's word that it
            # killed for memory (under load it does): ask once more, a moment later.
            await asyncio.sleep(OOM_SETTLE_S)
            with contextlib.suppress(DockerUnavailable):
                info = await self.runtime.inspect(container_id) or info
        if not self.settings.log_forwarding:
            tail = ()  # no output line leaves the host
        event = final_event(attempt, self.settings.agent_id, info, tail)
        await self.publish_until_sent(event)
        attempt.state = "reported"
        if info is not None and info.finished_at is not None:
            delay = max(0.0, time.time() - info.finished_at)
            metrics.DETECTION.labels("container_exit").observe(delay)
            note = f" (reported {delay:.3f} s after the exit)"
        else:
            note = ""
        log.info(
            "run %s attempt %d finished: %s%s",
            attempt.run_id,
            attempt.attempt,
            type(event).__name__,
            note,
        )
        self.slots.release(
            attempt.key, reported=True, exit_code=info.exit_code if info is not None else None
        )
        if not self.settings.keep_finished:
            with contextlib.suppress(DockerUnavailable):
                await self.runtime.remove(container_id)

    # ------------------------------------------------------------------ shutdown

    def _spawn(self, report: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(report)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout: float) -> None:
        """Wait for the reports in progress, at most ``timeout`` seconds."""
        if self._tasks and timeout > 0:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def close(self) -> None:
        """Cancel what is left (reports, output follows). Safe more than once."""
        left = [*self._tasks, *self._forwarders]
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
