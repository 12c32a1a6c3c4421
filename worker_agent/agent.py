"""The agent: takes instructions, runs containers, reports what happens to them.

Promises kept here:
- a LaunchRun is acked only after its container started and RunLaunched was confirmed;
- a redelivered LaunchRun adopts the container of the same name instead of starting another;
- an exit is reported from Docker's events stream, with the output tail, then the container
  is removed (unless ``keep_finished``);
- on start, containers this agent labelled before are adopted and their state reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import aio_pika.abc

from dispatcher import amqp, metrics
from dispatcher.amqp import Delivery, Publisher
from dispatcher.errors import BrokerUnavailable
from schemas import (
    ContainerState,
    FailureReason,
    Instruction,
    LaunchRun,
    Message,
    RunFailed,
    RunLaunched,
    RunStarted,
    TerminateRun,
)
from schemas.topology import STATUS_EXCHANGE, event_routing_key

from .code_servers import CodeServers
from .consumer import InstructionConsumer
from .errors import DockerUnavailable, ImageMissing, LaunchFailed, LocationUnavailable
from .heartbeat import Heartbeat
from .locations import LocationKeeper
from .logs import LogForwarder
from .outcome import final_event
from .progress import FRAME_PREFIX
from .runtime import ContainerInfo, DockerRuntime
from .settings import AgentSettings
from .watcher import ContainerWatcher

log = logging.getLogger(__name__)

AttemptKey = tuple[uuid.UUID, int]
_RECENTLY_FINISHED = 10_000


@dataclass
class Attempt:
    """One attempt this agent holds a slot for."""

    run_id: uuid.UUID
    attempt: int
    container_id: str | None = None
    state: str = "launching"
    launched: asyncio.Event = field(default_factory=asyncio.Event)
    finishing: bool = False
    #: RunStarted was reported (at once, or when the ready check passed).
    started: bool = False
    #: Set by a TerminateRun: what the attempt's end is reported as.
    terminated: FailureReason | None = None
    terminate_note: str = ""
    #: Forwards the container's output while it runs (when log forwarding is on).
    forwarding: asyncio.Task[None] | None = None


class Agent:
    """One agent process; ``run()`` until ``stop`` is set."""

    def __init__(self, settings: AgentSettings, runtime: DockerRuntime | None = None) -> None:
        self.settings = settings
        self.runtime = runtime or DockerRuntime(settings.agent_id, settings.pull_timeout_s)
        self.attempts: dict[AttemptKey, Attempt] = {}
        self._by_container: dict[str, AttemptKey] = {}
        self._finished: OrderedDict[AttemptKey, None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._forwarders: set[asyncio.Task[None]] = set()
        self._draining = False
        self._docker_backoff_s = 0.5
        self._publisher: Publisher | None = None
        self._consumer: InstructionConsumer | None = None
        self._keeper: LocationKeeper | None = None

    # ---------------------------------------------------------------------- run

    async def run(self, stop: asyncio.Event) -> None:
        settings = self.settings
        connection = await amqp.connect(settings.amqp_url, f"worker-agent {settings.agent_id}")
        try:
            async with connection.channel() as channel:
                await amqp.declare_topology(channel, settings.queues)
            self._publisher = Publisher(connection)
            await self._run(connection, stop)
        finally:
            # The final events were flushed above; closing is shielded from cancellation.
            await asyncio.shield(connection.close())
            self.runtime.close()

    async def _run(
        self, connection: aio_pika.abc.AbstractRobustConnection, stop: asyncio.Event
    ) -> None:
        assert self._publisher is not None
        settings = self.settings
        heartbeat = Heartbeat(
            self._publisher,
            settings.agent_id,
            settings.queues,
            settings.max_concurrent,
            settings.heartbeat_interval_s,
            self._in_flight,
            lambda: self._draining,
        )
        watcher = ContainerWatcher(
            self.runtime, self._on_container_exit, self._resync, self._on_container_ready
        )
        self._consumer = InstructionConsumer(
            connection, settings.queues, self._publisher, self._on_instruction, settings.agent_id
        )

        # Start-up: watch Docker first (which adopts what this agent ran before), so that
        # slots already taken are counted before any instruction is consumed.
        tasks = [
            asyncio.create_task(heartbeat.run(), name="heartbeat"),
            asyncio.create_task(watcher.run(), name="watcher"),
        ]
        stopper = asyncio.create_task(stop.wait(), name="stop")
        connected = asyncio.create_task(watcher.connected.wait())
        await asyncio.wait([connected, stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        connected.cancel()
        keeper = self._keeper = LocationKeeper(
            CodeServers(self.runtime),
            connection,
            self._publisher,
            settings.agent_id,
            settings.queues,
            check_interval_s=settings.location_check_interval_s,
            startup_timeout_s=settings.location_startup_timeout_s,
        )
        try:
            if not stop.is_set():
                await keeper.start()
                tasks.append(asyncio.create_task(keeper.run(), name="locations"))
                await self._consumer.start(self._free_slots())
                log.info(
                    "agent %s consuming %s with %d slot(s)",
                    settings.agent_id,
                    ", ".join(settings.queues),
                    settings.max_concurrent,
                )
                done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is not stopper and not task.cancelled() and task.exception():
                        log.error(
                            "agent component %s failed: %r", task.get_name(), task.exception()
                        )
        finally:
            # Shutdown (also after a failed start-up): stop consuming; let launches in
            # progress finish and report within the grace period (heartbeats go on
            # meanwhile); then stop watching and beating. Running containers and code
            # servers are left running: the next start of this agent adopts them.
            self._draining = True
            await self._consumer.stop()
            await self._consumer.drain(settings.shutdown_grace_s)
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=settings.shutdown_grace_s)
            # Closing the streams is what lets their threads, and so the process, end.
            watcher.close()
            for task in [*tasks, stopper, *self._tasks, *self._forwarders]:
                task.cancel()
            await asyncio.gather(
                *tasks, stopper, *self._tasks, *self._forwarders, return_exceptions=True
            )
            await keeper.close()
            await self._consumer.close()
            await self._publisher.close()
            log.info(
                "agent %s stopped; %d container(s) left running",
                settings.agent_id,
                len(self.attempts),
            )

    # ------------------------------------------------------------------- slots

    def _free_slots(self) -> int:
        return max(0, self.settings.max_concurrent - len(self.attempts))

    async def _capacity_changed(self) -> None:
        if self._consumer is not None and not self._draining:
            await self._consumer.set_capacity(self._free_slots())

    def _in_flight(self) -> tuple[ContainerState, ...]:
        return tuple(
            ContainerState(
                run_id=a.run_id, attempt=a.attempt, container_id=a.container_id, state=a.state
            )
            for a in self.attempts.values()
        )

    # ------------------------------------------------------------- instructions

    async def _on_instruction(self, delivery: Delivery[Instruction]) -> None:
        message = delivery.message
        try:
            if isinstance(message, LaunchRun):
                await self._launch(message, delivery.raw)
            elif isinstance(message, TerminateRun):
                await self._terminate(message, delivery.raw)
        except Exception as exc:
            # A defect must not hold a slot and an unacked instruction forever: report the
            # attempt failed and go on with the next instruction.
            log.exception(
                "instruction %s for run %s failed", type(message).__name__, message.run_id
            )
            if isinstance(message, LaunchRun):
                key = (message.run_id, message.attempt)
                attempt = self.attempts.get(key)
                if attempt is None or attempt.container_id is None:
                    await self._publish_until_sent(
                        RunFailed(
                            run_id=message.run_id,
                            attempt=message.attempt,
                            agent_id=self.settings.agent_id,
                            reason=FailureReason.LAUNCH_ERROR,
                            message=f"agent error: {exc!r}",
                        )
                    )
                    await self._release(key, finished=True)
            await amqp.settle(delivery.raw.ack())

    async def _launch(self, launch: LaunchRun, raw: aio_pika.abc.AbstractIncomingMessage) -> None:
        key = (launch.run_id, launch.attempt)
        if key in self._finished:
            log.info("run %s attempt %d already finished here; instruction acked", *key)
            await amqp.settle(raw.ack())
            return
        existing = self.attempts.get(key)
        if existing is not None:
            # A redelivery of an attempt this agent holds: report it again, then ack.
            await existing.launched.wait()
            if existing.container_id is not None:
                await self._report_launched(launch, existing.container_id, existing.started)
            await amqp.settle(raw.ack())
            return
        if self._free_slots() == 0:
            await amqp.settle(raw.nack(requeue=True))
            return
        attempt = Attempt(launch.run_id, launch.attempt)
        self.attempts[key] = attempt
        await self._capacity_changed()
        try:
            if launch.job is not None and self._keeper is not None:
                launch = await self._keeper.launch_spec(launch)
            info, adopted = await self.runtime.launch(launch)
            self._docker_backoff_s = 0.5
        except (DockerUnavailable, LocationUnavailable) as exc:
            # Not lost: the instruction goes back to the queue after a pause.
            what = "Docker engine unreachable" if isinstance(exc, DockerUnavailable) else "waiting"
            log.error(
                "%s, run %s requeued in %.1f s: %s",
                what,
                launch.run_id,
                self._docker_backoff_s,
                exc,
            )
            await self._release(key)
            await asyncio.sleep(self._docker_backoff_s)
            self._docker_backoff_s = min(self._docker_backoff_s * 2, 30.0)
            await amqp.settle(raw.nack(requeue=True))
            return
        except (ImageMissing, LaunchFailed) as exc:
            reason = (
                FailureReason.IMAGE_NOT_FOUND
                if isinstance(exc, ImageMissing)
                else FailureReason.LAUNCH_ERROR
            )
            log.warning(
                "run %s attempt %d failed to launch: %s", launch.run_id, launch.attempt, exc
            )
            await self._publish_until_sent(
                RunFailed(
                    run_id=launch.run_id,
                    attempt=launch.attempt,
                    agent_id=self.settings.agent_id,
                    reason=reason,
                    message=str(exc),
                )
            )
            await amqp.settle(raw.ack())
            await self._release(key, finished=True)
            return
        attempt.container_id = info.id
        attempt.state = info.status
        attempt.started = info.ready
        self._by_container[info.id] = key
        self._forward_output(attempt, info.id)
        try:
            await self._report_launched(launch, info.id, attempt.started)
        except BrokerUnavailable as exc:
            # Not acked: the broker redelivers, and the redelivery adopts this container.
            log.error("could not report the launch of run %s: %s", launch.run_id, exc)
            attempt.launched.set()
            return
        await amqp.settle(raw.ack())
        attempt.launched.set()
        if not adopted:
            metrics.LAUNCHES.inc()
        log.info(
            "run %s attempt %d %s container %s",
            launch.run_id,
            launch.attempt,
            "adopted" if adopted else "started",
            info.id[:12],
        )
        if info.finished:
            self._on_container_exit(info.id)

    async def _report_launched(
        self, launch: LaunchRun | ContainerInfo, container_id: str, started: bool
    ) -> None:
        """RunLaunched, and RunStarted when the container runs (and passed its ready check)."""
        agent_id = self.settings.agent_id
        run_id, attempt = launch.run_id, launch.attempt
        name = f"hd-run-{run_id}-{attempt}"
        await self._publish(
            RunLaunched(
                run_id=run_id,
                attempt=attempt,
                agent_id=agent_id,
                container_id=container_id,
                container_name=name,
            )
        )
        if started:
            await self._publish(
                RunStarted(
                    run_id=run_id, attempt=attempt, agent_id=agent_id, container_id=container_id
                )
            )

    def _on_container_ready(self, container_id: str) -> None:
        key = self._by_container.get(container_id)
        attempt = self.attempts.get(key) if key else None
        if attempt is None or attempt.started:
            return
        attempt.started = True

        async def report() -> None:
            await attempt.launched.wait()
            await self._publish_until_sent(
                RunStarted(
                    run_id=attempt.run_id,
                    attempt=attempt.attempt,
                    agent_id=self.settings.agent_id,
                    container_id=container_id,
                )
            )

        task = asyncio.create_task(report())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _terminate(
        self, terminate: TerminateRun, raw: aio_pika.abc.AbstractIncomingMessage
    ) -> None:
        """Stop an attempt's container; its end is reported with the reason given."""
        attempt = self.attempts.get((terminate.run_id, terminate.attempt))
        if attempt is not None and attempt.container_id is not None and not attempt.finishing:
            attempt.terminated = terminate.failure_reason or FailureReason.UNEXPECTED_TERMINATION
            attempt.terminate_note = terminate.reason
            log.info(
                "terminating run %s attempt %d: %s",
                terminate.run_id,
                terminate.attempt,
                terminate.reason or "asked to",
            )
            try:
                await self.runtime.stop(attempt.container_id, terminate.grace_s)
            except DockerUnavailable as exc:
                log.error("cannot terminate run %s: %s; requeued", terminate.run_id, exc)
                await asyncio.sleep(1.0)
                await amqp.settle(raw.nack(requeue=True))
                return
        await amqp.settle(raw.ack())

    # --------------------------------------------------------------- exits

    def _on_container_exit(self, container_id: str) -> None:
        key = self._by_container.get(container_id)
        attempt = self.attempts.get(key) if key else None
        if attempt is None or attempt.finishing:
            return
        attempt.finishing = True
        attempt.state = "exited"
        task = asyncio.create_task(self._finish(attempt, container_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _forward_output(self, attempt: Attempt, container_id: str) -> None:
        """Follow the container's output: progress always, lines when forwarding is on."""
        if attempt.forwarding is not None:
            return
        settings = self.settings
        forwarder = LogForwarder(
            self.runtime,
            self._publish,
            attempt.run_id,
            attempt.attempt,
            settings.agent_id,
            container_id,
            batch_interval_s=settings.log_batch_interval_s,
            max_line_chars=settings.log_max_line_chars,
            max_lines=settings.log_max_lines_per_run,
            forward_lines=settings.log_forwarding,
        )
        attempt.forwarding = asyncio.create_task(forwarder.run())
        self._forwarders.add(attempt.forwarding)
        attempt.forwarding.add_done_callback(self._forwarders.discard)

    async def _finish(self, attempt: Attempt, container_id: str) -> None:
        """Report an exit with its output tail; then remove the container and free the slot."""
        await attempt.launched.wait()
        agent_id = self.settings.agent_id
        if attempt.forwarding is not None:
            # The output's last lines go out before the final event.
            await asyncio.wait([attempt.forwarding], timeout=10)
        while True:
            try:
                info = await self.runtime.inspect(container_id)
                wanted = self.settings.output_tail_lines
                # Progress frames travel as RunProgress: the tail is the ordinary output.
                tail = tuple(
                    line
                    for line in await self.runtime.output_tail(container_id, wanted * 4)
                    if not line.startswith(FRAME_PREFIX)
                )[-wanted:]
                break
            except DockerUnavailable as exc:
                log.error(
                    "Docker engine unreachable while reporting run %s: %s", attempt.run_id, exc
                )
                await asyncio.sleep(1.0)
        if not self.settings.log_forwarding:
            tail = ()  # no output line leaves the host
        event = final_event(attempt, agent_id, info, tail)
        attempt.state = "exited"
        await self._publish_until_sent(event)
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
        if not self.settings.keep_finished:
            with contextlib.suppress(DockerUnavailable):
                await self.runtime.remove(container_id)
        self._by_container.pop(container_id, None)
        await self._release((attempt.run_id, attempt.attempt), finished=True)

    async def _release(self, key: AttemptKey, finished: bool = False) -> None:
        self.attempts.pop(key, None)
        if finished:
            self._finished[key] = None
            while len(self._finished) > _RECENTLY_FINISHED:
                self._finished.popitem(last=False)
        await self._capacity_changed()

    # ----------------------------------------------------------------- adoption

    async def _resync(self) -> None:
        """Adopt this agent's containers and report their state (start, or Docker came back)."""
        for info in await self.runtime.list_managed():
            key = (info.run_id, info.attempt)
            if key in self._finished:
                continue
            attempt = self.attempts.get(key)
            if attempt is None:
                attempt = Attempt(
                    info.run_id, info.attempt, container_id=info.id, state=info.status
                )
                self.attempts[key] = attempt
                self._by_container[info.id] = key
                log.info(
                    "adopted container %s of run %s attempt %d (%s)",
                    info.id[:12],
                    *key,
                    info.status,
                )
                attempt.started = info.ready
                await self._report_launched(info, info.id, attempt.started)
                attempt.launched.set()
            if info.finished:
                self._on_container_exit(info.id)
        await self._capacity_changed()

    # ----------------------------------------------------------------- publishing

    async def _publish(self, event: Message) -> None:
        assert self._publisher is not None
        await self._publisher.publish(STATUS_EXCHANGE, event_routing_key(event), event)

    async def _publish_until_sent(self, event: Message) -> None:
        """A final event is never dropped: retry until the broker confirms it."""
        while True:
            try:
                await self._publish(event)
                return
            except BrokerUnavailable as exc:
                log.error("could not publish %s (%s); retrying", type(event).__name__, exc)
                await asyncio.sleep(1.0)
