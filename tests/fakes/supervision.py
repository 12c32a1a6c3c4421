"""An in-memory store for the failure monitor: ``FakeSupervision`` (``dispatcher.ports``).

A model of the tables the monitor's decisions touch (runs, run events, agents, alerts, the
outbox), written from the SQL of ``dispatcher/store/`` (supervision, events, agents, alerts,
outbox) and using the same rules: ``states.next_state``, the run's ``RetryPolicy``,
``retries.backoff_s`` and ``store.decision_id``. Events, outbox messages and alerts are kept
once per id or dedupe key, so a decision taken twice changes nothing the second time.
``tests/contracts/supervision_contract.py`` holds this and ``store.Supervision`` on
PostgreSQL to the same behaviour.

Seeded as the control plane would: ``create`` (``Database.runs.create``) and ``apply_events``
(``Database.apply_events``: heartbeats and run events as agents report them). Time is the
given clock, read where PostgreSQL reads ``now()``.

Not modelled: output, locations, cancellation requests, the relay (nothing is ever sent),
alert delivery, concurrency (each call is one transaction by construction: a batch method,
``declare_agents_lost`` say, is one call, and calls none of the others).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

from dispatcher.retries import DEFAULT_MAX_RETRIES, DEFAULT_RETRY_ON, RetryPolicy, backoff_s
from dispatcher.states import TERMINAL, RunState, next_state
from dispatcher.store import (
    ActiveRun,
    AgentLoss,
    AgentRow,
    OutboxItem,
    UnservedQueue,
    WaitingRun,
    decision_id,
)
from dispatcher.store.alerts import AGENT_BACK, AGENT_DOWN, QUEUE_UNSERVED, RUN_FAILED, RUN_LONG
from dispatcher.store.events import stored_id
from dispatcher.store.outbox import answer
from dispatcher.store.runs import launch, request_event_id
from schemas import (
    AgentHeartbeat,
    ContainerState,
    Event,
    FailureReason,
    Message,
    RunClaimed,
    RunEnded,
    RunEvent,
    RunFailed,
    RunRetrying,
    SubmitRun,
    TerminateRun,
)
from schemas.topology import (
    CONTROL_EXCHANGE,
    INSTRUCTIONS_EXCHANGE,
    MONITOR_SOURCE,
    STATUS_EXCHANGE,
    event_routing_key,
)

#: Listed states of containers that have ended (``Supervision.fence`` skips them).
_ENDED = ("exited", "dead", "reported")

#: A run's states while an agent holds it.
_ACTIVE = (RunState.QUEUED, RunState.STARTING, RunState.STARTED, RunState.CANCELING)


@dataclass
class FakeRun:
    """A ``runs`` row: the columns the monitor's decisions read or write."""

    submission: SubmitRun
    state: RunState = RunState.QUEUED
    attempt: int = 1
    agent_id: str | None = None
    container_id: str | None = None
    exit_code: int | None = None
    failure_reason: str | None = None
    failure_message: str | None = None
    state_changed_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    cancel_grace_s: float | None = None

    @property
    def run_id(self) -> uuid.UUID:
        return self.submission.run_id

    def retry_policy(self) -> RetryPolicy:
        """As ``store.runs.retry_policy`` reads it from the row."""
        s = self.submission
        return RetryPolicy(
            max_retries=DEFAULT_MAX_RETRIES if s.max_retries is None else s.max_retries,
            retry_on=DEFAULT_RETRY_ON if s.retry_on is None else tuple(s.retry_on),
        )


@dataclass
class FakeAgent:
    """An ``agents`` row."""

    agent_id: str
    interval_s: float
    last_heartbeat_at: float
    status: str = "ALIVE"
    queues: tuple[str, ...] = ()
    #: When it was last declared lost, and how many times it was: together they name the
    #: incident, as PostgreSQL's ``lost_at`` (the ``now()`` of a transaction) does alone; a
    #: manual clock need not move between two episodes.
    lost_at: float | None = None
    episodes: int = 0

    @property
    def incident(self) -> str:
        return f"{self.agent_id}:{self.lost_at}/{self.episodes}"


@dataclass(frozen=True)
class FakeEventRow:
    """A ``run_events`` row."""

    event_id: uuid.UUID
    run_id: uuid.UUID
    attempt: int
    kind: str
    from_state: RunState | None
    to_state: RunState | None


@dataclass(frozen=True)
class FakeAlert:
    dedupe_key: str
    kind: str
    subject: str
    message: str


