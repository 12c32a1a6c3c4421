"""Retention on a real PostgreSQL: what runs finished long ago left behind is pruned in
batches, their rows stay, and recent runs keep everything."""

from __future__ import annotations

import uuid

from dispatcher.store import Database
from dispatcher.store.retention import Retention
from schemas import RunClaimed, RunLog, RunSucceeded, SubmitRun


async def finished_run(store: Database, agent_id: str = "a-1") -> uuid.UUID:
    submission = SubmitRun(run_id=uuid.uuid4(), image="busybox", command=("true",))
    await store.accept_submissions([submission])
    run_id = submission.run_id
    await store.apply_events(
        [
            RunClaimed(run_id=run_id, attempt=1, agent_id=agent_id),
            RunLog(run_id=run_id, attempt=1, agent_id=agent_id, first_line=0, lines=("hi",)),
            RunSucceeded(run_id=run_id, attempt=1, agent_id=agent_id),
        ]
    )
    return run_id


async def counts(store: Database, run_id: uuid.UUID) -> tuple[int, int, int]:
    async with store.connections.connection() as connection:
        events = await connection.fetchval(
            "SELECT count(*) FROM run_events WHERE run_id = $1", run_id
        )
        logs = await connection.fetchval("SELECT count(*) FROM run_logs WHERE run_id = $1", run_id)
        runs = await connection.fetchval("SELECT count(*) FROM runs WHERE run_id = $1", run_id)
    return int(events), int(logs), int(runs)


async def test_what_old_runs_left_is_pruned_in_batches_and_recent_runs_keep_it(
    store: Database,
) -> None:
    old = [await finished_run(store) for _ in range(3)]
    recent = await finished_run(store)
    running = SubmitRun(run_id=uuid.uuid4(), image="busybox")
    await store.accept_submissions([running])
    async with store.connections.connection() as connection:
        await connection.execute(
            "UPDATE runs SET finished_at = now() - interval '40 days' WHERE run_id = ANY($1)",
            old,
        )
        await connection.execute("UPDATE outbox SET sent_at = now() - interval '40 days'")
    for run_id in old:
        assert (await counts(store, run_id))[0] >= 2

    pruned = await store.retention.prune(30 * 86400, batch=2)  # batches smaller than the work
    assert pruned.counts["run_events"] >= 6 and pruned.counts["run_logs"] == 3
    assert pruned.counts["outbox"] > 0
    for run_id in old:
        assert await counts(store, run_id) == (0, 0, 1)  # the run's own row stays
    events, logs, rows = await counts(store, recent)
    assert events >= 2 and logs == 1 and rows == 1
    assert (await counts(store, running.run_id))[2] == 1
    assert (await store.retention.prune(30 * 86400)).total == 0  # nothing left to prune


async def finished_days_ago(store: Database, days: int) -> uuid.UUID:
    run_id = await finished_run(store)
    async with store.connections.connection() as connection:
        await connection.execute(
            "UPDATE runs SET finished_at = now() - $2 * interval '1 day' WHERE run_id = $1",
            run_id,
            days,
        )
    return run_id


async def test_a_round_starts_where_the_last_one_reached(store: Database) -> None:
    first = await finished_days_ago(store, 40)
    await store.retention.prune(30 * 86400)
    assert await counts(store, first) == (0, 0, 1)
    # Grown old since: the next round takes it.
    second = await finished_days_ago(store, 35)
    pruned = await store.retention.prune(30 * 86400)
    assert pruned.counts["run_events"] >= 2 and pruned.counts["run_logs"] == 1
    assert await counts(store, second) == (0, 0, 1)
    # One that finished before the point reached (a finish time set back by hand) is not
    # gone through again by the same process; a new one (`db prune`, a restart) goes
    # through every run once.
    earlier = await finished_days_ago(store, 50)
    assert (await store.retention.prune(30 * 86400)).counts["run_events"] == 0
    assert (await counts(store, earlier))[0] >= 2
    await Retention(store.connections).prune(30 * 86400)
    assert await counts(store, earlier) == (0, 0, 1)
