"""``dispatcher monitor``: turns silence, crashes and timeouts into state changes and alerts.

Rules (thresholds in ``MonitorSettings``):
- agent lost: no heartbeat for ``lost_after_beats`` of its intervals → its in-flight runs
  fail with AGENT_LOST (retried per their policy); TerminateRun waits on its queue;
- agent back: a lost agent's heartbeat → alert, and its superseded attempts are fenced;
- agent left: a drained agent that stopped with nothing running → LEFT, no failover;
- held by the gone: a run held by an agent lost or left (its claim or launch recorded after
  the decision) fails over once the agent stays unheard for a loss threshold more;
- run vanished: a STARTING/STARTED run missing from several complete heartbeats of its live
  agent in a row → UNEXPECTED_TERMINATION; one its agent lists as exited or reported is
  waited for (its final event is on the way) up to ``exited_grace_s``;
- start timeout: STARTING for too long → START_TIMEOUT, and the container is terminated;
- max runtime: STARTED for longer than the run allows → MAX_RUNTIME, terminated;
- running long: one alert when a run has been STARTED for longer than ``long_running_s``.

Only the monitor that holds a PostgreSQL advisory lock acts; others wait as standbys and
take over when its session ends. A new active monitor rebuilds its view from PostgreSQL and
the next heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from schemas import AgentHeartbeat, ContainerState, Event, FailureReason, event_decoder
from schemas.topology import STATUS_MONITOR_QUEUE
from transport.connection import REFUSED, connect
from transport.consumer import Consumer
from transport.delivery import Delivery
from transport.errors import BrokerRefused
from transport.process import bounded, unless_stopped
from transport.publisher import Publisher
from transport.topology import (
    MONITOR_QUEUE_ARGUMENTS,
    declare_monitor_queue,
    declare_topology_if_allowed,
)

from . import metrics, provenance
from .alerts import AlertDeliverer
from .errors import StoreUnavailable
from .ports import SupervisionStore
from .settings import MonitorSettings, trusted_broker_users
from .states import RunState
from .store import ActiveRun, AgentLoss, Database, Leadership, LeadershipLost

log = logging.getLogger(__name__)

AttemptKey = tuple[uuid.UUID, int]
#: States in which an agent lists an attempt whose container has ended: "exited" (the final
#: event is being published) and "reported" (published; the store may not have applied it).
FINISHED_STATES = frozenset({"exited", "dead", "reported"})
#: A live agent's listed attempts are checked for fencing on its first heartbeat seen and
#: then on every FENCE_EVERY-th.
FENCE_EVERY = 10


#: Heartbeat message ids kept per agent, to hear each beat once.
HEARD_IDS_KEPT = 64
#: A lag past this many seconds is logged (once, and once more when caught up).
LAG_LOGGED_S = 1.0
#: A heartbeat this much earlier than its agent's fastest, or later than that by this much
#: beyond the monitor's own lag, is read as the agent's clock being stepped, not as the way
#: through the broker: that agent is measured afresh from it. Without this, one beat stamped
#: a day ahead would make every later beat of that agent look a day late, and the monitor,
#: counting silence beyond its lag, blind. A backlog delays every agent's beats a little more
#: at each batch, so the lag follows it and it is never read as a step.
CLOCK_STEP_S = 600.0
#: The heartbeat interval assumed for an agent that holds a run but was never heard from:
#: the longest the contract allows, so that no agent is taken for lost before its first
#: heartbeat could have come (a run it holds still fails over, not stays for ever).
UNHEARD_INTERVAL_S = 300.0

#: Queues waiting with no live agent are looked for every this many sweeps (a grouped query).
UNSERVED_EVERY = 10


@dataclass
class AgentView:
    """What the monitor knows of one agent."""

    agent_id: str
    last_seen: float  # monotonic
    interval_s: float
    lost: bool = False
    #: Heartbeats received from it by this monitor.
    beats: int = 0
    in_flight: dict[AttemptKey, str] = field(default_factory=dict)
    #: The agent's listing is complete (it has adopted its containers since it started).
    synced: bool = True
    #: Its last heartbeat said it drains: it takes no new work and will stop.
    draining: bool = False
    #: Since when (monotonic) its heartbeats say its Docker engine does not answer, and why.
    engine_down_since: float | None = None
    engine_error: str = ""
    #: The shortest time from a heartbeat's ``sent_at`` to its reading here: the clocks'
    #: difference plus the way through the broker, with no queue in front of the monitor.
    fastest_s: float | None = None
    #: How much later than ``fastest_s`` its last heartbeat was read.
    lateness_s: float | None = None
    #: Its latest heartbeats' message ids: a batch handed over again (the store was out) or
    #: redelivered is not heard twice.
    heard_ids: deque[uuid.UUID] = field(default_factory=lambda: deque(maxlen=HEARD_IDS_KEPT))


@dataclass
class Suspicion:
    """Heartbeats in a row that did not show an active run as running."""

    #: The agent's heartbeat count at the last look (AgentView.beats).
    last_beat: int = -1
    count: int = 0
    #: When its agent first listed it as exited (monotonic), while that lasts.
    exited_since: float | None = None
    #: When it was first seen held by an agent the view holds lost or gone, while that lasts.
    gone_since: float | None = None


class FailureMonitor:
    """The rules, over an in-memory view of agents rebuilt from PostgreSQL and heartbeats.

    Heartbeats only update the view; what they call for in PostgreSQL (an agent back, its
    attempts fenced) is written once per batch of deliveries, and what a sweep finds (agents
    lost or gone) once per sweep: a transaction per agent would put PostgreSQL's round trips
    on the path of every heartbeat.
    """

    def __init__(
        self,
        store: SupervisionStore,
        settings: MonitorSettings,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.wall = wall
        #: How far behind its heartbeats the monitor reads (``lag``), and when it was measured.
        self._lag = 0.0
        self._lag_at = 0.0
        self.agents: dict[str, AgentView] = {}
        self._suspicions: dict[AttemptKey, Suspicion] = {}
        self._sweeps = 0
        #: Agents held lost in the view (kept as the view changes: the gauges read it).
        self._lost = 0
        #: What heartbeats called for that PostgreSQL has not yet recorded: agents heard from
        #: again since they were lost, and listings to check for fencing (the latest of each
        #: agent). Kept until recorded, so that a batch handed over again (the store was
        #: down) still records them though the view has moved on.
        self._returning: set[str] = set()
        self._fencing: dict[str, tuple[ContainerState, ...]] = {}
        #: Since when the monitor's own connection to the broker is lost (None: it hears).
        self._deaf_since: float | None = None

    async def load(self) -> None:
        """Rebuild the view from PostgreSQL: which agents exist and which are lost.

        Silence is measured from now on, by this monitor's own queue: the table's last
        heartbeat may lag behind (the store holds events through a database outage, which is
        also when leadership changes hands), and an agent must not be declared lost for the
        store's delay. An agent already dead is declared lost one threshold after takeover.
        Nor does a run count as missing until its agent has listed its runs to this monitor.
        """
        now = self.clock()
        for row in await self.store.agents():
            view = AgentView(row.agent_id, now, row.interval_s)
            view.synced = False
            # A draining agent that stops is leaving, not lost, as it was for the last leader.
            view.draining = row.status == "DRAINING"
            self.agents[row.agent_id] = view
            self._set_lost(view, row.status in ("LOST", "LEFT"))
        self._update_gauges()
        log.info("monitor view loaded: %d agent(s)", len(self.agents))

    def deaf(self) -> None:
        """The monitor's own connection is lost: agents' heartbeats wait in its queue, and
        no silence it sees now is theirs. Until it hears again, nobody is judged lost."""
        if self._deaf_since is None:
            self._deaf_since = self.clock()
            log.warning("the monitor lost its broker connection: no agent is judged on silence")

    def hearing_again(self) -> None:
        """Connected again: silence is measured from now on, as after a takeover (what
        waited in the queue comes first; an agent dead meanwhile is lost one threshold on)."""
        if self._deaf_since is None:
            return
        now = self.clock()
        log.info(
            "the monitor hears again after %.0f s; agents' silence counts from now",
            now - self._deaf_since,
        )
        self._deaf_since = None
        for view in self.agents.values():
            view.last_seen = max(view.last_seen, now)

    async def on_events(self, deliveries: list[Delivery[Event]]) -> None:
        beats = [d.message for d in deliveries if isinstance(d.message, AgentHeartbeat)]
        if beats:
            await self.on_heartbeats(beats)

    async def on_heartbeat(self, beat: AgentHeartbeat) -> None:
        await self.on_heartbeats([beat])

    async def on_heartbeats(self, beats: Sequence[AgentHeartbeat]) -> None:
        """A batch of heartbeats: the view first, then the returns and the fencing they call
        for, each in one transaction for the whole batch."""
        latest = {
            view.agent_id: view.lateness_s
            for beat in beats
            if (view := self._heard(beat)) is not None and view.lateness_s is not None
        }
        self._measure_lag(latest)
        # Returns before fencing, as one agent's heartbeat would have them. An agent the
        # view holds lost again is left for its next heartbeat to bring back.
        back = sorted(a for a in self._returning if not self.agents[a].lost)
        if back:
            for agent_id in await self.store.agents_back(back):
                log.warning("agent %s is back", agent_id)
        self._returning.clear()
        if self._fencing:
            for agent_id, fenced in (await self.store.fence_all(self._fencing)).items():
                log.warning("agent %s: fenced %d superseded attempt(s)", agent_id, fenced)
            self._fencing.clear()
        self._update_gauges()

    def lag(self) -> float:
        """How many seconds behind its heartbeats the monitor reads now: what the last
        batch measured, less the time since (with nothing more to read, it caught up)."""
        return max(0.0, self._lag - (self.clock() - self._lag_at))

    def _measure_lag(self, latest: dict[str, float]) -> None:
        """The batch's lag: over the agents heard in it, the median (the lower of the middle
        two) of how much later than its fastest each one's last heartbeat was read.

        Over agents, not heartbeats, and only from a batch that heard two agents or more
        (while two or more are not lost): an agent whose beats come ever later (just under a
        clock step each time: its clock set back bit by bit, or a forger) had batches of its
        own beats alone make the lag, which let its next beat be later still, and every
        other agent's silence was forgiven without end. A backlog, or a monitor that
        stalled, delays every agent's beats, and its batches hold many agents."""
        live = sum(1 for view in self.agents.values() if not view.lost)
        if not latest or len(latest) < min(2, live):
            return
        lag = statistics.median_low(latest.values())
        was = self.lag()
        self._lag, self._lag_at = lag, self.clock()
        metrics.MONITOR_LAG.set(self._lag)
        if self._lag > LAG_LOGGED_S >= was:
            log.warning(
                "the monitor reads heartbeats %.1f s late (its queue is backing up); agents "
                "are judged on their silence beyond that",
                self._lag,
            )
        elif was > LAG_LOGGED_S >= self._lag:
            log.info("the monitor caught up with its heartbeats")

    def _heard(self, beat: AgentHeartbeat) -> AgentView | None:
        """Update the view from one heartbeat; note what it calls for in PostgreSQL. None
        for a heartbeat heard already (its batch handed over again, or redelivered)."""
        view = self.agents.get(beat.agent_id)
        if view is None:
            view = self.agents[beat.agent_id] = AgentView(beat.agent_id, 0.0, beat.interval_s)
        if beat.message_id in view.heard_ids:
            return None
        view.heard_ids.append(beat.message_id)
        took = self.wall() - beat.sent_at.timestamp()
        stepped = view.fastest_s is not None and (
            took < view.fastest_s - CLOCK_STEP_S
            or took - view.fastest_s > self.lag() + CLOCK_STEP_S
        )
        if view.fastest_s is None or stepped or took < view.fastest_s:
            view.fastest_s = took
        # Heartbeats of one agent arrive in order (one connection, one queue). A restarted
        # agent's sequence starts from 0 again, so the monitor counts beats itself.
        view.last_seen = self.clock()
        view.interval_s = beat.interval_s
        view.beats += 1
        view.in_flight = {(c.run_id, c.attempt): c.state for c in beat.in_flight}
        view.synced = beat.synced
        view.draining = beat.draining
        if beat.engine_ok:
            view.engine_down_since = None
        elif view.engine_down_since is None:
            view.engine_down_since = view.last_seen
        view.engine_error = beat.engine_error
        # An agent lost for its engine is back once the engine answers again.
        returning = view.lost and beat.engine_ok
        if returning:
            self._set_lost(view, False)
            self._returning.add(beat.agent_id)
        # Fencing asks PostgreSQL about every run listed: do it when it can matter (an agent
        # back from being lost, or first heard of since this monitor took over), and every
        # FENCE_EVERY beats as a safety net, not on every heartbeat of every agent.
        if beat.in_flight and (returning or view.beats % FENCE_EVERY == 1):
            self._fencing[beat.agent_id] = beat.in_flight
        view.lateness_s = took - view.fastest_s
        return view

    # ------------------------------------------------------------------- sweeps

    async def sweep(self) -> None:
        """Evaluate every rule once."""
        await self._agents_lost()
        active = await self.store.active_runs()
        for run in active:
            await self._check_run(run)
        # What ended (or was failed over elsewhere) is suspected of nothing any more: kept,
        # every run the monitor ever watched was an entry for as long as it leads.
        watched = {(run.run_id, run.attempt) for run in active}
        for key in self._suspicions.keys() - watched:
            del self._suspicions[key]
        for waiting in await self.store.overdue_queued():
            note = f"still QUEUED after {waiting.waited_s:.0f} s (its queue timeout)"
            if await self.store.time_out_queued(waiting, note):
                metrics.DECISIONS.labels(FailureReason.QUEUE_TIMEOUT.value).inc()
                log.warning("run %s: QUEUE_TIMEOUT (%s)", waiting.run_id, note)
        self._sweeps += 1
        if self._sweeps % UNSERVED_EVERY == 1:
            for queue in await self.store.unserved_queues(self.settings.unserved_after_s):
                if await self.store.alert_unserved(queue):
                    log.warning(
                        "%d run(s) wait on queue %s with no live agent", queue.waiting, queue.queue
                    )

    async def _agents_lost(self) -> None:
        """Agents silent (or with their engine down) past the threshold: those that drained
        leave, the others are lost, in one transaction each for the whole sweep.

        An agent is held lost in the view only once PostgreSQL has taken the decision: a
        sweep that fails (the store is down) leaves them for the next one.
        """
        if self._deaf_since is not None:
            return
        now = self.clock()
        # What the monitor has not read yet may hold any agent's next heartbeat: silence is
        # counted beyond the monitor's own lag, not from it.
        behind = self.lag()
        losses: list[tuple[AgentView, AgentLoss, float]] = []
        leaving: list[AgentView] = []
        for view in self.agents.values():
            silent = now - view.last_seen
            threshold = self.settings.lost_after_beats * view.interval_s + behind
            engine_down = now - (view.engine_down_since or now)
            if view.lost or (silent <= threshold and engine_down <= threshold):
                continue
            why = None
            if silent <= threshold:
                # It beats, but its Docker engine has not answered for as long as silence
                # would make it lost: its containers are out of its reach.
                why = f"its Docker engine has not answered for {engine_down:.1f} s"
                if view.engine_error:
                    why += f" ({view.engine_error})"
            running = [s for s in view.in_flight.values() if s != "reported"]
            if why is None and view.draining and not running:
                # A drain that ended as it should: the agent stopped with nothing running.
                leaving.append(view)
                continue
            detected = silent if why is None else engine_down
            losses.append((view, AgentLoss(view.agent_id, silent, why), detected))
        if leaving:
            for agent_id in await self.store.agents_left([v.agent_id for v in leaving]):
                log.info("agent %s drained and left", agent_id)
            for view in leaving:
                self._set_lost(view, True)
        if losses:
            failed = await self.store.declare_agents_lost([loss for _, loss, _ in losses])
            for view, loss, detected in losses:
                self._set_lost(view, True)
                runs = failed.get(view.agent_id, [])
                metrics.DETECTION.labels("agent_lost").observe(detected)
                metrics.DECISIONS.labels(FailureReason.AGENT_LOST.value).inc(len(runs))
                log.warning(
                    "agent %s lost (%s); %d run(s) failed over",
                    view.agent_id,
                    loss.why or f"silent for {loss.silent_s:.1f} s",
                    len(runs),
                )
        self._update_gauges()

    async def _check_run(self, run: ActiveRun) -> None:
        settings = self.settings
        if run.state == RunState.CANCELING:
            # The agent stops the container within its grace and says so; a frozen or cut
            # off agent does not: the run ends CANCELED all the same (its container is fenced
            # when the agent is heard of again).
            deadline = (run.cancel_grace_s or 0.0) + settings.cancel_confirm_s
            if run.in_state_s > deadline:
                await self._fail(
                    run,
                    FailureReason.CANCEL_TIMEOUT,
                    f"the stop was not confirmed within {deadline:g} s",
                    terminate=False,
                )
            return
        if run.state == RunState.QUEUED:
            # Claimed, its container being created: only its agent's listing matters.
            await self._check_listed(run)
            return
        start_timeout = run.start_timeout_s or settings.start_timeout_s
        if run.state == RunState.STARTING and run.in_state_s > start_timeout:
            await self._fail(
                run,
                FailureReason.START_TIMEOUT,
                f"not started within {start_timeout:g} s",
                terminate=True,
            )
            return
        running = run.running_s or 0.0
        if run.state == RunState.STARTED and run.max_runtime_s and running > run.max_runtime_s:
            await self._fail(
                run,
                FailureReason.MAX_RUNTIME,
                f"ran longer than its maximum of {run.max_runtime_s:g} s",
                terminate=True,
            )
            return
        if run.state == RunState.STARTED and running > settings.long_running_s:
            await self.store.alert_long_running(run, settings.long_running_s)
        await self._check_listed(run)

    async def _check_listed(self, run: ActiveRun) -> None:
        """A run its live agent no longer lists (vanished), or lists as exited for too long
        with no final event, fails."""
        settings = self.settings
        key = (run.run_id, run.attempt)
        if run.agent_id is None:
            return
        view = self.agents.get(run.agent_id)
        if view is None:
            # It holds a run but was never heard from (killed before its first heartbeat
            # came through, or an identity that never beats): judged on its silence from
            # now, like any agent, so that the run fails over rather than stay for ever.
            log.info("agent %s holds run %s but was never heard from", run.agent_id, run.run_id)
            view = self.agents[run.agent_id] = AgentView(
                run.agent_id, self.clock(), UNHEARD_INTERVAL_S
            )
        suspicion = self._suspicions.setdefault(key, Suspicion())
        if view.lost:
            await self._held_by_the_gone(run, view, suspicion)
            return
        suspicion.gone_since = None
        if view.beats == suspicion.last_beat:
            return  # no new heartbeat since the last look
        suspicion.last_beat = view.beats
        state = view.in_flight.get(key)
        if state in FINISHED_STATES:
            # Its agent has seen the exit: the final event is on its way (or the store is
            # behind). Wait for it, within a bounded grace, rather than fail a run that may
            # well have succeeded.
            suspicion.count = 0
            if suspicion.exited_since is None:
                suspicion.exited_since = self.clock()
            waited = self.clock() - suspicion.exited_since
            if waited > settings.exited_grace_s:
                await self._fail(
                    run,
                    FailureReason.UNEXPECTED_TERMINATION,
                    f"listed as {state} by agent {run.agent_id} for {waited:.0f} s with no "
                    "final event",
                    terminate=True,
                )
            return
        suspicion.exited_since = None
        if state is not None or not view.synced:
            # Running; or the agent has not yet listed its containers since it (re)started.
            suspicion.count = 0
            return
        suspicion.count += 1
        if suspicion.count >= settings.vanished_after_beats:
            await self._fail(
                run,
                FailureReason.UNEXPECTED_TERMINATION,
                f"not listed by agent {run.agent_id} in {suspicion.count} heartbeats in a row "
                "with no final event",
                terminate=True,
            )

    async def _held_by_the_gone(
        self, run: ActiveRun, view: AgentView, suspicion: Suspicion
    ) -> None:
        """A run held by an agent the view holds lost, or gone after a drain. Its loss failed
        over what it held then, and a leaving agent held nothing: this claim or launch was
        recorded after (the status store behind the monitor, or a claim answered after its
        agent gave the launch back and left), and no heartbeat of a gone agent will list it.

        It fails once the agent has stayed unheard for as long again as makes an agent lost
        (an agent that is back says so within an interval: a heartbeat clears ``lost``), or
        for the exited grace when its last listing showed it finished (its final event may
        be in a status store that is behind)."""
        now = self.clock()
        if suspicion.gone_since is None:
            suspicion.gone_since = now
        settings = self.settings
        finished = view.in_flight.get((run.run_id, run.attempt)) in FINISHED_STATES
        wait = settings.lost_after_beats * view.interval_s + self.lag()
        if finished or not view.beats:
            # Listed finished, or not heard since this monitor took over (it may have been).
            wait = max(wait, settings.exited_grace_s)
        if now - suspicion.gone_since <= wait:
            return
        if now - view.last_seen <= settings.lost_after_beats * view.interval_s:
            why = "its Docker engine does not answer"  # it beats, lost for its engine
        else:
            why = f"unheard of for {wait:.0f} s since the run became its"
        await self._fail(
            run,
            FailureReason.UNEXPECTED_TERMINATION if finished else FailureReason.AGENT_LOST,
            f"held by agent {run.agent_id}, lost or gone: {why}"
            + (", with no final event" if finished else ""),
            terminate=True,
        )

    async def _fail(
        self, run: ActiveRun, reason: FailureReason, note: str, terminate: bool
    ) -> None:
        applied = await self.store.fail_attempt(
            run.run_id, run.attempt, reason, note, run.agent_id if terminate else None
        )
        self._suspicions.pop((run.run_id, run.attempt), None)
        if applied:
            metrics.DECISIONS.labels(reason.value).inc()
            log.warning("run %s attempt %d: %s (%s)", run.run_id, run.attempt, reason.value, note)

    def _set_lost(self, view: AgentView, lost: bool) -> None:
        self._lost += lost - view.lost
        view.lost = lost

    def _update_gauges(self) -> None:
        metrics.AGENTS_ALIVE.set(len(self.agents) - self._lost)
        metrics.AGENTS_LOST.set(self._lost)


