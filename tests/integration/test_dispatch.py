"""The dispatch path end to end: script → RabbitMQ → control plane → agent → Docker → back."""

from __future__ import annotations

import asyncio
import uuid

from dispatcher.client import wait_for_outcome
from dispatcher.states import RunState
from dispatcher.store import Database
from tests.integration.conftest import Stack
from tests.support import eventually


async def wait_for_state(
    store: Database, run_id: uuid.UUID, *states: RunState, timeout: float = 60
):
    async def probe():  # type: ignore[no-untyped-def]
        try:
            run = await store.runs.get(run_id)
        except Exception:
            return None
        return run if run.state in states else None

    return await eventually(probe, timeout, what=f"run {run_id} in {states}")


async def test_a_submitted_run_succeeds_with_its_history_in_order(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_agent()
    async with stack.client() as client:
        run_id = await client.submit(
            stack.run_image, ["sh", "-c", "echo hello from the run"], queue=stack.queue
        )
    run = await wait_for_state(store, run_id, RunState.SUCCESS, RunState.FAILURE)
    assert run.state == RunState.SUCCESS
    assert run.exit_code == 0
    assert run.output_tail == ["hello from the run"]
    assert run.agent_id == stack.agent_id()
    events = await store.runs.events(run_id)
    transitions = [(e.kind, e.from_state, e.to_state) for e in events if e.to_state]
    assert transitions == [
        ("SubmitRun", None, "QUEUED"),
        ("RunLaunched", "QUEUED", "STARTING"),
        ("RunStarted", "STARTING", "STARTED"),
        ("RunSucceeded", "STARTED", "SUCCESS"),
    ]
    # Reported, then removed.
    await eventually(
        lambda: _async(not stack.containers_of(run_id)), 30, what="the container removed"
    )


async def test_a_run_that_exits_3_fails_with_its_exit_code_and_output(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_agent()
    async with stack.client() as client:
        run_id = await client.submit(
            stack.run_image,
            ["sh", "-c", "for i in 1 2 3 4 5; do echo line $i; done; echo oops >&2; exit 3"],
            queue=stack.queue,
        )
    run = await wait_for_state(store, run_id, RunState.SUCCESS, RunState.FAILURE)
    assert run.state == RunState.FAILURE
    assert run.exit_code == 3
    assert run.failure_reason == "EXIT_CODE"
    # stdout and stderr are separate pipes: their lines keep their own order only.
    assert [line for line in run.output_tail if line != "oops"] == [
        "line 1",
        "line 2",
        "line 3",
        "line 4",
        "line 5",
    ]
    assert run.output_tail.count("oops") == 1


async def _async(value):  # type: ignore[no-untyped-def]
    return value


async def test_one_follower_serves_two_waits_at_once_and_a_wait_that_comes_later(
    stack: Stack, store: Database
) -> None:
    """A script follows two runs and waits on both with gather: each wait sees every event
    (a consumer per wait had the broker deal the runs' ends out between them, each wait
    dropping the other's). A third wait, after both ended, still finds its run's end."""
    await stack.start_control_plane()
    await stack.start_agent()
    async with stack.client() as client:
        first, second = uuid.uuid4(), uuid.uuid4()
        async with await client.follow({first, second}) as follower:
            for run_id, code in ((first, 0), (second, 3)):
                await client.submit(
                    stack.run_image, ["sh", "-c", f"exit {code}"], queue=stack.queue, run_id=run_id
                )
            ends = await asyncio.gather(
                wait_for_outcome(follower, first, 60), wait_for_outcome(follower, second, 60)
            )
            assert [(o.run_id, o.state, o.exit_code) for o in ends] == [
                (first, "SUCCESS", 0),
                (second, "FAILURE", 3),
            ]
            again = await wait_for_outcome(follower, second, 10)
            assert (again.state, again.exit_code) == ("FAILURE", 3)
