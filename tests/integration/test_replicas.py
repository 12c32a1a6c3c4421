"""Control-plane replicas: two ``serve`` processes share intake, relay and status work while
one of them is SIGKILLed every few seconds; every run still runs exactly one container.

A replica killed mid-batch leaves its deliveries to the other (redelivered), and a relay
killed between publishing rows and marking them sent leaves them to be published again: the
agents absorb a LaunchRun that comes twice (the attempt's claim was recorded once).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import pytest

from dispatcher.states import RunState
from dispatcher.store import Database
from tests.integration.conftest import Stack
from tests.integration.docker_events import ContainerEvents
from tests.support import Proc, eventually
from worker_agent.containers import LABEL_RUN

KILL_EVERY_S = 3.0


async def submit_all(stack: Stack, count: int) -> list[uuid.UUID]:
    async with stack.client() as client:
        ids: list[uuid.UUID] = []
        for start in range(0, count, 50):
            batch = [
                client.submit(stack.run_image, ["true"], queue=stack.queue)
                for _ in range(min(50, count - start))
            ]
            ids.extend(await asyncio.gather(*batch))
        return ids


async def kill_one_every(stack: Stack, replicas: list[Proc], stop: asyncio.Event) -> int:
    """SIGKILL the replicas in turn, each restarted at once; returns how many were killed."""
    killed = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), KILL_EVERY_S)
            break
        except TimeoutError:
            pass
        victim = replicas[killed % len(replicas)]
        victim.kill()
        killed += 1
        replicas[replicas.index(victim)] = await stack.start_control_plane()
    return killed


async def finished(store: Database, run_ids: list[uuid.UUID]) -> bool:
    async with store.connections.connection() as connection:
        done = await connection.fetchval(
            "SELECT count(*) FROM runs WHERE run_id = ANY($1) AND state IN ('SUCCESS', 'FAILURE')",
            run_ids,
        )
    return int(done) == len(run_ids)


async def replicas_under_kills(
    stack: Stack, store: Database, count: int, replicas_n: int = 2, kills: bool = True
) -> None:
    """``count`` runs through ``replicas_n`` serve processes, one killed every few seconds
    (``kills``; without, the same work is the figure to compare with)."""
    recording = ContainerEvents(LABEL_RUN).start()
    try:
        replicas = [await stack.start_control_plane() for _ in range(replicas_n)]
        await stack.start_agent(0, max_concurrent=16)
        await stack.start_agent(1, max_concurrent=16)
        stop = asyncio.Event()
        killing = asyncio.create_task(
            kill_one_every(stack, replicas, stop) if kills else asyncio.sleep(0, 0)
        )
        began = time.monotonic()
        run_ids = await submit_all(stack, count)
        submitted_s = time.monotonic() - began
        await eventually(
            lambda: finished(store, run_ids), 60 + count, interval=1.0, what="all runs"
        )
        stop.set()
        killed = await killing
        elapsed = time.monotonic() - began
        print(
            f"{count} runs through {replicas_n} serve process(es), {killed} SIGKILLs: submitted "
            f"in {submitted_s:.1f} s, all finished in {elapsed:.1f} s ({count / elapsed:.1f} "
            "runs/s)"
        )
        assert killed >= 2 or not kills
        runs = {r.run_id: r for r in [await store.runs.get(run_id) for run_id in run_ids]}
        assert Counter(r.state for r in runs.values()) == {RunState.SUCCESS: count}
        await eventually(_async_true(recording.all_died), 60, what="every container's end")
        ours = {str(run_id) for run_id in run_ids}
        lives = [life for life in recording.lives() if life.run_id in ours]
        # One container per attempt, and only the run's final attempt succeeded.
        per_attempt = Counter((life.run_id, life.attempt) for life in lives)
        assert [key for key, n in per_attempt.items() if n > 1] == []
        successes = Counter(life.run_id for life in lives if life.exit_code == 0)
        assert set(successes) == ours and set(successes.values()) == {1}
        for life in lives:
            if life.exit_code == 0:
                assert life.attempt == runs[uuid.UUID(life.run_id)].attempt
    finally:
        recording.stop()


def _async_true(probe):  # type: ignore[no-untyped-def]
    async def probing() -> bool:
        return bool(probe())

    return probing


async def test_two_replicas_one_killed_every_few_seconds_run_each_attempt_once(
    stack: Stack, store: Database
) -> None:
    await replicas_under_kills(stack, store, 200)


@pytest.mark.soak
@pytest.mark.timeout(3600)
async def test_two_replicas_under_kills_with_2000_submissions(
    stack: Stack, store: Database
) -> None:
    await replicas_under_kills(stack, store, 2000)


@pytest.mark.soak
@pytest.mark.timeout(3600)
async def test_one_serve_with_2000_submissions_for_comparison(
    stack: Stack, store: Database
) -> None:
    await replicas_under_kills(stack, store, 2000, replicas_n=1, kills=False)
