"""Submitter tokens and the control plane's, monitor's and web process's role identities, on a
real RabbitMQ
(the test's vhost), PostgreSQL and Docker: what each identity may do, what the broker refuses,
and the intake's limits."""

from __future__ import annotations

import urllib.parse
import uuid
from collections.abc import Iterator

import aio_pika
import httpx
import pytest

from dispatcher.client import Client, wait_for_outcome
from dispatcher.errors import SubmissionRejected
from dispatcher.states import RunState
from dispatcher.store import Database
from schemas import AgentHeartbeat, LaunchRun, RunFailed, SubmitRun, encode
from schemas.runs import FailureReason
from schemas.topology import (
    CONTROL_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    INSTRUCTIONS_EXCHANGE,
    LOCATIONS_EXCHANGE,
    MONITOR_SOURCE,
    REQUESTS_EXCHANGE,
    REQUESTS_QUEUE,
    REQUESTS_ROUTING_KEY,
    STATUS_EXCHANGE,
    event_routing_key,
)
from tests.conftest import SESSION_ID
from tests.integration.conftest import Stack
from tests.integration.test_crashes import publish_raw
from tests.integration.test_dispatch import wait_for_state
from tests.integration.test_identities import add_identity, refused
from tests.integration.test_operators import dispatcher_cli
from tests.integration.test_web_api import bearer, submission, token
from tests.support import Proc, eventually, management_request

Channel = aio_pika.abc.AbstractChannel


class BrokerUsers:
    """Names for the test's broker users (users are the broker's, not the vhost's), deleted
    when the test ends."""

    def __init__(self, stack: Stack) -> None:
        assert stack.management_url, "these tests need the broker's management API"
        self.stack = stack
        self.names: list[str] = []

    def name(self, what: str) -> str:
        made = f"t-{SESSION_ID}-{self.stack.unique}-{what}"
        self.names.append(made)
        return made

    def get(self, name: str) -> dict[str, object]:
        path = f"/api/users/{urllib.parse.quote(name, safe='')}"
        user: dict[str, object] = management_request(self.stack.management_url, "GET", path)
        return user

    def connections_of(self, name: str) -> list[object]:
        listing = management_request(self.stack.management_url, "GET", "/api/connections")
        return [c for c in listing or [] if c.get("user") == name]

    def delete_all(self) -> None:
        for name in self.names:
            try:
                path = f"/api/users/{urllib.parse.quote(name, safe='')}"
                management_request(self.stack.management_url, "DELETE", path)
            except Exception:  # already revoked
                pass


@pytest.fixture
def users(stack: Stack) -> Iterator[BrokerUsers]:
    made = BrokerUsers(stack)
    yield made
    stack.stop()  # first, so that no process sees its identity vanish
    made.delete_all()


async def add_token(stack: Stack, name: str, *limits: str) -> str:
    added = await dispatcher_cli(stack, "tokens", "add", name, *limits)
    assert added.returncode == 0, added.stderr
    assert "shown once" in added.stderr
    url = added.stdout.strip()
    assert url.startswith("amqp://") and f"{name}:" in url
    return url


async def add_role(stack: Stack, role: str, name: str) -> str:
    added = await dispatcher_cli(stack, "identities", "add", role, name)
    assert added.returncode == 0, added.stderr
    url = added.stdout.strip()
    assert url.startswith("amqp://") and f"{name}:" in url
    return url


async def start_as(stack: Stack, command: str, url: str, ready: str, **env: str) -> Proc:
    """``dispatcher serve`` or ``monitor`` with another broker identity than the stack's."""
    args = ["--log-level", "DEBUG", "--metrics-port", "0"]
    proc = Proc(
        "dispatcher",
        [command, *args],
        stack.logs / f"{command}-{len(stack.processes)}.log",
        {**stack._env(), "HD_AMQP_URL": url, **env},
    ).start()
    stack.processes.append(proc)
    await proc.wait_for_output(ready, timeout=60)
    return proc


def publish_to(exchange: str, key: str, body: bytes = b"{}") -> object:
    async def attempt(channel: Channel) -> None:
        target = await channel.get_exchange(exchange, ensure=False)
        await target.publish(aio_pika.Message(body), routing_key=key)

    attempt.__name__ = f"publish to {exchange} ({key})"
    return attempt


