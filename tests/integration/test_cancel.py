"""Cancellation on a real broker, database and engine: a queued run never starts, a running
one is stopped (SIGKILL after its grace when it ignores SIGTERM), a frozen agent's run ends
CANCEL_TIMEOUT, and a cancel is idempotent."""

from __future__ import annotations

import signal
import uuid
from datetime import UTC, datetime

from dispatcher.client import CANCELED_EXIT_CODE, wait_for_outcome
from dispatcher.states import RunState
from dispatcher.store import Database
from tests.integration.conftest import Stack
from tests.integration.test_dispatch import wait_for_state
from tests.integration.test_operators import dispatcher_cli
from tests.support import eventually
from worker_agent.containers import LABEL_RUN

#: A run that ignores SIGTERM: only SIGKILL ends it.
STUBBORN = ["sh", "-c", "trap '' TERM; while true; do sleep 1; done"]


async def cancel(stack: Stack, run_id: uuid.UUID, *args: str) -> tuple[int, str]:
    done = await dispatcher_cli(stack, "runs", "cancel", str(run_id), *args)
    return done.returncode, done.stdout + done.stderr


async def test_a_queued_run_is_canceled_and_its_waiter_says_so(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()  # no agent: the run stays QUEUED
    async with stack.client() as client:
        follower = await client.follow()
        run_id = await client.submit(stack.run_image, ["sleep", "300"], queue=stack.queue)
        await follower.add(run_id)
        await wait_for_state(store, run_id, RunState.QUEUED, timeout=30)
        code, said = await cancel(stack, run_id, "--reason", "not needed")
        assert code == 0 and "cancel requested" in said, said
        outcome = await wait_for_outcome(follower, run_id, 30)
    assert outcome.canceled and outcome.process_exit_code == CANCELED_EXIT_CODE
    run = await store.runs.get(run_id)
    assert run.state == RunState.CANCELED and run.failure_message == "not needed"
    # Again: nothing changes, and it says so.
    code, said = await cancel(stack, run_id)
    assert code == 0 and "has ended already: CANCELED" in said
    # Its LaunchRun waited in the queue before any agent was there to be told. An agent that
    # comes now may launch it; it is then told to stop it at once (the run ended before that
    # launch), and the run stays CANCELED.
    await stack.start_agent(0, extra=("--keep-finished",))
    async with stack.client() as client:
        later = await client.submit(stack.run_image, ["sleep", "1"], queue=stack.queue)
    await wait_for_state(store, later, RunState.SUCCESS, timeout=60)

    async def not_running() -> bool:
        return all(c.status != "running" for c in stack.containers_of(run_id))

    await eventually(not_running, 60, what="no container of the canceled run running")
    assert (await store.runs.get(run_id)).state == RunState.CANCELED


async def test_a_launch_waiting_in_an_agents_queue_is_never_started(
    stack: Stack, store: Database
) -> None:
    began = datetime.now(UTC)
    await stack.start_control_plane()
    agent = await stack.start_agent(0, max_concurrent=1)
    async with stack.client() as client:
        busy = await client.submit(stack.run_image, ["sleep", "4"], queue=stack.queue)
        await wait_for_state(store, busy, RunState.STARTED, timeout=60)
        # The agent's one slot is taken: this run's LaunchRun waits in its queue.
        waiting = await client.submit(stack.run_image, ["true"], queue=stack.queue)
        await wait_for_state(store, waiting, RunState.QUEUED, timeout=30)
        code, said = await cancel(stack, waiting)
        assert code == 0, said
    await wait_for_state(store, waiting, RunState.CANCELED, timeout=30)
    await wait_for_state(store, busy, RunState.SUCCESS, timeout=60)
    # The slot frees; the waiting launch is taken from the queue and dropped.
    await agent.wait_for_output(f"run {waiting} attempt 1 was terminated before it started")
    assert stack.containers_of(waiting) == []
    # Docker's own account: the busy run's container was created, the canceled one's never.
    assert creates(stack, began, busy) == 1
    assert creates(stack, began, waiting) == 0


def creates(stack: Stack, since: datetime, run_id: uuid.UUID) -> int:
    """How many containers of the run Docker says it created since ``since``."""
    events = stack.docker.events(
        since=since,
        until=datetime.now(UTC),
        filters={"type": "container", "label": f"{LABEL_RUN}={run_id}"},
        decode=True,
    )
    return sum(1 for e in events if e.get("Action") == "create")


async def test_a_running_run_that_ignores_sigterm_is_killed_after_its_grace(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_monitor()
    await stack.start_agent(0, extra=("--keep-finished",))
    async with stack.client() as client:
        run_id = await client.submit(stack.run_image, STUBBORN, queue=stack.queue, max_retries=3)
    await wait_for_state(store, run_id, RunState.STARTED, timeout=60)
    code, said = await cancel(stack, run_id, "--grace", "1", "--wait", "--timeout", "60")
    assert code == 0 and f"run {run_id}: CANCELED" in said, said
    run = await store.runs.get(run_id)
    assert (run.state, run.attempt) == (RunState.CANCELED, 1)  # never retried
    [container] = stack.containers_of(run_id)
    container.reload()
    assert container.status == "exited"
    assert container.attrs["State"]["ExitCode"] == 137  # SIGKILL: SIGTERM was ignored
    # A finished run cannot be canceled: it says so.
    async with stack.client() as client:
        done = await client.submit(stack.run_image, ["true"], queue=stack.queue)
    await wait_for_state(store, done, RunState.SUCCESS, timeout=60)
    code, said = await cancel(stack, done)
    assert code == 1 and "has ended already: SUCCESS" in said
    # Without the database, the control plane says how it ended: a waiter hears it at once.
    waited = await dispatcher_cli(
        stack, "runs", "cancel", str(done), "--wait", without=("HD_DATABASE_URL",)
    )
    assert waited.returncode == 1, waited.stdout + waited.stderr
    assert f"run {done}: SUCCESS" in waited.stdout


async def test_a_run_on_a_frozen_agent_ends_cancel_timeout_and_is_stopped_when_it_thaws(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_monitor(("--cancel-confirm", "2", "--lost-after-beats", "1000"))
    agent = await stack.start_agent(0)
    async with stack.client() as client:
        run_id = await client.submit(stack.run_image, ["sleep", "300"], queue=stack.queue)
    await wait_for_state(store, run_id, RunState.STARTED, timeout=60)
    agent.signal(signal.SIGSTOP)
    try:
        code, said = await cancel(stack, run_id, "--grace", "1")
        assert code == 0, said
        run = await wait_for_state(store, run_id, RunState.CANCELED, timeout=60)
        assert run.failure_reason == "CANCEL_TIMEOUT"
    finally:
        agent.signal(signal.SIGCONT)

    # Back, the agent takes the TerminateRun that waited for it (and its heartbeat lists the
    # container of an ended run, which the monitor fences): it stops the container and
    # removes it as any finished one.
    async def gone() -> bool:
        return stack.containers_of(run_id) == []

    await eventually(gone, 90, interval=0.5, what="the canceled run's container gone")


async def test_runs_wait_reports_a_run_that_ended_before_or_ends_later(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_agent(0)
    async with stack.client() as client:
        done = await client.submit(
            stack.run_image, ["sh", "-c", "echo bye; exit 3"], queue=stack.queue
        )
        await wait_for_state(store, done, RunState.FAILURE, timeout=60)
        # Ended before anyone waited: said at once, without the database too.
        waited = await dispatcher_cli(
            stack, "runs", "wait", str(done), "--timeout", "50", without=("HD_DATABASE_URL",)
        )
        assert waited.returncode == 3, waited.stdout + waited.stderr
        assert "  | bye" in waited.stderr
        assert f"run {done}: FAILURE (EXIT_CODE), exit code 3" in waited.stderr
        # With the database, from it (the control plane need not answer).
        waited = await dispatcher_cli(stack, "runs", "wait", str(done)[:8])
        assert waited.returncode == 3, waited.stdout + waited.stderr
        assert "  | bye" in waited.stderr
        # From a script: the same.
        outcome = await client.wait(done, timeout=50)
        assert (outcome.state, outcome.exit_code, outcome.output_tail) == ("FAILURE", 3, ("bye",))
        # Under way, by a prefix of its id (which needs the database): followed to its end.
        later = await client.submit(stack.run_image, ["sh", "-c", "sleep 8"], queue=stack.queue)
    # Followed while it runs (the command binds well within its 8 s): its attempt is told.
    await wait_for_state(store, later, RunState.STARTED, timeout=60)
    waited = await dispatcher_cli(stack, "runs", "wait", str(later)[:13], "--timeout", "50")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert f"run {later}: attempt 1: succeeded" in waited.stderr
    assert f"run {later}: SUCCESS" in waited.stderr
    assert (await store.runs.get(later)).state == RunState.SUCCESS
    # A refused submission made no run: its refusal is said again.
    async with stack.client() as client:
        refused = await client.submit(location="nowhere", job="job", queue=stack.queue)

    async def answered() -> bool:
        return (await store.runs.answer(refused))[1] is not None

    await eventually(answered, 30, what="the submission refused")
    waited = await dispatcher_cli(
        stack, "runs", "wait", str(refused), "--timeout", "50", without=("HD_DATABASE_URL",)
    )
    assert waited.returncode == 2, waited.stdout + waited.stderr
    assert f"submission rejected, run {refused} not created" in waited.stderr
    assert "nowhere" in waited.stderr
    # No such run: the database says so; without it, it is waited for until the timeout.
    nobody = uuid.uuid4()
    waited = await dispatcher_cli(stack, "runs", "wait", str(nobody))
    assert waited.returncode == 1 and f"no run {nobody}" in waited.stderr
    waited = await dispatcher_cli(
        stack, "runs", "wait", str(nobody), "--timeout", "2", without=("HD_DATABASE_URL",)
    )
    assert waited.returncode == 124 and "no end of run" in waited.stderr
