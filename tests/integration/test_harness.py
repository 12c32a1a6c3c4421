"""The real services the suite runs against answer as the rest of the suite expects."""

from __future__ import annotations

import asyncio

import aio_pika
import asyncpg
import docker

from tests.conftest import TEST_LABEL, labels_for_tests


async def test_broker_takes_a_confirmed_publish_and_delivers_it(amqp_url: str, unique: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            f"harness-{unique}", durable=True, arguments={"x-queue-type": "quorum"}
        )
        confirmation = await channel.default_exchange.publish(
            aio_pika.Message(b"hello", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue.name,
        )
        assert confirmation is not None  # a broker ack, not a nack
        message = await queue.get(timeout=10, fail=True)
        assert message is not None
        assert message.body == b"hello"
        await message.ack()
        await queue.delete(if_unused=False, if_empty=False)


async def test_database_answers_a_query(database_url: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        assert await connection.fetchval("SELECT 40 + 2") == 42
        version = await connection.fetchval("SHOW server_version")
        assert str(version).startswith("15")
    finally:
        await connection.close()


def test_run_image_starts_and_its_exit_code_is_read_back(
    docker_client: docker.DockerClient, run_image: str
) -> None:
    container = docker_client.containers.run(
        run_image,
        ["sh", "-c", "echo started; exit 3"],
        labels=labels_for_tests(),
        detach=True,
    )
    try:
        result = container.wait(timeout=30)
        assert result["StatusCode"] == 3
        assert container.logs().decode().strip() == "started"
        assert container.labels[TEST_LABEL] == "1"
    finally:
        container.remove(force=True)


async def test_run_image_starts_concurrently(
    docker_client: docker.DockerClient, run_image: str
) -> None:
    """Several containers of the run image at once all run to their own exit codes."""

    def run(code: int) -> int:
        container = docker_client.containers.run(
            run_image, ["sh", "-c", f"exit {code}"], labels=labels_for_tests(), detach=True
        )
        try:
            return int(container.wait(timeout=30)["StatusCode"])
        finally:
            container.remove(force=True)

    codes = await asyncio.gather(*(asyncio.to_thread(run, code) for code in range(4)))
    assert codes == [0, 1, 2, 3]
