"""The agent: takes instructions, runs containers, reports what happens to them.

While it serves, four components run, each a task: the heartbeat, the container watcher
(Docker's events; on each (re)connection it adopts what this agent ran before), the location
keeper, and the instruction consumer (which hands instructions to the launcher). None of them
ends while the agent serves: one that fails, or returns, stops the agent, which shuts down in
order and then raises ``AgentFailed``, so that the process exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from transport.connection import Connection, connect, credentials_refused
from transport.errors import TransportError
from transport.instructions import InstructionConsumer
from transport.process import StoppedStarting, unless_stopped
from transport.process import bounded as bounded_step
from transport.publisher import Publisher
from transport.topology import declare_topology_if_allowed

from .code_servers import CodeServers
from .engine import EngineHealth
from .errors import AgentError, AgentFailed, AgentRevoked
from .heartbeat import Heartbeat
from .launcher import Launcher
from .locations import LocationKeeper
from .reporter import Reporter
from .runtime import DockerRuntime
from .settings import AgentSettings
from .slots import Slots
from .watcher import ContainerWatcher

log = logging.getLogger(__name__)


class Agent:
    """One agent process; ``run()`` until ``stop`` is set (or a component fails)."""

    def __init__(self, settings: AgentSettings, runtime: DockerRuntime | None = None) -> None:
        self.settings = settings
        self.runtime = runtime or DockerRuntime(
            settings.agent_id,
            settings.pull_timeout_s,
            threads=settings.docker_threads,
            policy=settings.policy,
        )
        self.slots = Slots(
            settings.max_concurrent,
            settings.reported_for_s,
            on_change=self._capacity_changed,
            capacity=settings.capacity,
        )
        #: Whether the Docker engine answers: no new work while it does not.
        self.engine = EngineHealth(
            self.runtime.probe(settings.engine_timeout_s),
            interval_s=min(settings.heartbeat_interval_s, 1.0),
            timeout_s=settings.engine_timeout_s,
            on_change=self._capacity_changed,
        )
        #: Set when the shutdown begins: instructions held on purpose stop waiting.
        self._stopping = asyncio.Event()
        #: Set by the shutdown only (``_stopping`` by a drain too).
        self._shutting_down = asyncio.Event()
        #: Set to drain: take no new work, let running containers finish, then stop.
        self.drain_requested = asyncio.Event()
        self._components: dict[str, asyncio.Task[None]] = {}
        self._consumer: InstructionConsumer | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Start up, serve until ``stop`` is set or a component ends, then shut down.

        Raises AgentFailed, after the shutdown, when a component failed or ended.
        """
        settings = self.settings
        # A stop while the broker does not answer ends the start-up at once (exit 0).
        connection = await unless_stopped(
            stop, connect(settings.amqp_url, f"worker-agent {settings.agent_id}")
        )
        parts = _Parts(self, connection)
        failure: BaseException | None = None
        try:
            # Start-up: watch Docker first (which adopts what this agent ran before), so that
            # slots already taken are counted before any instruction is consumed.
            parts.consumer.bind = await unless_stopped(
                stop, declare_topology_if_allowed(connection, settings.queues)
            )
            self._start("engine", self.engine.run)
            self._start("heartbeat", parts.heartbeat.run)
            self._start("watcher", parts.watcher.run)
            if await self._until(stop, parts.watcher.connected):
                parts.heartbeat.synced = True
                await parts.keeper.start()
                self._start("locations", parts.keeper.run)
                await parts.consumer.start()
                self._start("consumer", parts.consumer.run)
                log.info(
                    "agent %s consuming %s with %d slot(s) and %s",
                    settings.agent_id,
                    ", ".join(settings.queues),
                    settings.max_concurrent,
                    settings.capacity.words(),
                )
                # Serve: until asked to stop or to drain, or until a component ends.
                if await self._until(stop, self.drain_requested):
                    await self._drain(parts, stop)
            failure = self._ended_component()
        except StoppedStarting:
            log.info("stopped during start-up")
        except (AgentError, TransportError) as exc:
            failure = exc  # start-up failed: the error says why
        except Exception as exc:
            log.exception("agent start-up failed")
            failure = AgentFailed(f"start-up failed: {type(exc).__name__}: {exc}")
            failure.__cause__ = exc
        finally:
            await self._shutdown(parts, connection)
            if isinstance(failure, AgentRevoked):
                await self._stop_containers()
        if failure is not None:
            raise failure

    async def _stop_containers(self) -> None:
        """A revoked agent stops its run containers: their runs are failed over, and a retry
        elsewhere must not overlap them."""
        runtime = DockerRuntime(self.settings.agent_id, policy=self.settings.policy)
        try:
            running = [c for c in await runtime.list_managed() if not c.finished]
            # All at once: each may take its whole grace period.
            await asyncio.gather(*(runtime.stop(c.id, grace_s=10.0) for c in running))
            log.warning("revoked: %d run container(s) stopped", len(running))
        except AgentError as exc:
            log.error("revoked, but its containers could not all be stopped: %s", exc)
        finally:
            runtime.close()

    # ------------------------------------------------------------- components

    def _start(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        async def component() -> None:
            if self.settings.fault == name:
                raise RuntimeError(f"injected fault in {name}")
            await run()

        self._components[name] = asyncio.create_task(component(), name=name)

    async def _until(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> bool:
        """Wait for ``ready`` (forever when None), for ``stop``, or for a component to end;
        True when ``ready`` came first."""
        waiters = [asyncio.ensure_future(stop.wait())]
        if ready is not None:
            waiters.append(asyncio.ensure_future(ready.wait()))
        try:
            await asyncio.wait(
                [*waiters, *self._components.values()], return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        return bool(ready and ready.is_set()) and not stop.is_set() and not self._ended()

    def _ended(self) -> bool:
        return any(task.done() for task in self._components.values())

    def _ended_component(self) -> AgentFailed | None:
        """The failure of the first component that ended (before the shutdown), if any."""
        for name, task in self._components.items():
            if not task.done():
                continue
            error = None if task.cancelled() else task.exception()
            if error is None:
                return AgentFailed(f"component {name} ended while the agent was serving")
            if isinstance(error, AgentRevoked):
                return error
            log.error("component %s failed", name, exc_info=error)
            failed = AgentFailed(f"component {name} failed: {type(error).__name__}: {error}")
            failed.__cause__ = error
            return failed
        return None

    def _capacity_changed(self) -> None:
        if self._consumer is not None:
            self._consumer.capacity_changed()

    # ------------------------------------------------------------------ drain

    async def _drain(self, parts: _Parts, stop: asyncio.Event) -> None:
        """Take no new work; keep watching, reporting and beating (as DRAINING) until every
        run holding a slot has finished and been reported, the drain timeout passes, or a stop
        comes. The shutdown follows."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout_s
        parts.heartbeat.draining = True
        # Held instructions stop waiting for a slot (they go back to their queue at the end).
        self._stopping.set()
        await parts.consumer.stop()
        # The consumer's loop ends with its consuming: that end is the drain's, not a failure.
        consumer = self._components.pop("consumer", None)
        if consumer is not None:
            await asyncio.wait([consumer], timeout=5)
            if consumer.done() and not consumer.cancelled() and consumer.exception():
                self._components["consumer"] = consumer  # a real failure: reported as such
        log.info(
            "draining: no new work; waiting for %d run(s), at most %g s",
            len(self.slots.attempts),
            self.settings.drain_timeout_s,
        )
        while self.slots.attempts and not stop.is_set() and not self._ended():
            left = deadline - loop.time()
            if left <= 0:
                log.warning("drain timeout: %d container(s) left running", len(self.slots.attempts))
                return
            with contextlib.suppress(TimeoutError):
                # Woken by a stop; else a look at the slots twice a second.
                await asyncio.wait_for(stop.wait(), min(left, 0.5))
        if not self.slots.attempts:
            # One last heartbeat that lists nothing running: the monitor takes the quiet that
            # follows for a completed drain (LEFT), not for a loss.
            with contextlib.suppress(TransportError, TimeoutError):
                await asyncio.wait_for(parts.heartbeat.beat(), 10)
            log.info("drained: every run finished and was reported")

    # --------------------------------------------------------------- shutdown

    async def _shutdown(self, parts: _Parts, connection: Connection) -> None:
        """One shutdown for every end (stop, failure, failed start-up), with one deadline.

        Running containers and code servers are left running: the next start of this agent
        adopts them.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_grace_s

        def left() -> float:
            return max(0.0, deadline - loop.time())

        async def bounded(step: Awaitable[object], what: str) -> None:
            # A broker that is gone for good (or refuses us) must not hold the shutdown.
            await bounded_step(step, max(left(), 2.0), what)

        # Stop consuming. Instructions held on purpose stop waiting; unacked, they go back
        # to their queue when the channel closes.
        parts.heartbeat.draining = True
        self._stopping.set()
        self._shutting_down.set()
        await bounded(parts.consumer.stop(), "stopping the consumer")
        # Let launches in progress finish and final events go out, within the grace period;
        # the heartbeat goes on meanwhile, so that a draining agent does not look dead.
        await parts.consumer.drain(left())
        await parts.reporter.drain(left())
        # Stop watching and beating. Closing the streams ends their threads.
        parts.watcher.close()
        serving = {task for task in self._components.values() if not task.done()}
        for task in serving:
            task.cancel()
        if serving:
            ended, stuck = await asyncio.wait(serving, timeout=max(left(), 2.0))
            for task in ended:
                # One that ended before was reported as the reason of this shutdown.
                if not task.cancelled() and (error := task.exception()) is not None:
                    log.warning("shutdown: component %s failed: %r", task.get_name(), error)
            if stuck:
                names = ", ".join(sorted(t.get_name() for t in stuck))
                log.warning("shutdown: %s did not end when cancelled; going on", names)
        await bounded(parts.reporter.close(), "cancelling the reports left")
        # Close: channels, then the connection (shielded: the last step must happen).
        await bounded(parts.keeper.close(), "closing the location keeper")
        await bounded(parts.consumer.close(), "closing the consumer")
        await bounded(parts.publisher.close(), "closing the publisher")
        await bounded(asyncio.shield(connection.close()), "closing the connection")
        self.runtime.close()
        log.info(
            "agent %s stopped; %d container(s) left running",
            self.settings.agent_id,
            len(self.slots.attempts),
        )


class _Parts:
    """The agent's components, wired to each other over one broker connection."""

    def __init__(self, agent: Agent, connection: Connection) -> None:
        settings, runtime, slots = agent.settings, agent.runtime, agent.slots
        self.publisher = Publisher(connection)
        self.reporter = Reporter(settings, runtime, slots, self.publisher)
        self.launcher = Launcher(
            settings, runtime, slots, self.reporter, agent._stopping, agent._shutting_down
        )
        self.watcher = ContainerWatcher(
            runtime, self.reporter.on_exit, self.launcher.adopt, self.reporter.on_ready
        )
        self.heartbeat = Heartbeat(
            self.publisher,
            settings.agent_id,
            settings.queues,
            settings.max_concurrent,
            settings.heartbeat_interval_s,
            slots.in_flight,
            refused=lambda: credentials_refused(settings.amqp_url),
            capacity=settings.capacity,
            engine=lambda: (agent.engine.ok, agent.engine.error),
        )
        self.keeper = self.launcher.keeper = LocationKeeper(
            CodeServers(runtime),
            connection,
            self.publisher,
            settings.agent_id,
            settings.queues,
            check_interval_s=settings.location_check_interval_s,
            startup_timeout_s=settings.location_startup_timeout_s,
            secrets=self.launcher.secrets,
            forward_output=settings.log_forwarding,
            senders=frozenset(settings.control_plane_users),
        )
        self.consumer = agent._consumer = InstructionConsumer(
            connection,
            settings.queues,
            self.publisher,
            self.launcher.handle,
            capacity=lambda: slots.prefetch() if agent.engine.ok else 0,
            agent_id=settings.agent_id,
            senders=frozenset(settings.control_plane_users),
        )
