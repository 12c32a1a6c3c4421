"""The failure monitor's reads and decisions, as transactions.

Every decision has a deterministic identity (a UUIDv5 of the run, the attempt and the rule),
used as the id of the synthetic event and of the TerminateRun it writes. Two monitors, or a
monitor restarted half-way, that take the same decision insert nothing the second time: no
duplicate failure, no duplicate retry, no duplicate instruction.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import asyncpg

from schemas import ContainerState, FailureReason, RunFailed, TerminateRun
from schemas.topology import CONTROL_EXCHANGE, MONITOR_SOURCE, STATUS_EXCHANGE, event_routing_key

from ..errors import StoreUnavailable
from ..states import TERMINAL, RunState
from . import agents, alerts, cancellation, events, outbox
from .agents import AgentRow
from .connections import Connections

_DECISIONS = uuid.UUID("8f0e5b0c-6a4e-4c55-9a57-2f3d9e1b7a10")
#: Tries of a batch of decisions that PostgreSQL rolls back for a deadlock (see ``_batch``).
_DEADLOCK_TRIES = 5

T = TypeVar("T")


def decision_id(run_id: uuid.UUID, attempt: int, rule: str) -> uuid.UUID:
    """The same id for the same decision, whoever takes it and however often."""
    return uuid.uuid5(_DECISIONS, f"{run_id}/{attempt}/{rule}")


@dataclass(frozen=True)
class WaitingRun:
    """A QUEUED run past its queue timeout."""

    run_id: uuid.UUID
    attempt: int
    queue: str
    waited_s: float


@dataclass(frozen=True)
class UnservedQueue:
    """A queue whose runs wait with no live agent consuming it."""

    queue: str
    waiting: int
    oldest_run_id: uuid.UUID
    oldest_waited_s: float


@dataclass(frozen=True)
class AgentLoss:
    """An agent the monitor found lost: how long it had been silent, and what made it lost
    when not its silence."""

    agent_id: str
    silent_s: float
    why: str | None = None


@dataclass(frozen=True)
class ActiveRun:
    run_id: uuid.UUID
    attempt: int
    state: RunState
    agent_id: str | None
    start_timeout_s: float | None
    max_runtime_s: float | None
    in_state_s: float
    running_s: float | None
    #: For a CANCELING run: the grace its agent gives the container.
    cancel_grace_s: float | None = None


class Supervision:
    """What the failure monitor reads, and the decisions it takes."""

    def __init__(self, connections: Connections, retry_backoff_s: float) -> None:
        self._connections = connections
        self._retry_backoff_s = retry_backoff_s
        self._agents = agents.Agents(connections)

    async def agents(self) -> list[AgentRow]:
        return await self._agents.rows()

    async def active_runs(self) -> list[ActiveRun]:
        async with self._connections.connection() as connection:
            records = await connection.fetch(
                """
                SELECT run_id, attempt, state, agent_id, start_timeout_s, max_runtime_s,
                       EXTRACT(EPOCH FROM now() - state_changed_at)::float8 AS in_state_s,
                       EXTRACT(EPOCH FROM now() - started_at)::float8 AS running_s,
                       cancel_grace_s
                FROM runs WHERE state IN ('STARTING', 'STARTED', 'CANCELING')
                   -- claimed by an agent, its container being created
                   OR (state = 'QUEUED' AND agent_id IS NOT NULL)
                """
            )
        return [
            ActiveRun(
                r["run_id"],
                r["attempt"],
                RunState(r["state"]),
                r["agent_id"],
                r["start_timeout_s"],
                r["max_runtime_s"],
                r["in_state_s"],
                r["running_s"],
                r["cancel_grace_s"],
            )
            for r in records
        ]

    async def fail_attempt(
        self,
        run_id: uuid.UUID,
        attempt: int,
        reason: FailureReason,
        message: str,
        terminate_on: str | None = None,
    ) -> bool:
        """Fail an attempt (retrying per its policy); tell ``terminate_on`` to stop it.

        False when the decision was taken before or no longer applies.
        """
        async with self._connections.transaction() as connection:
            return await self._fail(connection, run_id, attempt, reason, message, terminate_on)

    async def _fail(
        self,
        connection: asyncpg.Connection,
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
        applied = await events.apply(connection, event, self._retry_backoff_s)
        if applied:
            # Followers see the monitor's decision as an event like an agent's.
            key = event_routing_key(event, MONITOR_SOURCE)
            await outbox.insert(connection, [outbox.OutboxItem(event, STATUS_EXCHANGE, key)])
        if applied and terminate_on:
            await _terminate(connection, terminate_on, run_id, attempt, reason, message)
        return applied

    async def overdue_queued(self) -> list[WaitingRun]:
        """QUEUED runs that have waited longer than their queue timeout."""
        async with self._connections.connection() as connection:
            records = await connection.fetch(
                """
                SELECT run_id, attempt, queue,
                       EXTRACT(EPOCH FROM now() - state_changed_at)::float8 AS waited_s
                FROM runs
                WHERE state = 'QUEUED' AND queue_timeout_s IS NOT NULL
                  AND state_changed_at < now() - queue_timeout_s * interval '1 second'
                """
            )
        return [WaitingRun(r["run_id"], r["attempt"], r["queue"], r["waited_s"]) for r in records]

    async def time_out_queued(self, run: WaitingRun, note: str) -> bool:
        """Fail a queued run QUEUE_TIMEOUT; its launch is fenced where it may wait already."""
        async with self._connections.transaction() as connection:
            # The agent that claimed the attempt, if one did: it starts what it was granted.
            holder = await connection.fetchval(
                "SELECT agent_id FROM runs WHERE run_id = $1 AND attempt = $2 FOR UPDATE",
                run.run_id,
                run.attempt,
            )
            applied = await self._fail(
                connection, run.run_id, run.attempt, FailureReason.QUEUE_TIMEOUT, note, None
            )
            state, held = await connection.fetchrow(
                "SELECT state, held FROM runs WHERE run_id = $1", run.run_id
            )
            # A run a limit held never had a LaunchRun: no agent needs telling.
            if applied and state in TERMINAL and not held:
                fences = await cancellation.never_launch(
                    connection, run.run_id, run.attempt, run.queue, note, holder
                )
                await outbox.insert(connection, fences)
            elif applied and holder is not None:
                # Retried: the next attempt is another launch; the claimed one must not run.
                await _terminate(
                    connection, holder, run.run_id, run.attempt, FailureReason.QUEUE_TIMEOUT, note
                )
            return applied

    async def unserved_queues(self, min_wait_s: float) -> list[UnservedQueue]:
        """Queues with runs QUEUED for longer than ``min_wait_s`` and no live agent."""
        async with self._connections.connection() as connection:
            records = await connection.fetch(
                """
                SELECT DISTINCT ON (queue) queue, run_id,
                       count(*) OVER (PARTITION BY queue) AS waiting,
                       EXTRACT(EPOCH FROM now() - state_changed_at)::float8 AS waited_s
                FROM runs r
                WHERE state = 'QUEUED'
                  AND state_changed_at < now() - $1 * interval '1 second'
                  AND NOT EXISTS (
                      SELECT 1 FROM agents a WHERE a.status = 'ALIVE' AND a.queues ? r.queue
                  )
                ORDER BY queue, state_changed_at
                """,
                min_wait_s,
            )
        return [
            UnservedQueue(r["queue"], r["waiting"], r["run_id"], r["waited_s"]) for r in records
        ]

    async def alert_unserved(self, queue: UnservedQueue) -> bool:
        """Alert once per oldest waiting run that its queue has no live agent."""
        async with self._connections.transaction() as connection:
            return await alerts.raise_alert(
                connection,
                f"queue-unserved:{queue.queue}:{queue.oldest_run_id}",
                alerts.QUEUE_UNSERVED,
                f"queue {queue.queue}",
                f"{queue.waiting} run(s) wait on queue {queue.queue}, the oldest for "
                f"{queue.oldest_waited_s:.0f} s, and no live agent consumes it",
                {"queue": queue.queue, "waiting": queue.waiting},
            )

    async def declare_agent_lost(
        self, agent_id: str, silent_s: float, why: str | None = None
    ) -> list[uuid.UUID]:
        """Mark an agent lost, alert once, fail its in-flight runs (AGENT_LOST), those it
        claimed and is still creating included.

        ``why``: what made it lost, when not its silence (its Docker engine stopped answering).

        Its containers get a TerminateRun on its own queue, so that it stops them if it ever
        comes back. Returns the runs failed (or retried) now.
        """
        failed = await self.declare_agents_lost([AgentLoss(agent_id, silent_s, why)])
        return failed.get(agent_id, [])

    async def declare_agents_lost(self, losses: Sequence[AgentLoss]) -> dict[str, list[uuid.UUID]]:
        """``declare_agent_lost`` for every agent of ``losses``, in one transaction.

        Returns, for each agent declared lost now, the runs failed (or retried) now; an agent
        that was not ALIVE or DRAINING is left out.
        """
        if not losses:
            return {}
        return await self._batch(lambda connection: self._declare_lost(connection, losses))

    async def _declare_lost(
        self, connection: asyncpg.Connection, losses: Sequence[AgentLoss]
    ) -> dict[str, list[uuid.UUID]]:
        lost_at = await agents.mark_lost(connection, [loss.agent_id for loss in losses])
        if not lost_at:
            return {}
        notes: dict[str, str] = {}
        for loss in losses:
            why = loss.why or f"no heartbeat for {loss.silent_s:.1f} s"
            notes.setdefault(loss.agent_id, f"agent {loss.agent_id} lost: {why}")
        failed_over = await self._fail_held(
            connection, {a: n for a, n in notes.items() if a in lost_at}
        )
        declared: dict[str, list[uuid.UUID]] = {}
        for loss in losses:
            agent_id = loss.agent_id
            if agent_id not in lost_at or agent_id in declared:
                continue
            silent_s = loss.silent_s
            note = notes[agent_id]
            failed = declared[agent_id] = failed_over.get(agent_id, [])
            await alerts.raise_alert(
                connection,
                f"agent-down:{agent_id}:{lost_at[agent_id].isoformat()}",
                alerts.AGENT_DOWN,
                f"agent {agent_id}",
                f"{note}; {len(failed)} run(s) in flight failed over",
                {
                    "agent_id": agent_id,
                    "silent_s": round(silent_s, 2),
                    "runs": [str(r) for r in failed],
                },
            )
        return declared

    async def agent_left(self, agent_id: str) -> bool:
        """A drained agent went quiet with nothing running: DRAINING → LEFT, no alert, no
        failover. False when it was not DRAINING."""
        return bool(await self.agents_left([agent_id]))

    async def agents_left(self, agent_ids: Sequence[str]) -> list[str]:
        """``agent_left`` for many agents, in one transaction; those that left now.

        A run one of them still holds is the monitor's to judge (``_held_by_the_gone``):
        its final event may still be on the way."""
        if not agent_ids:
            return []
        return await self._batch(lambda connection: agents.mark_left(connection, agent_ids))

    async def _fail_held(
        self, connection: asyncpg.Connection, notes: dict[str, str]
    ) -> dict[str, list[uuid.UUID]]:
        """Fail over (AGENT_LOST, with the agent's note) every unfinished run held by an
        agent of ``notes``; for each agent, the runs failed (or retried) now."""
        if not notes:
            return {}
        records = await connection.fetch(
            """
            SELECT run_id, attempt, agent_id FROM runs
            WHERE agent_id = ANY($1::text[])
              AND state IN ('QUEUED', 'STARTING', 'STARTED', 'CANCELING')
            ORDER BY run_id
            FOR UPDATE
            """,
            list(notes),
        )
        failed: dict[str, list[uuid.UUID]] = {}
        for run in records:
            agent_id = run["agent_id"]
            if await self._fail(
                connection,
                run["run_id"],
                run["attempt"],
                FailureReason.AGENT_LOST,
                notes[agent_id],
                agent_id,
            ):
                failed.setdefault(agent_id, []).append(run["run_id"])
        return failed

    async def agent_back(self, agent_id: str) -> bool:
        """An agent declared lost sent a heartbeat again: alert once."""
        return bool(await self.agents_back([agent_id]))

    async def agents_back(self, agent_ids: Sequence[str]) -> list[str]:
        """``agent_back`` for many agents, in one transaction; those back now."""
        if not agent_ids:
            return []
        return await self._batch(lambda connection: self._back(connection, agent_ids))

    async def _back(self, connection: asyncpg.Connection, agent_ids: Sequence[str]) -> list[str]:
        lost_at = await agents.mark_alive(connection, agent_ids)
        for agent_id, since in sorted(lost_at.items()):
            await alerts.raise_alert(
                connection,
                f"agent-back:{agent_id}:{since.isoformat()}",
                alerts.AGENT_BACK,
                f"agent {agent_id}",
                f"agent {agent_id} is back after being declared lost",
                {"agent_id": agent_id, "lost_at": since.isoformat()},
            )
        return sorted(lost_at)

    async def fence(self, agent_id: str, in_flight: Sequence[ContainerState]) -> int:
        """Stop, on ``agent_id``, containers of attempts that are no longer the run's own.

        An attempt is fenced when its run has moved to a later attempt, has ended while the
        container still runs (failed over while its agent was away), or is held by another
        agent (its claim was recorded first). Returns how many
        TerminateRun were written now.
        """
        return (await self.fence_all({agent_id: in_flight})).get(agent_id, 0)

    async def fence_all(self, listings: Mapping[str, Sequence[ContainerState]]) -> dict[str, int]:
        """``fence`` for several agents' listings (agent id → its listing), in one
        transaction; for each agent with a TerminateRun written now, how many."""
        live = {
            agent_id: [c for c in in_flight if c.state not in ("exited", "dead", "reported")]
            for agent_id, in_flight in listings.items()
        }
        if not any(live.values()):
            return {}
        return await self._batch(lambda connection: self._fence(connection, live))

    async def _fence(
        self, connection: asyncpg.Connection, live: Mapping[str, Sequence[ContainerState]]
    ) -> dict[str, int]:
        records = await connection.fetch(
            "SELECT run_id, attempt, state, agent_id FROM runs WHERE run_id = ANY($1::uuid[])",
            list({c.run_id for listing in live.values() for c in listing}),
        )
        runs = {r["run_id"]: r for r in records}
        counts: dict[str, int] = {}
        for agent_id, listing in live.items():
            fenced = 0
            for container in listing:
                run = runs.get(container.run_id)
                if run is None:
                    continue
                superseded = container.attempt < run["attempt"]
                current = container.attempt == run["attempt"]
                ended = current and RunState(run["state"]) in TERMINAL
                # Held by another agent: a claim refused that started all the same (an agent
                # of an earlier release, or a fault); the holder's container is the one.
                foreign = current and run["agent_id"] not in (None, agent_id)
                if superseded or ended or foreign:
                    fenced += await _terminate(
                        connection,
                        agent_id,
                        container.run_id,
                        container.attempt,
                        FailureReason.AGENT_LOST,
                        f"fenced: this attempt is held by agent {run['agent_id']}"
                        if foreign and not superseded
                        else "fenced: this attempt was failed over while its agent was away",
                        rule="fence",
                    )
            if fenced:
                counts[agent_id] = fenced
        return counts

    async def _batch(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``work`` in one transaction, taken again whole if PostgreSQL breaks a deadlock
        by rolling it back.

        A batch locks many agents' and runs' rows; the control plane's status consumer locks
        some of the same rows (agents' heartbeats, runs' events) in the order its messages
        arrive, so the two can deadlock: the loser is rolled back, never half-applied.
        """
        tries = 1
        while True:
            try:
                async with self._connections.transaction() as connection:
                    return await work(connection)
            except asyncpg.exceptions.DeadlockDetectedError as exc:
                if tries == _DEADLOCK_TRIES:
                    raise StoreUnavailable(
                        f"a batch of the monitor's decisions deadlocked {tries} times: {exc}"
                    ) from exc
                tries += 1

    async def alert_long_running(self, run: ActiveRun, threshold_s: float) -> bool:
        async with self._connections.connection() as connection:
            return await alerts.raise_alert(
                connection,
                f"run-long:{run.run_id}:{run.attempt}",
                alerts.RUN_LONG,
                f"run {run.run_id}",
                f"run {run.run_id} has been running for more than {threshold_s:.0f} s",
                {"run_id": str(run.run_id), "attempt": run.attempt, "agent_id": run.agent_id},
            )


async def _terminate(
    connection: asyncpg.Connection,
    agent_id: str,
    run_id: uuid.UUID,
    attempt: int,
    reason: FailureReason,
    note: str,
    rule: str = "terminate",
) -> int:
    """Write a TerminateRun for ``agent_id``'s own queue; 0 when written before."""
    message = TerminateRun(
        # Per agent: a TerminateRun for one agent's queue never stands in for another's.
        message_id=decision_id(run_id, attempt, f"{rule}:{agent_id}"),
        run_id=run_id,
        attempt=attempt,
        reason=note,
        grace_s=10.0,
        failure_reason=reason,
    )
    return await outbox.insert(connection, [outbox.OutboxItem(message, CONTROL_EXCHANGE, agent_id)])