async def run_monitor(settings: MonitorSettings, stop: asyncio.Event) -> None:
    """Stand by until leading, then apply the rules until ``stop`` or a failure.

    Losing the leader lock (its database session ended) is not a failure: the monitor stops
    acting and stands by again, so a PostgreSQL restart needs no process restart.
    """
    leadership = Leadership(
        settings.database_url, f"hd-monitor:{settings.database_schema or 'public'}"
    )
    store = await unless_stopped(
        stop,
        Database.open(
            settings.database_url,
            schema=settings.database_schema,
            retry_backoff_s=settings.retry_backoff_s,
        ),
    )
    try:
        await unless_stopped(stop, store.upgrade())
        while await leadership.acquire(settings.standby_poll_s, stop):
            log.info("this monitor is active")
            try:
                await _lead(settings, store, leadership, stop)
            except LeadershipLost as exc:
                log.warning("%s; standing by again", exc)
            await leadership.release()
    finally:
        await leadership.release()
        await store.close()


async def _lead(
    settings: MonitorSettings, store: Database, leadership: Leadership, stop: asyncio.Event
) -> None:
    """Act as the active monitor until ``stop``; raises what ended it otherwise."""
    # Start-up: the view from PostgreSQL, then the monitor's own queue for what follows.
    monitor = FailureMonitor(store.supervision, settings)
    await unless_stopped(stop, monitor.load())
    connection = await unless_stopped(stop, connect(settings.amqp_url, "dispatcher-monitor"))

    # Agents' heartbeats wait in the monitor's queue while its connection is away: their
    # silence then is the monitor's, not theirs.
    def lost(*_: object) -> None:
        monitor.deaf()

    connection.close_callbacks.add(lost)
    connection.reconnect_callbacks.add(lambda *_: monitor.hearing_again())
    try:
        # The topology when this identity may declare it (one shared user); a monitor's own
        # identity may declare only its queue, and finds the rest declared by the operator
        # (`identities add`) or the control plane.
        await unless_stopped(stop, declare_topology_if_allowed(connection))
        try:
            async with connection.channel() as channel:
                await unless_stopped(stop, declare_monitor_queue(channel))
        except REFUSED as exc:
            raise BrokerRefused(
                f"the broker refused the monitor's queue ({exc}): give the monitor's user "
                "configure, write and read permissions on it (`dispatcher identities add`)"
            ) from None
        publisher = Publisher(connection)
        consumer = Consumer(
            connection,
            STATUS_MONITOR_QUEUE,
            event_decoder(),
            monitor.on_events,
            publisher,
            queue_arguments=MONITOR_QUEUE_ARGUMENTS,
            verify=provenance.check,
            check_sender=provenance.sender_check(trusted_broker_users(settings.amqp_url)),
        )
        await consumer.start()
        deliverer = AlertDeliverer(store.alerts, settings.webhook_urls)
        tasks = [
            asyncio.create_task(consumer.run(), name="consumer"),
            asyncio.create_task(_every(settings.sweep_interval_s, monitor.sweep), name="rules"),
            asyncio.create_task(_every(0.5, deliverer.deliver_due), name="alerts"),
            asyncio.create_task(_every(5.0, lambda: _count_runs(store)), name="run-gauges"),
            asyncio.create_task(leadership.watch(), name="leadership"),
        ]
        stopper: asyncio.Task[Any] = asyncio.create_task(stop.wait(), name="stop")
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in done if t is not stopper and not t.cancelled() and t.exception()]

        # Shutdown: stop consuming, finish the batch in hand, cancel the loops, let go of
        # the lock last, so that a standby takes over only once this one has stopped acting.
        # Each step bounded: with the broker away, a robust channel's cancel or close waits
        # for a reconnection that may never come.
        await bounded(consumer.stop(), 10, "stopping the consumer")
        for task in tasks:
            if task.get_name() != "consumer":
                task.cancel()
        await asyncio.wait(tasks, timeout=10)
        stopper.cancel()
        await bounded(consumer.close(), 10, "closing the consumer")
        await bounded(publisher.close(), 10, "closing the publisher")
        if failed:
            raise failed[0].exception()  # type: ignore[misc]
    finally:
        with contextlib.suppress(Exception):
            connection.close_callbacks.discard(lost)  # closed on purpose: not a loss
            await asyncio.shield(connection.close())


async def _every(interval_s: float, action: Callable[[], Any]) -> None:
    """Run ``action`` every ``interval_s``; a passing store outage is logged, not fatal."""
    while True:
        try:
            await action()
        except StoreUnavailable as exc:
            log.error("%s", exc)
        await asyncio.sleep(interval_s)


async def _count_runs(store: Database) -> None:
    for state, count in (await store.runs.count_by_state()).items():
        metrics.RUNS.labels(state).set(count)