async def submit_refused(
    url: str, follower_url: str, **submission: object
) -> tuple[uuid.UUID, str]:
    """Submit with ``url``, follow the answer with ``follower_url``: (run id, the reason)."""
    run_id = uuid.uuid4()
    async with Client(follower_url) as watcher, Client(url) as client:
        follower = await watcher.follow({run_id})
        await client.submit(run_id=run_id, **submission)  # type: ignore[arg-type]
        with pytest.raises(SubmissionRejected) as caught:
            await wait_for_outcome(follower, run_id, 60)
    return run_id, str(caught.value)


async def test_a_token_submits_within_its_limits_and_nothing_else_is_taken(
    stack: Stack, store: Database, users: BrokerUsers
) -> None:
    await stack.start_control_plane()
    other = f"gpu-{stack.unique}"
    await stack.start_agent(extra=("--queue", other))
    name = users.name("ci")
    url = await add_token(stack, name, "--queue", stack.queue)

    async with Client(url) as client:
        outcome = await client.submit_and_wait(
            stack.run_image, ["sh", "-c", "echo hi"], queue=stack.queue, timeout=60
        )
    assert (outcome.succeeded, outcome.output_tail) == (True, ("hi",))
    assert (await store.runs.get(outcome.run_id)).state == RunState.SUCCESS

    # Outside its limits: answered with the reason, no run, no container, though an agent
    # takes that queue (the operator's own submission there runs).
    run_id, reason = await submit_refused(
        url, url, image=stack.run_image, command=["true"], queue=other
    )
    assert (
        reason == f"submitter {name!r} may not submit to queue {other!r} (allowed: {stack.queue})"
    )
    async with stack.client() as operator:
        ran = await operator.submit_and_wait(stack.run_image, ["true"], queue=other, timeout=60)
    assert ran.succeeded
    assert not await store.runs.exists(run_id) and stack.containers_of(run_id) == []

    # A token limited to a location's jobs submits no run of an image of its own.
    located = users.name("etl")
    located_url = await add_token(stack, located, "--location", "etl")
    run_id, reason = await submit_refused(
        located_url, located_url, image=stack.run_image, queue=stack.queue
    )
    assert "may submit only jobs of its locations (allowed: etl)" in reason
    assert not await store.runs.exists(run_id)

    # An agent's identity may publish requests (it asks for location snapshots), but a
    # submission of its is refused.
    agent_url = await add_identity(stack, stack.agent_id(5))
    users.names.append(stack.agent_id(5))
    run_id, reason = await submit_refused(
        agent_url, stack.amqp_url, image=stack.run_image, queue=stack.queue
    )
    assert f"broker user {stack.agent_id(5)!r} may not submit runs" in reason
    assert not await store.runs.exists(run_id)

    # Now that tokens are in use, a submission that names no sender is refused too: a token
    # cannot shed its limits by leaving its user_id out.
    anonymous = SubmitRun(run_id=uuid.uuid4(), image=stack.run_image, queue=stack.queue)
    async with stack.client() as watcher:
        follower = await watcher.follow({anonymous.run_id})
        await publish_raw(
            stack.amqp_url, REQUESTS_EXCHANGE, REQUESTS_ROUTING_KEY, encode(anonymous)
        )
        with pytest.raises(SubmissionRejected, match="must carry its sender's AMQP user_id"):
            await wait_for_outcome(follower, anonymous.run_id, 60)
    assert not await store.runs.exists(anonymous.run_id)

    listed = await dispatcher_cli(stack, "tokens", "list")
    assert listed.returncode == 0, listed.stderr
    assert f"queues: {stack.queue}; locations: any" in listed.stdout
    assert "queues: any; locations: etl" in listed.stdout


async def test_a_token_can_publish_nothing_but_requests_and_follow_only_its_runs(
    stack: Stack, users: BrokerUsers
) -> None:
    await stack.start_control_plane()
    url = await add_token(stack, users.name("ci"))
    launch = LaunchRun(run_id=uuid.uuid4(), attempt=1, image=stack.run_image)
    beat = AgentHeartbeat(agent_id="a-1", sequence=1, max_concurrent=1)
    failed = RunFailed(run_id=uuid.uuid4(), attempt=1, reason=FailureReason.AGENT_LOST)
    attempts = [
        publish_to(INSTRUCTIONS_EXCHANGE, stack.queue, encode(launch)),
        publish_to(CONTROL_EXCHANGE, "a-1"),
        publish_to(LOCATIONS_EXCHANGE, stack.queue),
        publish_to(STATUS_EXCHANGE, "agent.heartbeat.a-1", encode(beat)),
        publish_to(STATUS_EXCHANGE, event_routing_key(failed, MONITOR_SOURCE), encode(failed)),
    ]

    async def bind_every_run(channel: Channel) -> None:
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(STATUS_EXCHANGE, routing_key="run.#")

    async def read_the_requests(channel: Channel) -> None:
        queue = await channel.get_queue("hd.requests", ensure=False)
        await queue.get(fail=False)

    for attempt in [*attempts, bind_every_run, read_the_requests]:
        assert "ACCESS_REFUSED" in await refused(url, attempt), attempt.__name__  # type: ignore[attr-defined]


