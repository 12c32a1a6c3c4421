"""An agent that trusts only the control plane's broker user takes no instruction and no
location snapshot from anyone else, whatever that user may publish (real RabbitMQ,
PostgreSQL and Docker)."""

from __future__ import annotations

import secrets
import urllib.parse
import uuid

import aio_pika

from dispatcher.states import RunState
from dispatcher.store import Database
from schemas import LaunchRun, LocationSnapshot, LocationSpec, encode
from schemas.topology import INSTRUCTIONS_EXCHANGE, LOCATIONS_EXCHANGE, instructions_queue
from tests.integration.conftest import Stack
from tests.integration.test_dispatch import wait_for_state
from tests.support import eventually, management_request
from worker_agent.code_servers import LABEL_LOCATION
from worker_agent.containers import LABEL_AGENT


async def publish_as(url: str, exchange: str, routing_key: str, body: bytes, user: str) -> None:
    """Publish ``body`` signed with ``user`` (the broker checks it is the connection's)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange, ensure=False)
        await target.publish(aio_pika.Message(body, user_id=user), routing_key)


async def test_an_agent_takes_instructions_and_snapshots_only_from_the_control_plane(
    stack: Stack, store: Database, broker: tuple[str, str]
) -> None:
    control_plane_user = urllib.parse.unquote(urllib.parse.urlsplit(stack.amqp_url).username or "")
    await stack.start_control_plane()
    agent = await stack.start_agent(extra=("--trust-control-plane", control_plane_user))
    assert f"taking instructions only from {control_plane_user}" in agent.output()

    # Another broker user that may publish everywhere on the vhost (an operator's script, a
    # service given too much): what it sends the agent is dead-lettered with the reason.
    intruder, password = f"intruder-{stack.unique}", secrets.token_urlsafe(12)
    vhost = urllib.parse.urlsplit(stack.amqp_url).path.lstrip("/")
    management_request(
        broker[1], "PUT", f"/api/users/{intruder}", {"password": password, "tags": ""}
    )
    try:
        management_request(
            broker[1],
            "PUT",
            f"/api/permissions/{urllib.parse.quote(vhost, safe='')}/{intruder}",
            {"configure": "", "write": ".*", "read": ""},
        )
        parts = urllib.parse.urlsplit(stack.amqp_url)
        intruder_url = parts._replace(
            netloc=f"{intruder}:{password}@{parts.hostname}:{parts.port}"
        ).geturl()
        forged = LaunchRun(run_id=uuid.uuid4(), attempt=1, image=stack.run_image)
        await publish_as(intruder_url, INSTRUCTIONS_EXCHANGE, stack.queue, encode(forged), intruder)
        snapshot = LocationSnapshot(
            queue=stack.queue, locations=(LocationSpec(name="evil", image=stack.run_image),)
        )
        await publish_as(intruder_url, LOCATIONS_EXCHANGE, stack.queue, encode(snapshot), intruder)
    finally:
        management_request(broker[1], "DELETE", f"/api/users/{intruder}")

    async def dead_lettered() -> list[dict[str, object]]:
        return [
            c
            for c in await store.dead_letters.counts()
            if "not by the control plane" in str(c["last_reason"])
        ]

    letters = await eventually(dead_lettered, 60, what="both forgeries dead-lettered")
    sources = {str(c["source_queue"]) for c in letters}
    assert instructions_queue(stack.queue) in sources
    await eventually(
        lambda: _snapshot_refused(agent.output()), 30, what="the snapshot refused by the agent"
    )
    assert stack.containers_of(forged.run_id) == []
    code_servers = stack.docker.containers.list(
        all=True, filters={"label": [LABEL_LOCATION, f"{LABEL_AGENT}={stack.agent_id(0)}"]}
    )
    assert code_servers == []

    # The control plane's own instructions still run.
    async with stack.client() as client:
        run_id = await client.submit(stack.run_image, ["true"], queue=stack.queue)
    run = await wait_for_state(store, run_id, RunState.SUCCESS, RunState.FAILURE, timeout=60)
    assert run.state == RunState.SUCCESS


async def _snapshot_refused(output: str) -> bool:
    return "location snapshot refused: UntrustedSender" in output
