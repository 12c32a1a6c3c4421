"""Nothing waits forever unseen (real broker, database and engine): a run still QUEUED after
its queue timeout fails QUEUE_TIMEOUT and never starts later, and runs waiting on a queue no
live agent consumes raise an alert."""

from __future__ import annotations

from dispatcher.states import RunState
from dispatcher.store import Database
from tests.integration.conftest import Stack
from tests.integration.test_dispatch import wait_for_state
from tests.support import eventually


async def test_a_run_nobody_takes_fails_queue_timeout_and_the_queue_is_alerted(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    monitor = await stack.start_monitor()
    async with stack.client() as client:
        hasty = await client.submit(
            stack.run_image, ["sleep", "300"], queue=stack.queue, queue_timeout_s=2
        )
        patient = await client.submit(stack.run_image, ["true"], queue=stack.queue)
    run = await wait_for_state(store, hasty, RunState.FAILURE, timeout=60)
    assert run.failure_reason == "QUEUE_TIMEOUT"
    assert "still QUEUED after" in (run.failure_message or "")
    assert "QUEUE_TIMEOUT" in monitor.output()

    # An agent that comes now runs the patient run. The timed-out run's LaunchRun waited in
    # the queue before any agent was there to be told: if the agent launches it, it is told
    # to stop it at once, and the run stays as it ended.
    await stack.start_agent(0, extra=("--keep-finished",))
    await wait_for_state(store, patient, RunState.SUCCESS, timeout=60)

    async def not_running() -> bool:
        return all(c.status != "running" for c in stack.containers_of(hasty))

    await eventually(not_running, 60, what="no container of the timed-out run running")
    assert (await store.runs.get(hasty)).state == RunState.FAILURE


async def test_runs_waiting_on_a_queue_with_no_live_agent_raise_an_alert(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_monitor(env={"HD_UNSERVED_AFTER_S": "1"})
    async with stack.client() as client:
        await client.submit(stack.run_image, ["true"], queue=stack.queue)

    async def alerted() -> list[str]:
        return [a["message"] for a in await store.alerts.recent() if a["kind"] == "queue_unserved"]

    [message] = await eventually(alerted, 60, what="the unserved queue alerted")
    assert f"wait on queue {stack.queue}" in message and "no live agent" in message