async def test_a_revoked_token_is_cut_off(
    stack: Stack, store: Database, users: BrokerUsers
) -> None:
    await stack.start_control_plane()
    name = users.name("ci")
    url = await add_token(stack, name, "--queue", stack.queue)
    async with Client(url) as client:
        await client.follow()  # holds a connection open

        async def listed() -> bool:  # the management API lists connections with a delay
            return bool(users.connections_of(name))

        await eventually(listed, 30, what="the token's connection listed")
        revoked = await dispatcher_cli(stack, "tokens", "revoke", name)
        assert revoked.returncode == 0, revoked.stderr

        async def cut() -> bool:
            return not users.connections_of(name)

        await eventually(cut, 30, what="the token's connection closed")
    with pytest.raises(Exception, match=r"ACCESS_REFUSED|access refused|403"):
        await aio_pika.connect(url, timeout=10)
    assert await store.submitters.get(name) is None
    actions = [(e["action"], e["subject"]) for e in await store.audit.recent()]
    assert ("submitter.revoke", name) in actions and ("submitter.add", name) in actions
    again = await dispatcher_cli(stack, "tokens", "revoke", name)
    assert again.returncode == 1 and f"no submitter token {name!r}" in again.stderr

    # No other kind of broker user is touched, nor taken over.
    agent_id = stack.agent_id(0)
    users.names.append(agent_id)
    await add_identity(stack, agent_id)
    for command in (("revoke", agent_id), ("add", agent_id)):
        refusal = await dispatcher_cli(stack, "tokens", *command)
        assert refusal.returncode == 1 and "is no submitter token" in refusal.stderr
    assert "hd-agent" in users.get(agent_id)["tags"]  # type: ignore[operator]


async def test_the_control_plane_and_the_monitor_run_with_their_own_least_identities(
    stack: Stack, store: Database, users: BrokerUsers
) -> None:
    control, monitor = users.name("cp"), users.name("mon")
    control_url = await add_role(stack, "control-plane", control)
    monitor_url = await add_role(stack, "monitor", monitor)
    for name, tag in ((control, "hd-control-plane"), (monitor, "hd-monitor")):
        tags = users.get(name)["tags"]
        assert tag in tags and "administrator" not in tags  # type: ignore[operator]
    agent_id = stack.agent_id(0)
    users.names.append(agent_id)
    agent_url = await add_identity(stack, agent_id)
    token_url = await add_token(stack, users.name("ci"), "--queue", stack.queue)

    # The control plane sets the broker policies with its own identity (no administrator's
    # credentials in the management URL).
    parts = urllib.parse.urlsplit(stack.management_url)
    bare = f"{parts.scheme}://{parts.hostname}:{parts.port}"
    serve = await start_as(
        stack, "serve", control_url, "control plane running", HD_AMQP_MANAGEMENT_URL=bare
    )
    assert "broker policies set" in serve.output()
    await start_as(
        stack, "monitor", monitor_url, "this monitor is active", HD_RETRY_BACKOFF_S="0.2"
    )
    agent = await stack.start_agent(0, env={"HD_AMQP_URL": agent_url})

    async with Client(token_url) as client:
        outcome = await client.submit_and_wait(
            stack.run_image, ["sh", "-c", "echo hi"], queue=stack.queue, timeout=60
        )
        assert (outcome.succeeded, outcome.output_tail) == (True, ("hi",))
        assert (await store.runs.get(outcome.run_id)).agent_id == agent_id

        # The monitor's decision (agent lost) is published by the control plane's relay and
        # reaches the submitter as the run's end.
        run_id = uuid.uuid4()
        follower = await client.follow({run_id})
        await client.submit(
            stack.run_image, ["sleep", "300"], queue=stack.queue, run_id=run_id, max_retries=0
        )
        await wait_for_state(store, run_id, RunState.STARTED, timeout=60)
        agent.kill()
        ended = await wait_for_outcome(follower, run_id, 60)
    assert (ended.succeeded, ended.reason) == (False, "AGENT_LOST")

    # What the roles may not do, the broker refuses.
    launch = LaunchRun(run_id=uuid.uuid4(), attempt=1, image=stack.run_image)
    beat = AgentHeartbeat(agent_id=agent_id, sequence=1, max_concurrent=1)
    failed = RunFailed(run_id=uuid.uuid4(), attempt=1, reason=FailureReason.AGENT_LOST)
    for attempt in (
        publish_to(INSTRUCTIONS_EXCHANGE, stack.queue, encode(launch)),
        publish_to(STATUS_EXCHANGE, event_routing_key(failed, MONITOR_SOURCE), encode(failed)),
        publish_to(REQUESTS_EXCHANGE, REQUESTS_ROUTING_KEY),
    ):
        assert "ACCESS_REFUSED" in await refused(monitor_url, attempt), attempt.__name__  # type: ignore[attr-defined]
    # The control plane speaks for no agent.
    speak_for_agent = publish_to(STATUS_EXCHANGE, f"agent.heartbeat.{agent_id}", encode(beat))
    assert "ACCESS_REFUSED" in await refused(control_url, speak_for_agent)


