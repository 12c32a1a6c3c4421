"""The database object: one pool, one repository per table family, and the operations that
span families in one transaction (intake, status events, the outbox's publishing)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Self

import asyncpg

from schemas import (
    AgentHeartbeat,
    CancelRun,
    Event,
    FailureReason,
    LocationFailed,
    LocationLoaded,
    RunAccepted,
    RunClaimed,
    RunEnded,
    RunFailed,
    RunLog,
    RunProgress,
    RunRejected,
    RunRetrying,
    RunStateWanted,
    SubmitRun,
)
from schemas.resources import Capacity

from .. import submissions as rules
from .. import submitters as senders_rules
from ..errors import ConfigError, StoreUnavailable
from . import (
    agents,
    answers,
    cancellation,
    events,
    limits,
    locations,
    migrations,
    outbox,
    output,
    runs,
    submitters,
)
from .admission import Admission
from .alerts import Alerts
from .api_tokens import ApiTokens
from .audit import Audit
from .connections import UNAVAILABLE, Connections, close_quietly, connect
from .dead_letters import DeadLetters
from .overview import Overview
from .retention import Retention
from .supervision import Supervision

log = logging.getLogger(__name__)

#: Publishes outbox rows; returns the rows the broker refused (id → why).
Publish = Callable[[Sequence[outbox.OutboxRow]], Awaitable[Mapping[int, str]]]


class Database:
    """The control plane's PostgreSQL: every read and write goes through one of these."""

    def __init__(self, connections: Connections, retry_backoff_s: float = 1.0) -> None:
        self.connections = connections
        self.retry_backoff_s = retry_backoff_s
        self.runs = runs.Runs(connections)
        self.output = output.Output(connections)
        self.agents = agents.Agents(connections)
        self.locations = locations.Locations(connections)
        self.alerts = Alerts(connections)
        self.audit = Audit(connections)
        self.retention = Retention(connections)
        self.submitters = submitters.Submitters(connections)
        self.outbox = outbox.Outbox(connections)
        self.limits = limits.Limits(connections)
        self.admission = Admission(connections)
        self.overview = Overview(connections)
        self.api_tokens = ApiTokens(connections)
        self.dead_letters = DeadLetters(connections, retry_backoff_s)
        self.supervision = Supervision(connections, retry_backoff_s)

    @classmethod
    async def open(
        cls,
        dsn: str,
        schema: str | None = None,
        min_size: int = 2,
        max_size: int = 10,
        retry_backoff_s: float = 1.0,
    ) -> Self:
        """Connect (a pool); ``schema`` puts every table in that schema (tests isolate so)."""
        connections = await Connections.open(dsn, schema, min_size, max_size)
        return cls(connections, retry_backoff_s)

    async def close(self) -> None:
        await self.connections.close()

    async def upgrade(self) -> list[int]:
        """Apply pending migrations (creating the schema first, if one is set).

        On a connection of its own: the migrator's session lock ends with it, whatever
        happens, and never stays on a pooled connection (they are not reset)."""
        connection = await connect(self.connections.dsn, self.connections.schema)
        try:
            return await migrations.upgrade(connection, self.connections.schema)
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL unavailable: {exc!r}") from exc
        except asyncpg.exceptions.InsufficientPrivilegeError as exc:
            raise ConfigError(
                f"the database user may not make what the control plane needs ({exc}): run "
                "`dispatcher db upgrade` once as a user who may, or grant the privilege"
            ) from None
        finally:
            await close_quietly(connection)

    async def version(self) -> int:
        """The newest migration applied to the database (0: none)."""
        async with self.connections.connection() as connection:
            return await migrations.version(connection)

    # ------------------------------------------------------------------------ intake

    async def accept_submissions(
        self,
        submissions: Sequence[SubmitRun],
        senders: Sequence[str | None] | None = None,
        trusted: Collection[str] = (),
        handed: list[outbox.OutboxItem] | None = None,
    ) -> list[uuid.UUID]:
        """Create the runs that pass their checks; answer every job submission.

        With ``handed``, the new runs' LaunchRun rows are leased to the caller and put there
        once committed, for the caller to publish (see ``runs.create``), even should this
        raise afterwards.

        With ``senders`` (each submission's AMQP user_id, in order), a submission is first
        held to its sender's rights (``dispatcher.submitters``): a trusted identity, a
        registered submitter token within its limits, or (while no token is registered) no
        user_id; any other is refused with RunRejected.

        A plain run needs an image; its ``secret:NAME`` env values are stored as references.
        A job run brings no image, command, env or ready check of its own, and needs a
        loaded location that has the job and a config that matches the job's schema; it runs
        the location's image on its queue. A run that asks for CPUs, memory or GPUs needs a
        live agent of its queue whose declared capacity holds it, when any is live. A refused
        submission creates no run: the submitter gets RunRejected naming the problem, unless
        its run id is an existing run's or an accepted submission's (a forged submission must
        not answer for someone else's run).
        """
        # Reads first, outside any transaction (each would see a snapshot of its own in one
        # anyway); then the writes of the runs and the refusals' answers, in one transaction.
        # A batch whose only write is its new runs (the usual one) makes them in one
        # statement, a transaction by itself: no BEGIN and COMMIT of their own to wait for.
        async with self.connections.connection() as connection:
            accepted, rejected = [], []
            in_force = None
            if senders is not None:
                submissions, refused, in_force = await submitters.screen(
                    connection, submissions, senders, trusted
                )
                rejected += refused
            plain = [s for s in submissions if s.location is None and s.job is None]
            jobs = [s for s in submissions if s.location is not None or s.job is not None]
            for submission in plain:
                if not submission.image:
                    rejected.append((submission, "a run needs an image, or a location and a job"))
                elif found := rules.problem(submission):
                    rejected.append((submission, found.reason))
                else:
                    accepted.append(submission)
            resolved = []
            for submission in jobs:
                problem, run = await locations.resolve_job(connection, submission)
                if problem:
                    rejected.append((submission, problem))
                else:
                    assert run is not None
                    resolved.append(run)
            # What a run asks for must fit one live agent of its queue (on its job's queue).
            asking = {s.queue for s in (*accepted, *resolved) if rules.resources_of(s)}
            if asking:
                offers = await agents.live_capacities(connection, asking)
                accepted = _fitting(accepted, offers, rejected)
                resolved = _fitting(resolved, offers, rejected)
            # No answer for a run id that is a run's, or an accepted submission's: a forged or
            # repeated submission must not answer for someone else's run.
            taken = await runs.existing(connection, [s.run_id for s, _ in rejected])
            taken |= {s.run_id for s in accepted} | {r.run_id for r in resolved}
            answers = [
                outbox.answer(RunRejected(run_id=s.run_id, reason=rules.in_a_reason(why)))
                for s, why in rejected
                if s.run_id not in taken
            ]
            leased: list[outbox.OutboxItem] | None = [] if handed is not None else None
            # With nothing else to write, the one statement is atomic by itself.
            async with connection.transaction() if answers or resolved else nullcontext():
                await outbox.insert(connection, answers)
                created = await runs.create(connection, accepted, handed=leased, in_force=in_force)
                # Job runs took round trips of their own since: their limits are read afresh.
                created += await runs.create(connection, resolved, announce=True, handed=leased)
            # Committed: only now are they the caller's to publish.
            if handed is not None and leased:
                handed += leased
            # A new run id whose idempotency key is an earlier run's created nothing: say so,
            # or its submitter waits for an answer that never comes. The earlier run is not
            # named (keys are chosen by people, and may be guessed). Written after the runs:
            # should it be lost, the submission comes again and finds the same.
            made = set(created)
            keyed = [
                s for s in (*accepted, *resolved) if s.run_id not in made and s.idempotency_key
            ]
            known = await runs.existing(connection, [s.run_id for s in keyed])
            repeated = [s for s in keyed if s.run_id not in known]
            await outbox.insert(
                connection,
                [
                    outbox.answer(
                        RunRejected(
                            run_id=s.run_id,
                            reason=f"idempotency key {s.idempotency_key!r} was given to an "
                            "earlier submission: nothing new was submitted",
                        )
                    )
                    for s in repeated
                ],
            )
            return created

    async def cancel(
        self,
        requests: Sequence[CancelRun],
        senders: Sequence[str | None] | None = None,
        trusted: Collection[str] = (),
    ) -> list[cancellation.Canceled | str]:
        """Cancel runs (``store.cancellation``), all in one transaction; for each request its
        outcome, or why its sender may not cancel (who may submit may cancel: a trusted
        identity, a registered submitter token within its limits, or no user_id while no
        token is registered)."""
        async with self.connections.transaction() as connection:
            known = await submitters.registry(
                connection, [s for s in senders or () if s is not None]
            )
            outcomes: list[cancellation.Canceled | str] = []
            for request, sender in zip(requests, senders or [None] * len(requests), strict=True):
                why = (
                    senders_rules.sender_problem(sender, trusted, known)
                    if senders is not None
                    else None
                )
                why = why or await _beyond_limits(
                    connection, known, sender, request.run_id, "cancel"
                )
                outcomes.append(why or await cancellation.cancel(connection, request))
            return outcomes

    async def say_again(
        self,
        requests: Sequence[RunStateWanted],
        senders: Sequence[str | None],
        trusted: Collection[str] = (),
    ) -> list[answers.Said | str]:
        """Say again where each asked-about run is (``store.answers``), in one transaction; for
        each request what was said, or why its sender may not ask (who may cancel a run may
        ask about it)."""
        async with self.connections.transaction() as connection:
            known = await submitters.registry(connection, [s for s in senders if s is not None])
            said: list[answers.Said | str] = []
            for request, sender in zip(requests, senders, strict=True):
                why = senders_rules.sender_problem(sender, trusted, known)
                why = why or await _beyond_limits(
                    connection, known, sender, request.run_id, "ask about"
                )
                # A limited token is not told others' refusals (they name tokens and limits).
                bounded = (
                    sender is not None
                    and (known.limits.get(sender) or senders_rules.ANYWHERE).bounded
                )
                said.append(
                    why or await answers.say_again(connection, request, refusals=not bounded)
                )
            return said

    # ----------------------------------------------------------------- status events

    async def apply_events(
        self, batch: Sequence[Event], answers: list[outbox.OutboxItem] | None = None
    ) -> int:
        """Apply status events idempotently in one transaction; returns state changes made.

        ``answers``: claims' answers are put there, to be published once this returns (the
        transaction committed), instead of into the outbox (``events.claim``)."""
        if answers is not None and len(batch) == 1 and isinstance(batch[0], RunClaimed):
            # A claim alone (a launch's, while the agent creates the container): granted in
            # two round trips rather than a transaction's five, when nothing raced it.
            async with self.connections.connection() as connection:
                granted = await events.grant_at_once(connection, batch[0])
            if granted is not None:
                answers.append(granted)
                return 0
        changes = 0
        async with self.connections.transaction() as connection:
            for event in batch:
                if isinstance(event, AgentHeartbeat):
                    await agents.record_heartbeat(connection, event)
                elif isinstance(event, RunLog):
                    await output.record_log(connection, event)
                elif isinstance(event, RunProgress):
                    await output.record_progress(connection, event)
                elif isinstance(event, RunAccepted | RunRejected | RunRetrying | RunEnded):
                    continue  # the control plane's own announcements: written by the store
                elif isinstance(event, LocationLoaded | LocationFailed):
                    await locations.record_event(connection, event)
                elif await events.apply(connection, event, self.retry_backoff_s, answers):
                    changes += 1
        return changes

    # -------------------------------------------------------------------- the outbox

    async def publish_outbox(self, publish: Publish, limit: int = 500) -> int:
        """Hand up to ``limit`` unsent rows to ``publish``; mark them sent once it returns.

        ``publish`` returns the rows the broker refused (id → error): those are set aside
        with their error instead of being sent again and again, and a refused LaunchRun fails
        its attempt (LAUNCH_ERROR).

        Rows are locked while they are published (SKIP LOCKED lets a second relay take other
        rows). If the process dies after publishing and before the commit, the rows are sent
        again: consumers are idempotent on the message id and the container name.
        """
        async with self.connections.transaction() as connection:
            rows = await outbox.claim_unsent(connection, limit)
            if not rows:
                return 0
            refused = await publish(rows)
            await outbox.mark_sent(connection, [r.id for r in rows if r.id not in refused])
            for row in rows:
                if row.id not in refused:
                    continue
                await outbox.set_aside(connection, row, refused[row.id])
                # Only an attempt still waiting for its launch: a second publish of one that
                # is running (its lease ran out, or a relay died before marking it sent)
                # must not fail it under a container that keeps running.
                if (
                    row.kind == "LaunchRun"
                    and row.run_id is not None
                    and await connection.fetchval(
                        "SELECT 1 FROM runs WHERE run_id = $1 AND attempt = $2"
                        " AND state = 'QUEUED'",
                        row.run_id,
                        row.attempt,
                    )
                ):
                    failed = RunFailed(
                        message_id=uuid.uuid5(row.message_id, "unpublishable"),
                        run_id=row.run_id,
                        attempt=row.attempt,
                        reason=FailureReason.LAUNCH_ERROR,
                        message=f"the instruction cannot be published: {refused[row.id]}"[:4000],
                    )
                    await events.apply(connection, failed, self.retry_backoff_s)
            return len(rows)

    async def settle_handed(self, sent: Sequence[uuid.UUID], back: Sequence[uuid.UUID]) -> None:
        """Rows handed to a relay (``accept_submissions``' ``handed``), by message id: ``sent``
        are marked sent, ``back`` left to the relay at once (``outbox.handed_back``)."""
        async with self.connections.connection() as connection:
            await outbox.handed_back(connection, sent, back)

    def listen_admissions(self) -> AbstractAsyncContextManager[Callable[[float], Awaitable[None]]]:
        """Wake-ups of the admitter: a held run was created, a slot may be free, a limit
        changed."""
        return self.connections.listen(limits.ADMIT_CHANNEL)

    def listen_outbox(self) -> AbstractAsyncContextManager[Callable[[float], Awaitable[None]]]:
        """Wake-ups of the relay: yields a function that waits for the next commit's NOTIFY."""
        return self.connections.listen(outbox.OUTBOX_CHANNEL)


