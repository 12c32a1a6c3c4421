"""Log forwarding: output lines reach PostgreSQL in order; with it off, none leaves the host."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aio_pika

from dispatcher.states import RunState
from dispatcher.store import Database
from schemas import RunLog, event_decoder
from schemas.topology import STATUS_EXCHANGE
from tests.integration.conftest import Stack
from tests.integration.test_dispatch import wait_for_state
from tests.support import eventually


async def test_a_run_s_output_is_forwarded_in_order(stack: Stack, store: Database) -> None:
    await stack.start_control_plane()
    await stack.start_agent()
    async with stack.client() as client:
        run_id = await client.submit(
            stack.run_image,
            ["sh", "-c", "i=0; while [ $i -lt 300 ]; do echo line $i; i=$((i+1)); done"],
            queue=stack.queue,
        )
    await wait_for_state(store, run_id, RunState.SUCCESS)

    async def all_lines() -> bool:
        return len(await store.output.lines(run_id)) == 300

    await eventually(all_lines, 30, what="300 forwarded lines")
    logs = await store.output.lines(run_id)
    assert [line for _, _, line in logs] == [f"line {i}" for i in range(300)]
    assert [n for _, n, _ in logs] == list(range(300))

    shown = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "dispatcher", "runs", "show", str(run_id), "--logs"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**stack._env_for_cli()},
    )
    assert shown.returncode == 0, shown.stderr
    assert "line 0" in shown.stdout and "line 299" in shown.stdout


async def test_with_log_forwarding_off_no_output_line_reaches_the_broker(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_agent(extra=("--no-log-forwarding",))
    marker = f"private-{stack.unique}"
    connection = await aio_pika.connect(stack.amqp_url)
    async with connection:
        channel = await connection.channel()
        spy = await channel.declare_queue(exclusive=True)
        await spy.bind(STATUS_EXCHANGE, routing_key="run.#")
        async with stack.client() as client:
            run_id = await client.submit(
                stack.run_image,
                ["sh", "-c", f"echo {marker}; echo {marker} >&2; exit 5"],
                queue=stack.queue,
            )
        run = await wait_for_state(store, run_id, RunState.FAILURE, RunState.SUCCESS)
        assert run.exit_code == 5  # states and metadata still arrive
        assert run.output_tail == []

        kinds: list[str] = []
        decoder = event_decoder()

        async def until_the_end() -> bool:
            # Everything about the run, up to the control plane's verdict.
            while (message := await spy.get(fail=False, timeout=5)) is not None:
                await message.ack()
                assert marker.encode() not in message.body
                event = decoder.decode(message.body)
                if getattr(event, "run_id", None) == run_id:
                    kinds.append(type(event).__name__)
                    assert not isinstance(event, RunLog)
            return "RunEnded" in kinds

        await eventually(until_the_end, 30, interval=0.2, what="the run's events")
        # The claim first (sent again if its answer was slow), then the run's own events.
        assert kinds[0] == "RunClaimed"
        assert [k for k in kinds if k != "RunClaimed"] == [
            "RunLaunched",
            "RunStarted",
            "RunFailed",
            "RunEnded",
        ]
    assert await store.output.lines(run_id) == []


async def test_a_job_s_progress_and_output_reach_the_control_plane(
    stack: Stack, store: Database, images: object
) -> None:
    from dispatcher.settings import ImageNames

    assert isinstance(images, ImageNames)
    await stack.start_control_plane()
    await stack.start_agent()
    command = [
        "python3",
        "-m",
        "hd_sdk",
        "run",
        "--module",
        "hello_location",
        "--job",
        "count",
        "--config",
        '{"to": 3}',
    ]
    async with stack.client() as client:
        run_id = await client.submit(images.example_location, command, queue=stack.queue)
    run = await wait_for_state(store, run_id, RunState.SUCCESS, RunState.FAILURE, timeout=90)
    assert run.state == RunState.SUCCESS
    progress = await store.output.progress(run_id)
    finished = [p["step"] for p in progress if p["event"] == "step_finished"]
    assert finished == ["count-1", "count-2", "count-3"]
    assert progress[-1]["event"] == "metadata"
    assert progress[-1]["details"] == {"counted": 3}
    assert [line for _, _, line in await store.output.lines(run_id)] == ["1", "2", "3"]
