"""Concurrency limits and priorities on a real broker, database and engine: how many runs go
at once is read from Docker's own start and die events, not from the runs table."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Collection, Iterator

import pytest

from dispatcher.errors import RunNotFound
from dispatcher.states import RunState
from dispatcher.store import Database
from schemas import SubmitRun
from tests.integration.conftest import Stack
from tests.integration.docker_events import ContainerEvents, Life, peak_running
from tests.integration.test_dispatch import wait_for_state
from tests.integration.test_operators import dispatcher_cli
from tests.support import Proc, eventually
from worker_agent.containers import LABEL_RUN

ML = {"team": "ml"}
RUNS = 10


@pytest.fixture
def docker_events() -> Iterator[ContainerEvents]:
    """Docker's start and die events of every run container, followed live from the start
    (the engine's own backlog is too short to ask for them afterwards)."""
    recording = ContainerEvents(LABEL_RUN).start()
    yield recording
    recording.stop()


def lives_of(events: ContainerEvents, runs: Collection[uuid.UUID]) -> list[Life]:
    wanted = {str(r) for r in runs}
    return [life for life in events.lives() if life.run_id in wanted]


async def all_died(events: ContainerEvents, runs: Collection[uuid.UUID]) -> None:
    async def seen() -> bool:
        lives = lives_of(events, runs)
        return len(lives) >= len(runs) and all(life.died is not None for life in lives)

    await eventually(seen, 30, what="Docker's die event of every run's container")


async def limit(stack: Stack, *args: str) -> str:
    done = await dispatcher_cli(stack, "limits", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def submit_ml(stack: Stack, count: int = RUNS, seconds: int = 2) -> list[uuid.UUID]:
    async with stack.client() as client:
        return [
            await client.submit(
                stack.run_image, ["sleep", str(seconds)], queue=stack.queue, tags=ML
            )
            for _ in range(count)
        ]


async def states(store: Database, runs: Collection[uuid.UUID]) -> list[RunState | None]:
    """Each run's state; None for one the control plane has not created yet."""
    found = []
    for run_id in runs:
        try:
            found.append((await store.runs.get(run_id)).state)
        except RunNotFound:
            found.append(None)
    return found


async def all_succeed(store: Database, runs: Collection[uuid.UUID], timeout: float = 180) -> None:
    async def done() -> bool:
        states_now = await states(store, runs)
        assert RunState.FAILURE not in states_now, states_now
        assert RunState.CANCELED not in states_now, states_now
        return all(s == RunState.SUCCESS for s in states_now)

    await eventually(done, timeout, interval=0.5, what=f"{len(runs)} runs SUCCESS")


async def succeeded(store: Database, runs: Collection[uuid.UUID]) -> int:
    return (await states(store, runs)).count(RunState.SUCCESS)


async def test_a_tag_limit_holds_its_runs_and_says_so(
    stack: Stack, store: Database, docker_events: ContainerEvents
) -> None:
    await stack.start_control_plane()
    await stack.start_agent(0, max_concurrent=8)
    assert "tag:team=ml: at most 2" in await limit(stack, "set", "tag:team=ml", "2")
    ml = await submit_ml(stack, seconds=3)
    async with stack.client() as client:
        # A run under no limit goes at once, whatever the limit holds back.
        free = await client.submit(stack.run_image, ["sleep", "1"], queue=stack.queue)
    await wait_for_state(store, free, RunState.SUCCESS, timeout=60)

    # While runs wait, the listings say for what.
    async def held_and_said() -> bool:
        held_by = [(await store.runs.get(r)).held_by for r in ml]
        return "tag:team=ml" in held_by

    await eventually(held_and_said, 60, what="a run held by tag:team=ml")
    # LIMIT MAX RUNNING WAITING (a run ending just now may leave a slot for an instant).
    assert re.search(r"tag:team=ml\s+2\s+[0-2]\s+[1-9]", await limit(stack, "list"))

    async def shown_waiting() -> bool:
        # A held run; it may be admitted while the command starts: then the next one.
        for run_id in ml:
            if (await store.runs.get(run_id)).held_by != "tag:team=ml":
                continue
            shown = await dispatcher_cli(stack, "runs", "show", str(run_id))
            if re.search(r"waiting   for limit tag:team=ml \([0-2] of 2 running\)", shown.stdout):
                return True
        return False

    async def listed_waiting() -> bool:
        listed = await dispatcher_cli(stack, "runs", "list", "--state", "QUEUED")
        return "waiting for limit tag:team=ml" in listed.stdout

    await eventually(shown_waiting, 60, what="runs show: waiting for limit tag:team=ml")
    await eventually(listed_waiting, 60, what="runs list: waiting for limit tag:team=ml")

    await all_succeed(store, ml)
    await all_died(docker_events, ml)
    lives = lives_of(docker_events, ml)
    assert len(lives) == RUNS
    assert peak_running(lives) == 2
    assert "no limits" not in await limit(stack, "list")
    assert "removed" in await limit(stack, "remove", "tag:team=ml")
    assert "no limits" in await limit(stack, "list")


async def test_a_limit_holds_across_a_control_plane_killed_halfway(
    stack: Stack, store: Database, docker_events: ContainerEvents
) -> None:
    control_plane = await stack.start_control_plane()
    await stack.start_agent(0, max_concurrent=8)
    await limit(stack, "set", "tag:team=ml", "2")
    ml = await submit_ml(stack)

    async def halfway() -> bool:
        return await succeeded(store, ml) >= RUNS // 2

    await eventually(halfway, 120, interval=0.2, what="half the runs done")
    control_plane.kill()
    # Runs end while no control plane runs; the next one finds their slots from the table.
    await asyncio.sleep(3)
    await stack.start_control_plane()
    await all_succeed(store, ml)
    await all_died(docker_events, ml)
    lives = lives_of(docker_events, ml)
    assert len(lives) == RUNS
    assert peak_running(lives) <= 2


async def test_a_limit_holds_with_two_control_planes(
    stack: Stack, store: Database, docker_events: ContainerEvents
) -> None:
    planes: list[Proc] = [await stack.start_control_plane() for _ in range(2)]
    await stack.start_agent(0, max_concurrent=8)
    await stack.start_agent(1, max_concurrent=8)
    await limit(stack, "set", "tag:team=ml", "2")
    ml = await submit_ml(stack)
    await all_succeed(store, ml)
    await all_died(docker_events, ml)
    lives = lives_of(docker_events, ml)
    assert len(lives) == RUNS
    assert peak_running(lives) <= 2
    # Both took part: each admitted some of the runs.
    admitted = [p.output().count("admitted ") for p in planes]
    assert all(admitted), admitted


async def test_with_a_global_limit_of_one_runs_start_in_priority_order(
    stack: Stack, store: Database, docker_events: ContainerEvents
) -> None:
    await stack.start_control_plane()
    await stack.start_agent(0, max_concurrent=8)
    await limit(stack, "set", "global", "1")
    async with stack.client() as client:
        blocker = await client.submit(stack.run_image, ["sleep", "3"], queue=stack.queue)
        await wait_for_state(store, blocker, RunState.STARTING, RunState.STARTED, timeout=60)
        priorities = [0, 5, -1, 5, 10, 0]
        runs = [
            await client.submit(stack.run_image, ["true"], queue=stack.queue, priority=p)
            for p in priorities
        ]
    await all_succeed(store, [blocker, *runs])
    await all_died(docker_events, [blocker, *runs])
    lives = lives_of(docker_events, [blocker, *runs])
    order = [uuid.UUID(life.run_id) for life in lives]  # in the order they started
    # Higher first, in submission order within a priority.
    expected = [blocker, runs[4], runs[1], runs[3], runs[0], runs[5], runs[2]]
    assert order == expected, (order, expected)
    assert peak_running(lives) == 1


async def test_a_held_run_can_be_canceled_and_times_out_in_the_queue(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_monitor()
    await stack.start_agent(0)
    await limit(stack, "set", f"queue:{stack.queue}", "0")
    async with stack.client() as client:
        canceled = await client.submit(stack.run_image, ["true"], queue=stack.queue)
        timed_out = await client.submit(
            stack.run_image, ["true"], queue=stack.queue, queue_timeout_s=2
        )
    await eventually(
        lambda: _held(store, canceled), 30, what="the run held by the queue's limit of 0"
    )
    done = await dispatcher_cli(stack, "runs", "cancel", str(canceled))
    assert done.returncode == 0, done.stdout + done.stderr
    await wait_for_state(store, canceled, RunState.CANCELED, timeout=30)
    run = await wait_for_state(store, timed_out, RunState.FAILURE, timeout=60)
    assert run.failure_reason == "QUEUE_TIMEOUT"
    # Neither ever reached Docker, and lifting the limit does not bring them back.
    await limit(stack, "remove", f"queue:{stack.queue}")
    await asyncio.sleep(2)
    assert stack.containers_of(canceled) == [] and stack.containers_of(timed_out) == []
    assert (await store.runs.get(canceled)).state == RunState.CANCELED


async def _held(store: Database, run_id: uuid.UUID) -> bool:
    try:
        run = await store.runs.get(run_id)
    except RunNotFound:
        return False
    return run.held and run.held_by is not None


async def test_runs_behind_a_thousand_blocked_ones_are_reached(store: Database) -> None:
    """The admitter reads only held runs no full limit covers: a run under a limit with room
    starts even behind more blocked runs than one pass reads."""
    await store.limits.set("queue:blocked", 0, "test")
    await store.limits.set("queue:open", 1, "test")
    blocked = [
        SubmitRun(run_id=uuid.uuid4(), image="busybox", queue="blocked", priority=10)
        for _ in range(1200)
    ]
    behind = SubmitRun(run_id=uuid.uuid4(), image="busybox", queue="open", priority=0)
    await store.accept_submissions([*blocked, behind])
    assert await store.admission.admit(batch=1000) == 1
    run = await store.runs.get(behind.run_id)
    assert not run.held and run.state == RunState.QUEUED
    assert [e.kind for e in await store.runs.events(behind.run_id)] == ["SubmitRun", "Admitted"]
    assert (await store.runs.get(blocked[0].run_id)).held_by == "queue:blocked"
    assert await store.outbox.count_unsent("LaunchRun") == 1
    usage = {u.limit.key: (u.running, u.waiting) for u in await store.limits.usage()}
    assert usage == {"queue:blocked": (0, 1200), "queue:open": (1, 0)}


async def test_a_limit_set_before_names_were_checked_can_still_be_removed(store: Database) -> None:
    """A limit key names a queue or a location by a valid name now; one stored earlier under
    another name is still removed by its key."""
    async with store.connections.connection() as connection:
        await connection.execute(
            "INSERT INTO limits (key, scope, name, value, max_running) "
            "VALUES ('location:my.loc', 'location', 'my.loc', '', 1)"
        )
    assert await store.limits.remove("location:my.loc", "test")
    assert not await store.limits.remove("location:my.loc", "test")
    assert await store.limits.usage() == []


async def test_a_limit_set_before_names_were_checked_can_be_removed(
    stack: Stack, store: Database
) -> None:
    """Listed as stored, removed as listed: a key `limits set` would refuse today."""
    async with store.connections.connection() as connection:
        await connection.execute(
            "INSERT INTO limits (key, scope, value, max_running) VALUES ('queue:a.b', 'queue', "
            "'a.b', 1)"
        )
    assert "queue:a.b" in await limit(stack, "list")
    assert "limit queue:a.b removed" in await limit(stack, "remove", "queue:a.b")
    assert "no limits" in await limit(stack, "list")
    missing = await dispatcher_cli(stack, "limits", "remove", "queue:a.b")
    assert missing.returncode != 0
    assert "no limit 'queue:a.b'" in missing.stderr