def _fitting(
    submissions: list[SubmitRun],
    offers: Mapping[str, Mapping[str, Capacity]],
    rejected: list[tuple[SubmitRun, str]],
) -> list[SubmitRun]:
    """The submissions some live agent of their queue could take; the others are added to
    ``rejected`` with the reason."""
    fitting = []
    for submission in submissions:
        found = rules.capacity_problem(submission, offers.get(submission.queue, {}))
        if found:
            rejected.append((submission, found.reason))
        else:
            fitting.append(submission)
    return fitting


@asynccontextmanager
async def opened(
    dsn: str, schema: str | None = None, retry_backoff_s: float = 1.0, max_size: int = 10
) -> AsyncIterator[Database]:
    """A database, migrated, closed on exit."""
    database = await Database.open(dsn, schema, max_size=max_size, retry_backoff_s=retry_backoff_s)
    try:
        await database.upgrade()
        yield database
    finally:
        await database.close()


async def _beyond_limits(
    connection: asyncpg.Connection,
    known: senders_rules.Registry,
    sender: str | None,
    run_id: uuid.UUID,
    doing: str,
) -> str | None:
    """Why ``sender``, a token limited to queues or locations, may not ``doing`` the run
    ``run_id`` (one it could not have submitted), or None. An unknown run is the caller's
    to say. A registered token's limits hold even if its name is also trusted, as for its
    submissions."""
    if sender is None:
        return None
    limits = known.limits.get(sender)
    if limits is None or not limits.bounded:
        return None
    run = await connection.fetchrow("SELECT queue, location FROM runs WHERE run_id = $1", run_id)
    if run is None:
        return None
    return senders_rules.reach_problem(sender, limits, run["queue"], run["location"], doing)
