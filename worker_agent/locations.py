"""The location keeper: exactly one healthy code server per location of the agent's queues.

It reconciles, on every snapshot from the control plane and every ``check_interval_s``:
- a location without a running server of its current generation gets one started;
- a server that answers ``/health`` is reported once (LocationLoaded, with its definitions),
  and only then are servers of older generations removed (blue/green);
- a server that has not answered within ``startup_timeout_s`` is reported (LocationFailed,
  with its output) and removed, and that generation is not tried again;
- a server that stopped, or failed ``failures_before_redeploy`` checks in a row, is replaced;
- servers of locations no longer wanted are removed.
Nothing is removed before the first snapshot arrives, so a restarted agent adopts its healthy
servers (same container) instead of redeploying them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec

from schemas import (
    Decoder,
    LaunchRun,
    LocationFailed,
    LocationLoaded,
    LocationSnapshot,
    LocationSpec,
    LocationsWanted,
    SchemaError,
)
from schemas.bounds import Argv, Env
from schemas.topology import (
    LOCATIONS_EXCHANGE,
    REQUESTS_EXCHANGE,
    REQUESTS_ROUTING_KEY,
    STATUS_EXCHANGE,
    event_routing_key,
)
from transport.connection import Connection
from transport.delivery import settle
from transport.errors import BrokerRefused, BrokerUnavailable
from transport.instructions import untrusted_sender
from transport.ports import BrokerPublisher, InboundDelivery
from transport.subscription import Subscription

from .code_servers import CodeServer, CodeServers
from .definitions import fit_to_message, job_definitions
from .errors import (
    AgentError,
    DockerUnavailable,
    LaunchFailed,
    LocationUnavailable,
    UntrustedSender,
)
from .secrets import MissingSecret, Redactor, Secrets, is_reference


class _LaunchSpec(msgspec.Struct, forbid_unknown_fields=False):
    """A code server's answer to ``/launch-spec``, held to the contract's bounds."""

    command: Argv = ()
    env: Env = msgspec.field(default_factory=dict)


log = logging.getLogger(__name__)


class LocationKeeper:
    def __init__(
        self,
        servers: CodeServers,
        connection: Connection,
        publisher: BrokerPublisher,
        agent_id: str,
        queues: tuple[str, ...],
        check_interval_s: float = 10.0,
        startup_timeout_s: float = 180.0,
        failures_before_redeploy: int = 3,
        secrets: Secrets | None = None,
        forward_output: bool = True,
        senders: frozenset[str] = frozenset(),
    ) -> None:
        self._secrets = secrets or Secrets()
        #: Broker users whose snapshots are taken (empty: whoever may publish them).
        self._senders = senders
        #: Off (--no-log-forwarding): a failing code server's output stays on the host too.
        self._forward_output = forward_output
        self.servers = servers
        self._connection = connection
        self._publisher = publisher
        self._agent_id = agent_id
        self._queues = queues
        self._check_interval_s = check_interval_s
        self._startup_timeout_s = startup_timeout_s
        self._failures_before_redeploy = failures_before_redeploy
        self._snapshots: dict[str, tuple[LocationSpec, ...]] = {}
        self._revisions: dict[str, int] = {}  # queue → revision of the snapshot kept
        self._wake = asyncio.Event()
        self._reported: set[str] = set()  # server container ids reported loaded
        self._failures: dict[str, int] = {}
        self._given_up: dict[str, int] = {}  # location → generation that failed to start
        self._crashes: dict[str, int] = {}  # location → exits before its server was healthy
        #: server id → (when this keeper first found it healthy without definitions, rounds).
        self._unread: dict[str, tuple[float, int]] = {}
        self._decoder: Decoder[LocationSnapshot] = Decoder(LocationSnapshot)
        self._subscription: Subscription | None = None
        self._asking: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen for this agent's queues' snapshots, then ask for the current ones."""
        try:
            self._subscription = subscription = await Subscription.open(self._connection)
            for agent_queue in self._queues:
                await subscription.bind(LOCATIONS_EXCHANGE, agent_queue)
            await subscription.consume(self._on_snapshot)
        except BrokerUnavailable as exc:
            raise BrokerUnavailable(f"cannot follow location snapshots: {exc}") from exc
        # The private queue goes with a lost connection, and a snapshot sent meanwhile with
        # it: asked for again once the queue is back.
        await subscription.when_restored(self._want_again)
        await self._want()

    async def _want(self) -> None:
        """Ask for this agent's queues' snapshots (``LocationsWanted``)."""
        await self._publisher.publish(
            REQUESTS_EXCHANGE,
            REQUESTS_ROUTING_KEY,
            LocationsWanted(agent_id=self._agent_id, queues=self._queues),
        )

    def _want_again(self) -> None:
        async def ask() -> None:
            log.info("the snapshot queue was restored: asking for the snapshots again")
            try:
                await self._want()
            except (BrokerUnavailable, BrokerRefused) as exc:
                log.warning("could not ask for the snapshots again: %s", exc)

        task = asyncio.create_task(ask())
        self._asking.add(task)
        task.add_done_callback(self._asking.discard)

    async def _on_snapshot(self, source: str, raw: InboundDelivery) -> None:
        """Take a snapshot in (consumed from the queue named ``source``); one that cannot be
        is dead-lettered once, with the reason. Either way it is acked: a snapshot that cannot
        even be dead-lettered is dropped with a log line rather than delivered forever."""
        try:
            if self._senders and raw.user_id not in self._senders:
                raise UntrustedSender(untrusted_sender(raw.user_id, self._senders))
            snapshot = self._decoder.decode(raw.body)
            known = self._revisions.get(snapshot.queue, 0)
            if snapshot.queue not in self._queues:
                pass
            elif 0 < snapshot.revision < known:
                log.info(
                    "snapshot %d of queue %s is older than the one kept (%d): ignored",
                    snapshot.revision,
                    snapshot.queue,
                    known,
                )
            else:
                self._snapshots[snapshot.queue] = snapshot.locations
                self._revisions[snapshot.queue] = snapshot.revision
                self._wake.set()
        except Exception as exc:
            if not isinstance(exc, SchemaError | UntrustedSender):
                log.exception("taking a location snapshot in failed")
            reason = f"location snapshot refused: {type(exc).__name__}: {exc}"
            log.warning("dead-lettering a message from %s: %s", source, reason)
            await self._publisher.reject(raw, source, reason)
            return
        await settle(raw.ack())

    async def run(self) -> None:
        while True:
            try:
                await self.reconcile()
            except (DockerUnavailable, LaunchFailed, BrokerUnavailable) as exc:
                log.error("code servers not reconciled: %s", exc)
            except Exception:
                # What a code server answers is the user's: whatever it makes this round
                # fail, the keeper (and the agent with it) goes on to the next.
                log.exception("code servers not reconciled")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._check_interval_s)

    async def reconcile(self) -> None:
        if not self._snapshots:
            return  # not told yet what is wanted: keep (adopt) what runs
        await self.servers.ensure_network()
        wanted = {spec.name: spec for specs in self._snapshots.values() for spec in specs}
        by_location: dict[str, list[CodeServer]] = {}
        for server in await self.servers.list():
            by_location.setdefault(server.location, []).append(server)
        for name, servers in by_location.items():
            if name not in wanted:
                for server in servers:
                    log.info("location %s removed: stopping its code server", name)
                    await self._remove(server)
        for spec in wanted.values():
            await self._keep(spec, by_location.get(spec.name, []))

    async def _keep(self, spec: LocationSpec, servers: list[CodeServer]) -> None:
        current = [s for s in servers if s.generation == spec.generation]
        for server in [s for s in current if not s.running]:
            if server.id not in self._reported:
                # It stopped before ever serving: a crash loop is an error, not a redeploy.
                crashes = self._crashes.get(spec.name, 0) + 1
                self._crashes[spec.name] = crashes
                if crashes >= self._failures_before_redeploy:
                    await self._report_failed(
                        spec, server, f"exited {crashes} times before becoming healthy"
                    )
                    await self._remove(server)
                    self._given_up[spec.name] = spec.generation
                    return
            log.warning("code server of %s stopped: replacing it", spec.name)
            await self._remove(server)
        running = sorted(
            (s for s in current if s.running), key=lambda s: s.started_at or 0, reverse=True
        )
        if not running:
            if self._given_up.get(spec.name) != spec.generation:
                await self._start(spec)
            return
        server, extra = running[0], running[1:]
        for other in extra:
            await self._remove(other)
        if await self.servers.ask(server, "/health") is not None:
            self._failures[server.id] = 0
            self._crashes.pop(spec.name, None)
            if server.id not in self._reported:
                why = await self._report_loaded(spec, server)
                if not why:
                    self._reported.add(server.id)
                    self._unread.pop(server.id, None)
                elif self._no_definitions(server):
                    # Healthy, but its definitions cannot be read: an error with its reason,
                    # rather than a location LOADING for ever with nothing said.
                    await self._report_failed(spec, server, f"has no definitions to give: {why}")
                    await self._remove(server)
                    self._given_up[spec.name] = spec.generation
                    return
            if server.id in self._reported:
                # Blue/green: older generations go only once the new one serves.
                for old in servers:
                    if old.generation < spec.generation:
                        await self._remove(old)
            return
        if server.id not in self._reported:
            if self._past_startup(server):
                age = time.time() - (server.started_at or time.time())
                await self._report_failed(spec, server, f"not healthy within {age:.0f} s")
                await self._remove(server)
                self._given_up[spec.name] = spec.generation
            return
        self._failures[server.id] = self._failures.get(server.id, 0) + 1
        if self._failures[server.id] >= self._failures_before_redeploy:
            log.warning(
                "code server of %s failed %d health checks: redeploying",
                spec.name,
                self._failures[server.id],
            )
            await self._remove(server)
            await self._start(spec)

    async def launch_spec(self, launch: LaunchRun) -> LaunchRun:
        """The launch, with the command and environment its location's code server gives.

        ``LocationUnavailable`` while no server answers (yet); ``LaunchFailed`` once one
        answered and the answer is no launch spec (refused, failed, malformed), or the
        location's server of this generation was given up."""
        spec = next(
            (s for specs in self._snapshots.values() for s in specs if s.name == launch.location),
            None,
        )
        if spec is None:
            raise LocationUnavailable(f"location {launch.location!r} is not kept by this agent")
        servers = [s for s in await self.servers.list() if s.location == spec.name and s.running]
        # Servers already serving first, newest generation first: during a blue/green
        # redeploy the old one still answers until the new one does.
        servers.sort(key=lambda s: (s.id in self._reported, s.generation), reverse=True)
        wrong: str | None = None
        for server in servers:
            status, reply = await self.servers.post(
                server, "/launch-spec", {"job": launch.job, "config": launch.config}
            )
            if status == 200:
                try:
                    given = msgspec.convert(reply, _LaunchSpec)
                except msgspec.ValidationError as exc:
                    wrong = f"a launch spec that is not one ({exc})"
                    continue
                if any(is_reference(value) for value in given.env.values()):
                    # Only the location's registered env names secrets of this host.
                    raise LaunchFailed("the code server's launch spec names a secret reference")
                # The location's references stay references: the launcher resolves them and
                # knows which values to redact.
                return msgspec.structs.replace(
                    launch,
                    image=spec.image,
                    command=given.command,
                    env={**spec.env, **given.env, **launch.env},
                )
            if status == 0:
                continue  # no answer: another server, or later
            error = reply.get("error") if isinstance(reply, dict) else None
            # The server holds the location's secrets: its words may quote them.
            words = self._redactor(spec)(str(error or f"HTTP {status}"))[:2000]
            if status == 400:
                raise LaunchFailed(f"the code server refused the run: {words}")
            wrong = f"HTTP {status}: {words}"
        if wrong is not None:
            raise LaunchFailed(f"the code server of location {spec.name!r} answered {wrong}")
        if self._given_up.get(spec.name) == spec.generation:
            raise LaunchFailed(
                f"the code server of location {spec.name!r} (generation {spec.generation}) "
                "failed to start; redeploy the location"
            )
        raise LocationUnavailable(f"no code server of location {spec.name!r} answers yet")

    async def _start(self, spec: LocationSpec) -> None:
        try:
            self.servers.runtime.policy.check_image(spec.image)
            env, _ = self._secrets.resolve(spec.env)
            server = await self.servers.start(spec, env)
        except AgentError as exc:
            if isinstance(exc, DockerUnavailable):
                raise
            await self._publish(
                LocationFailed(
                    location=spec.name,
                    generation=spec.generation,
                    agent_id=self._agent_id,
                    message=str(exc),
                )
            )
            self._given_up[spec.name] = spec.generation
            return
        log.info(
            "code server of %s (generation %d) started: %s",
            spec.name,
            spec.generation,
            server.id[:12],
        )

    def _past_startup(self, server: CodeServer) -> bool:
        """Whether ``server`` has had the time a code server has to start serving."""
        return time.time() - (server.started_at or time.time()) > self._startup_timeout_s

    def _no_definitions(self, server: CodeServer) -> bool:
        """One more round where ``server`` answered its health and not its definitions; True
        once that has gone on for a startup's time since this keeper first met it, and for
        ``failures_before_redeploy`` rounds in a row. From this keeper's first meeting, not
        the container's start: a server adopted after the agent's restart has run for hours,
        and one answer lost then must not give its location up."""
        now = time.time()
        first, rounds = self._unread.get(server.id, (now, 0))
        self._unread[server.id] = (first, rounds + 1)
        return rounds + 1 >= self._failures_before_redeploy and (
            now - first > self._startup_timeout_s
        )

    async def _report_loaded(self, spec: LocationSpec, server: CodeServer) -> str:
        """Report the server's definitions; "" once done, else why they cannot be read."""
        definitions, why = await self.servers.ask_why(server, "/definitions")
        if not isinstance(definitions, dict):
            return why or "/definitions: an answer that is not a JSON object"
        jobs = definitions.get("jobs")
        if jobs is None:
            jobs = []  # a location with no jobs (yet) may say so by saying nothing
        if not isinstance(jobs, list):
            return "/definitions: an answer whose jobs are not a list"
        # Off the loop: a large answer takes a while to read through, and the agent's
        # heartbeats, launches and reports go on meanwhile.
        event = await asyncio.to_thread(self._loaded, spec, server, jobs)
        await self._publish(event)
        log.info("location %s loaded: %d job(s)", spec.name, len(event.jobs))
        return ""

    def _loaded(self, spec: LocationSpec, server: CodeServer, jobs: list[Any]) -> LocationLoaded:
        return fit_to_message(
            LocationLoaded(
                location=spec.name,
                generation=spec.generation,
                agent_id=self._agent_id,
                container_id=server.id,
                jobs=job_definitions(spec.name, jobs),
            )
        )

    def _redactor(self, spec: LocationSpec) -> Redactor:
        """Redacts the values of the location's secrets (none when they cannot be read)."""
        try:
            env, keys = self._secrets.resolve(spec.env)
        except MissingSecret:
            return Redactor()
        return Redactor(env[key] for key in keys)

    async def _report_failed(self, spec: LocationSpec, server: CodeServer, why: str) -> None:
        tail: tuple[str, ...] = ()
        if self._forward_output:
            tail = await self.servers.runtime.output_tail(server.id, 50, self._redactor(spec))
        await self._publish(
            LocationFailed(
                location=spec.name,
                generation=spec.generation,
                agent_id=self._agent_id,
                message=f"code server {why}",
                output_tail=tail,
            )
        )

    async def _remove(self, server: CodeServer) -> None:
        self._reported.discard(server.id)
        self._failures.pop(server.id, None)
        self._unread.pop(server.id, None)
        await self.servers.runtime.remove(server.id)

    async def _publish(self, event: LocationLoaded | LocationFailed) -> None:
        await self._publisher.publish(STATUS_EXCHANGE, event_routing_key(event), event)

    async def close(self) -> None:
        for task in list(self._asking):
            task.cancel()
        if self._subscription is not None:
            await self._subscription.close()