async def test_the_web_process_runs_with_an_identity_that_may_only_submit_and_cancel(
    stack: Stack, store: Database, users: BrokerUsers
) -> None:
    web = users.name("web")
    web_url = await add_role(stack, "web", web)
    assert "hd-web" in users.get(web)["tags"]  # type: ignore[operator]
    # The control plane takes the web identity's submissions once it is named trusted.
    await start_as(
        stack,
        "serve",
        stack._env()["HD_AMQP_URL"],
        "control plane running",
        HD_TRUSTED_BROKER_USERS=web,
    )
    await stack.start_agent(0)
    _, base = await stack.start_web(env={"HD_AMQP_URL": web_url})
    operate = bearer(await token(stack, "web-bot", "operate"))
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        quick = submission(stack, command=["true"])
        answer = await http.post("/runs", json=quick, headers=operate)
        assert answer.status_code == 202 and answer.json()["status"] == "accepted", answer.text
        long = submission(stack, command=["sleep", "300"])
        assert (await http.post("/runs", json=long, headers=operate)).status_code == 202
        await wait_for_state(store, uuid.UUID(long["run_id"]), RunState.STARTED, timeout=60)
        canceled = await http.post(f"/runs/{long['run_id']}/cancel", json={}, headers=operate)
        assert canceled.status_code == 202, canceled.text
        # The dead letters are listed from PostgreSQL: the identity reads nothing.
        letters = await http.get("/dead-letters", headers=operate)
        assert letters.status_code == 200, letters.text
    await wait_for_state(store, uuid.UUID(quick["run_id"]), RunState.SUCCESS, timeout=60)
    assert (await store.runs.get(uuid.UUID(quick["run_id"]))).submitted_by == "web-bot"
    await wait_for_state(store, uuid.UUID(long["run_id"]), RunState.CANCELED, timeout=60)

    # Anything but a request, the broker refuses it.
    launch = LaunchRun(run_id=uuid.uuid4(), attempt=1, image=stack.run_image)
    failed = RunFailed(run_id=uuid.uuid4(), attempt=1, reason=FailureReason.AGENT_LOST)
    for attempt in (
        publish_to(INSTRUCTIONS_EXCHANGE, stack.queue, encode(launch)),
        publish_to(CONTROL_EXCHANGE, stack.agent_id(0)),
        publish_to(STATUS_EXCHANGE, event_routing_key(failed, MONITOR_SOURCE), encode(failed)),
        publish_to(LOCATIONS_EXCHANGE, stack.queue),
        bind_requests_to(DEAD_LETTER_EXCHANGE),
    ):
        assert "ACCESS_REFUSED" in await refused(web_url, attempt), attempt.__name__  # type: ignore[attr-defined]


def bind_requests_to(exchange: str) -> object:
    """Bind the intake's queue (which a web identity may write to: it shares the requests
    exchange's name) to ``exchange``: every message there would reach the intake."""

    async def attempt(channel: Channel) -> None:
        queue = await channel.get_queue(REQUESTS_QUEUE, ensure=False)
        await queue.bind(exchange, routing_key="#")

    attempt.__name__ = f"bind {REQUESTS_QUEUE} to {exchange}"
    return attempt
