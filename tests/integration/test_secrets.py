"""Secrets by reference and the agent's policy, on real RabbitMQ, PostgreSQL and Docker.

A secret's value is given to the agent's host only (its environment and its secrets
directory); the run names it. The value must reach the container and appear nowhere else: not
in any table, outbox row, event, dead letter or forwarded line.
"""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg

from dispatcher.states import RunState
from dispatcher.store import Database
from tests.integration.conftest import Stack
from tests.integration.test_dispatch import wait_for_state
from tests.integration.test_operators import dispatcher_cli
from tests.support import eventually

FROM_ENV = "env-s3cr3t-0f9d2c71"
FROM_FILE = "file-s3cr3t-77ab01e4"


async def rows_holding(stack: Stack, values: list[str]) -> list[str]:
    """Every row of every table of the test's schema that holds one of ``values``."""
    connection = await asyncpg.connect(
        stack.database_url, server_settings={"search_path": stack.schema}
    )
    try:
        tables = await connection.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
            stack.schema,
        )
        found = []
        for table in tables:
            name = table["table_name"]
            for row in await connection.fetch(f'SELECT * FROM "{name}"'):
                for column, value in dict(row).items():
                    text = (
                        value.decode(errors="replace") if isinstance(value, bytes) else str(value)
                    )
                    if any(v in text for v in values):
                        found.append(f"{name}.{column}")
        return found
    finally:
        await connection.close()


async def test_a_secret_reaches_the_container_and_nothing_else(
    stack: Stack, store: Database, tmp_path: Path
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "FILE_TOKEN").write_text(FROM_FILE + "\n")
    await stack.start_control_plane()
    await stack.start_agent(
        extra=("--secrets-dir", str(secrets), "--keep-finished"),
        env={"HD_SECRET_API_TOKEN": FROM_ENV},
    )
    async with stack.client() as client:
        run_id = await client.submit(
            stack.run_image,
            ["sh", "-c", 'echo "token $TOKEN"; echo "file $OTHER"; exit 7'],
            env={"TOKEN": "secret:API_TOKEN", "OTHER": "secret:FILE_TOKEN", "MODE": "plain"},
            queue=stack.queue,
            max_retries=0,
        )
    run = await wait_for_state(store, run_id, RunState.FAILURE, RunState.SUCCESS, timeout=90)
    assert (run.state, run.exit_code) == (RunState.FAILURE, 7)
    # The values reached the container (the agent's host can see them: it ran it)...
    [container] = stack.containers_of(run_id)
    env = container.attrs["Config"]["Env"]
    assert f"TOKEN={FROM_ENV}" in env and f"OTHER={FROM_FILE}" in env
    # ...and its output, as forwarded and as the tail, shows them redacted.
    assert run.output_tail == ["token ***", "file ***"]

    async def forwarded() -> list[str]:
        lines = [line for _, _, line in await store.output.lines(run_id)]
        return lines if len(lines) == 2 else []

    assert await eventually(forwarded, 30, what="the output forwarded") == ["token ***", "file ***"]
    # The run holds the references, as submitted.
    events = await store.runs.events(run_id)
    submitted = next(e for e in events if e.kind == "SubmitRun")
    assert submitted.payload["env"]["TOKEN"] == "secret:API_TOKEN"
    # Nowhere in PostgreSQL: runs, events, outbox payloads, logs, alerts, dead-letter counts.
    assert await rows_holding(stack, [FROM_ENV, FROM_FILE]) == []
    listed = await dispatcher_cli(stack, "dead-letters", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert FROM_ENV not in listed.stdout and FROM_FILE not in listed.stdout
    json.loads(listed.stdout)


async def test_a_missing_or_withheld_secret_and_a_forbidden_image_fail_with_the_reason(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_agent(
        extra=("--allow-image", stack.run_image, "--allow-secret", "NOT_*"),
        env={"HD_SECRET_HOST_ONLY": "kept for other runs"},
    )
    async with stack.client() as client:
        missing = await client.submit(
            stack.run_image, ["true"], env={"KEY": "secret:NOT_ON_HOST"}, queue=stack.queue
        )
        forbidden = await client.submit("busybox:1.36", ["true"], queue=stack.queue)
        withheld = await client.submit(
            stack.run_image, ["true"], env={"KEY": "secret:HOST_ONLY"}, queue=stack.queue
        )
    for run_id, words in (
        (missing, "secret NOT_ON_HOST is not set on this host"),
        (forbidden, "image 'busybox:1.36' is not allowed on this agent"),
        (withheld, "secret HOST_ONLY is not allowed on this agent (allowed: NOT_*)"),
    ):
        run = await wait_for_state(store, run_id, RunState.FAILURE, RunState.SUCCESS, timeout=60)
        assert run.failure_reason == "LAUNCH_ERROR"
        assert words in (run.failure_message or "")
        assert stack.containers_of(run_id) == []


async def test_containers_are_confined(stack: Stack, store: Database) -> None:
    await stack.start_control_plane()
    await stack.start_agent(extra=("--keep-finished", "--pids-limit", "64"))
    async with stack.client() as client:
        run_id = await client.submit(stack.run_image, ["true"], queue=stack.queue)
    run = await wait_for_state(store, run_id, RunState.SUCCESS, RunState.FAILURE, timeout=60)
    assert run.state == RunState.SUCCESS
    [container] = stack.containers_of(run_id)
    host = container.attrs["HostConfig"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["CapDrop"] == ["ALL"]
    assert host["PidsLimit"] == 64
