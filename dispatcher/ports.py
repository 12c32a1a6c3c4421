"""The store as the failure monitor uses it: a Protocol.

``store.Supervision`` (PostgreSQL) satisfies it, and so does the in-memory fake of the tests
(``tests/fakes/supervision.py``); the same contract tests (``tests/contracts``) hold both to
one behaviour. The monitor's clock is a plain callable (``transport.ports.Clock``).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Protocol

from schemas import ContainerState, FailureReason

from .store import ActiveRun, AgentLoss, AgentRow, UnservedQueue, WaitingRun


class SupervisionStore(Protocol):
    """What the failure monitor reads, and the decisions it takes, each one at most once.

    A decision has a deterministic identity (``store.decision_id``): taken a second time, by
    this monitor or another, it changes nothing and reports so (False, [] or 0).
    """

    async def agents(self) -> list[AgentRow]:
        """Every agent heard of: its status (ALIVE, LOST), interval and silence so far."""
        ...

    async def active_runs(self) -> list[ActiveRun]:
        """Runs STARTING or STARTED, with how long they have been so."""
        ...

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
        ...

    async def declare_agent_lost(
        self, agent_id: str, silent_s: float, why: str | None = None
    ) -> list[uuid.UUID]:
        """ALIVE → LOST, alert once, fail its in-flight runs (AGENT_LOST) and terminate them;
        ``why`` names the cause when it is not silence.

        Returns the runs failed (or retried) now; [] when the agent was not ALIVE.
        """
        ...

    async def overdue_queued(self) -> list[WaitingRun]:
        """QUEUED runs that have waited longer than their queue timeout."""
        ...

    async def time_out_queued(self, run: WaitingRun, note: str) -> bool:
        """Fail a queued run QUEUE_TIMEOUT and fence its launch on the queue's live agents."""
        ...

    async def unserved_queues(self, min_wait_s: float) -> list[UnservedQueue]:
        """Queues with runs QUEUED longer than ``min_wait_s`` and no live agent."""
        ...

    async def alert_unserved(self, queue: UnservedQueue) -> bool:
        """Alert once per oldest waiting run; True when the alert is new."""
        ...

    async def agent_left(self, agent_id: str) -> bool:
        """DRAINING → LEFT (a drained agent stopped): no alert, no failover; False when the
        agent was not DRAINING."""
        ...

    async def agent_back(self, agent_id: str) -> bool:
        """LOST → ALIVE, alert once; False when the agent was not LOST."""
        ...

    async def fence(self, agent_id: str, in_flight: Sequence[ContainerState]) -> int:
        """TerminateRun, on ``agent_id``, of listed attempts that are no longer their run's.

        Returns how many were written now.
        """
        ...

    async def alert_long_running(self, run: ActiveRun, threshold_s: float) -> bool:
        """Alert once per attempt that it runs long; True when the alert is new."""
        ...

    # Many at a time: all the losses a sweep finds, all the returns and fencing a batch of
    # heartbeats calls for, each batch in one transaction; each decision stays what the
    # one-at-a-time method above takes.

    async def declare_agents_lost(self, losses: Sequence[AgentLoss]) -> dict[str, list[uuid.UUID]]:
        """``declare_agent_lost`` of each loss; the agents lost now, with their runs failed."""
        ...

    async def agents_left(self, agent_ids: Sequence[str]) -> list[str]:
        """``agent_left`` of each agent; those that left now."""
        ...

    async def agents_back(self, agent_ids: Sequence[str]) -> list[str]:
        """``agent_back`` of each agent; those back now."""
        ...

    async def fence_all(self, listings: Mapping[str, Sequence[ContainerState]]) -> dict[str, int]:
        """``fence`` of each agent's listing; TerminateRun written now, by agent."""
        ...