@dataclass
class FakeSupervision:
    """``dispatcher.ports.SupervisionStore`` in memory; ``clock`` is its ``now()``."""

    clock: Callable[[], float]
    retry_backoff_s: float = 1.0
    runs: dict[uuid.UUID, FakeRun] = field(default_factory=dict)
    agents_by_id: dict[str, FakeAgent] = field(default_factory=dict)
    events: dict[uuid.UUID, FakeEventRow] = field(default_factory=dict)
    #: By message id, in insertion order: the ``outbox`` table's unique message id.
    outbox: dict[uuid.UUID, OutboxItem] = field(default_factory=dict)
    alerts: dict[str, FakeAlert] = field(default_factory=dict)
    _keys: set[str] = field(default_factory=set)

    # ---------------------------------------------------------------- seeding

    async def create(self, submissions: Sequence[SubmitRun]) -> list[uuid.UUID]:
        """``Database.runs.create``: QUEUED runs and their first LaunchRun; new ids only."""
        created = []
        for s in submissions:
            key = s.idempotency_key or str(s.run_id)
            if s.run_id in self.runs or key in self._keys:
                continue
            self._keys.add(key)
            self.runs[s.run_id] = FakeRun(s, state_changed_at=self.clock())
            self._record(
                FakeEventRow(
                    request_event_id("SubmitRun", s.message_id),
                    s.run_id,
                    1,
                    "SubmitRun",
                    None,
                    RunState.QUEUED,
                )
            )
            self._insert(
                OutboxItem(launch(msgspec.structs.asdict(s), 1), INSTRUCTIONS_EXCHANGE, s.queue)
            )
            created.append(s.run_id)
        return created

    async def apply_events(self, batch: Sequence[Event]) -> int:
        """``Database.apply_events`` for heartbeats and run events; returns state changes."""
        changes = 0
        for event in batch:
            if isinstance(event, AgentHeartbeat):
                self._record_heartbeat(event)
            elif isinstance(event, RunEvent) and self._apply(event):
                changes += 1
        return changes

    def written(self, kind: type[Message]) -> list[OutboxItem]:
        """Outbox rows of one message kind, oldest first."""
        return [item for item in self.outbox.values() if isinstance(item.message, kind)]

    # ------------------------------------------------- dispatcher.ports.SupervisionStore

    async def agents(self) -> list[AgentRow]:
        now = self.clock()
        return [
            AgentRow(a.agent_id, a.status, a.interval_s, now - a.last_heartbeat_at)
            for a in self.agents_by_id.values()
        ]

    async def active_runs(self) -> list[ActiveRun]:
        now = self.clock()
        return [
            ActiveRun(
                r.run_id,
                r.attempt,
                r.state,
                r.agent_id,
                r.submission.start_timeout_s,
                r.submission.max_runtime_s,
                now - r.state_changed_at,
                None if r.started_at is None else now - r.started_at,
                r.cancel_grace_s,
            )
            for r in self.runs.values()
            if r.state in (RunState.STARTING, RunState.STARTED, RunState.CANCELING)
            or (r.state == RunState.QUEUED and r.agent_id is not None)
        ]

    async def fail_attempt(
        self,
        run_id: uuid.UUID,
        attempt: int,
        reason: FailureReason,
        message: str,
        terminate_on: str | None = None,
    ) -> bool:
        return self._fail(run_id, attempt, reason, message, terminate_on)

    def _fail(
        self,
        run_id: uuid.UUID,
        attempt: int,
        reason: FailureReason,
        message: str,
        terminate_on: str | None,
    ) -> bool:
        event = RunFailed(
            message_id=decision_id(run_id, attempt, reason.value),
            run_id=run_id,
            attempt=attempt,
            reason=reason,
            message=message,
        )
        applied = self._apply(event)
        if applied:
            self._insert(
                OutboxItem(event, STATUS_EXCHANGE, event_routing_key(event, MONITOR_SOURCE))
            )
        if applied and terminate_on:
            self._terminate(terminate_on, run_id, attempt, reason, message)
        return applied

    async def declare_agent_lost(
        self, agent_id: str, silent_s: float, why: str | None = None
    ) -> list[uuid.UUID]:
        failed = await self.declare_agents_lost([AgentLoss(agent_id, silent_s, why)])
        return failed.get(agent_id, [])

    async def declare_agents_lost(self, losses: Sequence[AgentLoss]) -> dict[str, list[uuid.UUID]]:
        declared: dict[str, list[uuid.UUID]] = {}
        for loss in losses:
            agent = self.agents_by_id.get(loss.agent_id)
            if agent is None and any(
                r.agent_id == loss.agent_id and r.state in _ACTIVE for r in self.runs.values()
            ):
                # Never heard from, but it holds a run: recorded first (``agents.mark_lost``).
                agent = self.agents_by_id[loss.agent_id] = FakeAgent(
                    loss.agent_id, 2.0, self.clock()
                )
            if agent is None or agent.status not in ("ALIVE", "DRAINING"):
                continue  # ``agents.mark_lost`` changed nothing
            declared[loss.agent_id] = self._declare_lost(agent, loss)
        return declared

    def _declare_lost(self, agent: FakeAgent, loss: AgentLoss) -> list[uuid.UUID]:
        agent.status, agent.lost_at = "LOST", self.clock()
        agent.episodes += 1
        agent_id = agent.agent_id
        note = f"agent {agent_id} lost: {loss.why or f'no heartbeat for {loss.silent_s:.1f} s'}"
        failed = self._fail_held(agent_id, note)
        self._raise_alert(
            f"agent-down:{agent.incident}",
            AGENT_DOWN,
            f"agent {agent_id}",
            f"{note}; {len(failed)} run(s) in flight failed over",
        )
        return failed

    async def overdue_queued(self) -> list[WaitingRun]:
        now = self.clock()
        return [
            WaitingRun(r.run_id, r.attempt, r.submission.queue, now - r.state_changed_at)
            for r in self.runs.values()
            if r.state == RunState.QUEUED
            and r.submission.queue_timeout_s is not None
            and now - r.state_changed_at > r.submission.queue_timeout_s
        ]

    async def time_out_queued(self, run: WaitingRun, note: str) -> bool:
        row = self.runs[run.run_id]
        holder = row.agent_id if row.attempt == run.attempt else None
        applied = self._fail(run.run_id, run.attempt, FailureReason.QUEUE_TIMEOUT, note, None)
        if applied and self.runs[run.run_id].state not in TERMINAL and holder is not None:
            self._terminate(holder, run.run_id, run.attempt, FailureReason.QUEUE_TIMEOUT, note)
        if applied and self.runs[run.run_id].state in TERMINAL:
            # ``cancellation.never_launch``: every live agent of the queue, and the holder.
            told = {
                a.agent_id
                for a in self.agents_by_id.values()
                if a.status == "ALIVE" and run.queue in a.queues
            } | ({holder} if holder else set())
            for agent_id in sorted(told):
                self._insert(
                    OutboxItem(
                        TerminateRun(
                            message_id=decision_id(run.run_id, run.attempt, f"fence:{agent_id}"),
                            run_id=run.run_id,
                            attempt=run.attempt,
                            reason=note,
                        ),
                        CONTROL_EXCHANGE,
                        agent_id,
                    )
                )
        return applied

    async def unserved_queues(self, min_wait_s: float) -> list[UnservedQueue]:
        now = self.clock()
        served = {q for a in self.agents_by_id.values() if a.status == "ALIVE" for q in a.queues}
        waiting: dict[str, list[FakeRun]] = {}
        for run in self.runs.values():
            old_enough = now - run.state_changed_at > min_wait_s
            if run.state == RunState.QUEUED and old_enough and run.submission.queue not in served:
                waiting.setdefault(run.submission.queue, []).append(run)
        found = []
        for queue, runs in sorted(waiting.items()):
            oldest = min(runs, key=lambda r: r.state_changed_at)
            found.append(
                UnservedQueue(queue, len(runs), oldest.run_id, now - oldest.state_changed_at)
            )
        return found

    async def alert_unserved(self, queue: UnservedQueue) -> bool:
        return self._raise_alert(
            f"queue-unserved:{queue.queue}:{queue.oldest_run_id}",
            QUEUE_UNSERVED,
            f"queue {queue.queue}",
            f"{queue.waiting} run(s) wait on queue {queue.queue} and no live agent consumes it",
        )

    async def agent_left(self, agent_id: str) -> bool:
        return bool(await self.agents_left([agent_id]))

    async def agents_left(self, agent_ids: Sequence[str]) -> list[str]:
        left = []
        for agent_id in agent_ids:
            agent = self.agents_by_id.get(agent_id)
            if agent is not None and agent.status == "DRAINING":
                agent.status = "LEFT"
                left.append(agent_id)
        return sorted(left)

    def _fail_held(self, agent_id: str, note: str) -> list[uuid.UUID]:
        """``supervision._fail_held`` for one agent."""
        held = sorted(
            (r.run_id, r.attempt)
            for r in self.runs.values()
            if r.agent_id == agent_id
            and r.state
            in (RunState.QUEUED, RunState.STARTING, RunState.STARTED, RunState.CANCELING)
        )
        return [
            run_id
            for run_id, attempt in held
            if self._fail(run_id, attempt, FailureReason.AGENT_LOST, note, agent_id)
        ]

    async def agent_back(self, agent_id: str) -> bool:
        return bool(await self.agents_back([agent_id]))

    async def agents_back(self, agent_ids: Sequence[str]) -> list[str]:
        back = []
        for agent_id in sorted(set(agent_ids)):
            agent = self.agents_by_id.get(agent_id)
            if agent is None or agent.status != "LOST":
                continue
            agent.status = "ALIVE"  # lost_at stays, as ``agents.mark_alive`` leaves it
            self._raise_alert(
                f"agent-back:{agent.incident}",
                AGENT_BACK,
                f"agent {agent_id}",
                f"agent {agent_id} is back after being declared lost",
            )
            back.append(agent_id)
        return back

    async def fence(self, agent_id: str, in_flight: Sequence[ContainerState]) -> int:
        return (await self.fence_all({agent_id: in_flight})).get(agent_id, 0)

    async def fence_all(self, listings: Mapping[str, Sequence[ContainerState]]) -> dict[str, int]:
        counts = {
            agent_id: self._fence(agent_id, listing) for agent_id, listing in listings.items()
        }
        return {agent_id: n for agent_id, n in counts.items() if n}

    def _fence(self, agent_id: str, in_flight: Sequence[ContainerState]) -> int:
        fenced = 0
        for container in in_flight:
            if container.state in _ENDED:
                continue
            run = self.runs.get(container.run_id)
            if run is None:
                continue
            superseded = container.attempt < run.attempt
            current = container.attempt == run.attempt
            ended = current and run.state in TERMINAL
            foreign = current and run.agent_id not in (None, agent_id)
            if superseded or ended or foreign:
                fenced += self._terminate(
                    agent_id,
                    container.run_id,
                    container.attempt,
                    FailureReason.AGENT_LOST,
                    f"fenced: this attempt is held by agent {run.agent_id}"
                    if foreign and not superseded
                    else "fenced: this attempt was failed over while its agent was away",
                    rule="fence",
                )
        return fenced

    async def alert_long_running(self, run: ActiveRun, threshold_s: float) -> bool:
        return self._raise_alert(
            f"run-long:{run.run_id}:{run.attempt}",
            RUN_LONG,
            f"run {run.run_id}",
            f"run {run.run_id} has been running for more than {threshold_s:.0f} s",
        )

    # ------------------------------------------------------------------ tables

    def _record_heartbeat(self, beat: AgentHeartbeat) -> None:
        """``agents.record_heartbeat``: an upsert; ALIVE or DRAINING as the beat says, but a
        LOST agent stays LOST (the monitor decides it is back)."""
        said = "DRAINING" if beat.draining else "ALIVE"
        agent = self.agents_by_id.get(beat.agent_id)
        if agent is None:
            self.agents_by_id[beat.agent_id] = FakeAgent(
                beat.agent_id, beat.interval_s, self.clock(), status=said, queues=beat.queues
            )
            return
        agent.queues = beat.queues
        agent.interval_s = beat.interval_s
        agent.last_heartbeat_at = self.clock()
        if agent.status != "LOST":
            agent.status = said

    def _raise_alert(self, dedupe_key: str, kind: str, subject: str, message: str) -> bool:
        if dedupe_key in self.alerts:
            return False
        self.alerts[dedupe_key] = FakeAlert(dedupe_key, kind, subject, message)
        return True

    def _insert(self, item: OutboxItem) -> int:
        """``outbox.insert`` of one item: 0 when its message id was written before."""
        if item.message.message_id in self.outbox:
            return 0
        self.outbox[item.message.message_id] = item
        return 1

    def _record(self, row: FakeEventRow) -> bool:
        """``events._insert``: False when the event id was recorded before."""
        if row.event_id in self.events:
            return False
        self.events[row.event_id] = row
        return True

    def _terminate(
        self,
        agent_id: str,
        run_id: uuid.UUID,
        attempt: int,
        reason: FailureReason,
        note: str,
        rule: str = "terminate",
    ) -> int:
        """``supervision._terminate``: a TerminateRun per agent, once per decision."""
        message = TerminateRun(
            message_id=decision_id(run_id, attempt, f"{rule}:{agent_id}"),
            run_id=run_id,
            attempt=attempt,
            reason=note,
            grace_s=10.0,
            failure_reason=reason,
        )
        return self._insert(OutboxItem(message, CONTROL_EXCHANGE, agent_id))

    # -------------------------------------------------------------- run events

    def _apply(self, event: RunEvent) -> bool:
        """``events.apply``: True when the event changed its run's state."""
        run = self.runs.get(event.run_id)
        if run is None:
            return False
        current = run.state
        if isinstance(event, RunClaimed):
            # ``events.claim``: the first claim of the current attempt holds it (the answers
            # to claimants are the agent tests' concern, not the monitor's).
            if event.attempt == run.attempt and current not in TERMINAL and run.agent_id is None:
                run.agent_id = event.agent_id
            return False
        sender = getattr(event, "agent_id", None)
        foreign = run.agent_id is not None and sender is not None and sender != run.agent_id
        new = next_state(current, event) if event.attempt == run.attempt and not foreign else None
        retry = (
            new == RunState.FAILURE
            and isinstance(event, RunFailed)
            and run.retry_policy().retries(event.reason, event.attempt)
        )
        if retry:
            new = RunState.QUEUED
        kind = type(event).__name__
        row = FakeEventRow(
            stored_id(event), event.run_id, event.attempt, kind, current if new else None, new
        )
        if not self._record(row) or new is None:
            return False
        if retry:
            assert isinstance(event, RunFailed)
            self._schedule_retry(run, event)
            return True
        self._update_run(run, event, new)
        if new in TERMINAL:
            self._announce_end(event, new)
        if isinstance(event, RunFailed) and new == RunState.FAILURE:
            self._raise_alert(
                f"run-failed:{event.run_id}",
                RUN_FAILED,
                f"run {event.run_id}",
                f"run {event.run_id} failed on attempt {event.attempt}: {event.reason.value}",
            )
        return True

    def _schedule_retry(self, run: FakeRun, failed: RunFailed) -> None:
        attempt = failed.attempt + 1
        delay = backoff_s(failed.attempt, self.retry_backoff_s)
        run.state, run.attempt = RunState.QUEUED, attempt
        run.agent_id = run.container_id = None
        run.exit_code = None
        run.failure_reason = failed.reason.value
        run.failure_message = f"attempt {failed.attempt} failed ({failed.reason.value}); retrying"
        run.started_at = None
        run.state_changed_at = self.clock()
        launched = launch(msgspec.structs.asdict(run.submission), attempt)
        self._insert(OutboxItem(launched, INSTRUCTIONS_EXCHANGE, run.submission.queue, delay))
        retrying = RunRetrying(
            run_id=failed.run_id,
            attempt=failed.attempt,
            next_attempt=attempt,
            reason=failed.reason,
            delay_s=delay,
            message=failed.message,
        )
        self._insert(answer(retrying))

    def _update_run(self, run: FakeRun, event: RunEvent, new: RunState) -> None:
        now = self.clock()
        run.state = new
        run.agent_id = getattr(event, "agent_id", None) or run.agent_id
        run.container_id = getattr(event, "container_id", None) or run.container_id
        if new in TERMINAL:
            failed = event if isinstance(event, RunFailed) else None
            run.exit_code = getattr(event, "exit_code", None)
            run.failure_reason = failed.reason.value if failed else None
            run.failure_message = failed.message if failed else None
            run.finished_at = now
        if new == RunState.STARTED and run.started_at is None:
            run.started_at = now
        run.state_changed_at = now

    def _announce_end(self, event: RunEvent, state: RunState) -> None:
        failed = event if isinstance(event, RunFailed) else None
        ended = RunEnded(
            message_id=uuid.uuid5(event.message_id, "ended"),
            run_id=event.run_id,
            attempt=event.attempt,
            state=state.value,  # type: ignore[arg-type]
            exit_code=getattr(event, "exit_code", None),
            reason=failed.reason if failed else None,
            message=failed.message if failed else "",
            output_tail=tuple(getattr(event, "output_tail", ())),
        )
        self._insert(answer(ended))
