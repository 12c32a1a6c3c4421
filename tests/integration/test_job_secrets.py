"""Secrets by reference: a job run takes its environment from its location alone, and a plain
run's ``secret:NAME`` is stored as the reference it is."""

from __future__ import annotations

import json
import uuid

import pytest

from dispatcher.client import wait_for_outcome
from dispatcher.errors import InvalidSubmission, SubmissionRejected
from dispatcher.settings import ImageNames
from dispatcher.states import RunState
from dispatcher.store import Database
from schemas import SubmitRun, encode
from schemas.topology import REQUESTS_EXCHANGE, REQUESTS_ROUTING_KEY
from tests.integration.conftest import Stack
from tests.integration.test_crashes import publish_raw
from tests.integration.test_dispatch import wait_for_state
from tests.integration.test_locations import loaded
from tests.integration.test_operators import dispatcher_cli
from tests.support import eventually

OWN_ENV = "takes its image, command and environment from its location"


async def stored_env(store: Database, run_id: uuid.UUID) -> dict[str, str] | None:
    """The env PostgreSQL holds for the run (None: no such run yet)."""
    async with store.connections.connection() as connection:
        raw = await connection.fetchval("SELECT env FROM runs WHERE run_id = $1", run_id)
    return None if raw is None else dict(json.loads(raw))


async def test_a_job_submission_with_its_own_env_or_command_is_rejected_and_creates_no_run(
    stack: Stack, store: Database, images: ImageNames
) -> None:
    await stack.start_control_plane()
    # The location's secret is on the agent's host only.
    await stack.start_agent(
        env={"HD_SECRET_TOKEN": "s3cret-value"}, extra=("--location-check-interval", "0.5")
    )
    name = f"sec-{stack.unique}"
    await store.locations.put(
        name, images.example_location, env={"TOKEN": "secret:TOKEN"}, queue=stack.queue
    )
    await eventually(lambda: loaded(store.locations, name), 60, what="LOADED")

    # The client refuses before sending, naming the field.
    async with stack.client() as client:
        with pytest.raises(InvalidSubmission, match=OWN_ENV) as refused:
            await client.submit_job(name, "hello", {"name": "Ada"}, env={"LD_PRELOAD": "/x.so"})
        assert refused.value.field == "env"

    # A client that skips the check (any other language) is answered RunRejected with the
    # reason, whatever it brings next to the location's secrets.
    for extra in [
        {"env": {"LD_PRELOAD": "/tmp/x.so"}},
        {"command": ("sh", "-c", "echo $TOKEN")},
        {"ready_check": ("sh", "-c", "echo $TOKEN")},
        {"image": stack.run_image},
    ]:
        submission = SubmitRun(
            run_id=uuid.uuid4(),
            location=name,
            job="hello",
            config={"name": "Ada"},
            queue=stack.queue,
            **extra,  # type: ignore[arg-type]
        )
        async with stack.client() as client:
            follower = await client.follow({submission.run_id})
            body = encode(submission)
            await publish_raw(stack.amqp_url, REQUESTS_EXCHANGE, REQUESTS_ROUTING_KEY, body)
            with pytest.raises(SubmissionRejected, match=OWN_ENV) as rejected:
                await wait_for_outcome(follower, submission.run_id, 30)
        assert f"also sets {next(iter(extra))}" in str(rejected.value)

    # From the command line: refused before sending, exit code 2, no run id printed.
    cli = await dispatcher_cli(
        stack,
        "submit",
        "--location",
        name,
        "--job",
        "hello",
        "--config",
        '{"name": "Ada"}',
        "--env",
        "TOKEN=secret:OTHER",
    )
    assert cli.returncode == 2, cli.stderr
    assert "invalid submission: env:" in cli.stderr and OWN_ENV in cli.stderr
    assert cli.stdout == ""
    assert await store.runs.recent() == []

    # The job as submitted today (location, job, config) is accepted and runs with the
    # location's environment: nothing of it is stored with the run.
    async with stack.client() as client:
        accepted = await client.submit_job(name, "hello", {"name": "Ada"}, timeout=60)
    run = await wait_for_state(store, accepted, RunState.SUCCESS, RunState.FAILURE, timeout=90)
    assert run.state == RunState.SUCCESS, run
    assert await stored_env(store, accepted) == {}
    assert [r.run_id for r in await store.runs.recent()] == [accepted]


async def test_a_plain_run_stores_its_secret_reference_and_refuses_an_unsafe_one(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    # No agent: what is asserted is what the control plane keeps of the submission.
    queue = f"nobody-{stack.unique}"
    async with stack.client() as client:
        run_id = await client.submit(
            stack.run_image, ["true"], env={"TOKEN": "secret:TOKEN"}, queue=queue
        )
        with pytest.raises(InvalidSubmission, match="secret reference of 'TOKEN'") as refused:
            await client.submit(
                stack.run_image, ["true"], env={"TOKEN": "secret:../../etc/shadow"}, queue=queue
            )
        assert refused.value.field == "env"

        # Past the client, the control plane refuses it too.
        unsafe = SubmitRun(
            run_id=uuid.uuid4(),
            image=stack.run_image,
            command=("true",),
            env={"TOKEN": "secret:"},
            queue=queue,
        )
        follower = await client.follow({unsafe.run_id})
        await publish_raw(stack.amqp_url, REQUESTS_EXCHANGE, REQUESTS_ROUTING_KEY, encode(unsafe))
        with pytest.raises(SubmissionRejected, match="secret reference of 'TOKEN'"):
            await wait_for_outcome(follower, unsafe.run_id, 30)

    env = await eventually(lambda: stored_env(store, run_id), 30, what="the run stored")
    assert env == {"TOKEN": "secret:TOKEN"}
    assert [r.run_id for r in await store.runs.recent()] == [run_id]
