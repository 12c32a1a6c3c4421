"""Clients on the three nodes' URLs go on while the node they are connected to stops.

What the broker holds is the proof: every message the publisher had confirmed reaches the
consumer, whichever node each of them was connected to at the time.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from schemas.topology import REQUESTS_QUEUE, STATUS_STORE_QUEUE
from tests.integration.cluster.conftest import Cluster
from tests.integration.conftest import Stack
from tests.support import eventually
from transport.connection import FailoverConnection, connect
from transport.consumer import Consumer
from transport.delivery import Delivery
from transport.publisher import Publisher
from transport.topology import declare_consumed_queue

pytestmark = pytest.mark.timeout(600)

QUEUE = "hd.failover-test"


class Raw:
    """The payload as it is (the test's messages are counters, not the contract's)."""

    def decode(self, payload: bytes) -> bytes:
        return payload


async def test_quorum_queues_get_a_member_on_every_node(
    rabbitmq_cluster: Cluster, cluster_vhost: str
) -> None:
    connection = await connect(rabbitmq_cluster.url(cluster_vhost), "test-declare")
    try:
        async with connection.channel() as channel:
            await declare_consumed_queue(channel, QUEUE)
    finally:
        await connection.close()
    queue = rabbitmq_cluster.queue(cluster_vhost, QUEUE)
    assert queue["type"] == "quorum"
    assert sorted(queue["members"]) == sorted(rabbitmq_cluster.node_names)


async def test_a_consumer_and_a_confirmed_publisher_go_on_while_their_node_stops_and_starts(
    rabbitmq_cluster: Cluster, cluster_vhost: str
) -> None:
    url = rabbitmq_cluster.url(cluster_vhost)
    publishing = await connect(url, "test-publisher")
    consuming = await connect(url, "test-consumer")
    assert isinstance(publishing, FailoverConnection)
    assert isinstance(consuming, FailoverConnection)
    # Both on the first node of the list, which is the one stopped below.
    assert publishing.node == consuming.node == rabbitmq_cluster.where(0)

    publisher = Publisher(publishing)
    received: list[bytes] = []

    async def record(batch: list[Delivery[bytes]]) -> None:
        received.extend(d.message for d in batch)

    consumer = Consumer(consuming, QUEUE, Raw(), record, publisher, prefetch=50)
    await consumer.start()
    consuming_task = asyncio.create_task(consumer.run())

    confirmed: list[bytes] = []
    done = asyncio.Event()

    async def publish() -> None:
        for n in itertools.count():
            if done.is_set():
                return
            body = str(n).encode()
            await publisher.publish_raw("", QUEUE, body)  # returns once confirmed
            confirmed.append(body)
            await asyncio.sleep(0.005)

    publishing_task = asyncio.create_task(publish())

    async def consumed_past(count: int) -> bool:
        if publishing_task.done():
            publishing_task.result()  # raises BrokerUnavailable: a publish never confirmed
        return len(set(received)) >= count

    try:
        await eventually(lambda: consumed_past(200), 60, what="200 messages consumed")
        await asyncio.to_thread(rabbitmq_cluster.stop, 0)
        stopped_at = len(confirmed)
        # Still flowing with the node down: published and consumed through the others.
        await eventually(
            lambda: consumed_past(stopped_at + 200), 60, what="200 more with node 1 down"
        )
        moved_to = (publishing.node, consuming.node)
        await asyncio.to_thread(rabbitmq_cluster.start, 0)
        restarted_at = len(confirmed)
        await eventually(
            lambda: consumed_past(restarted_at + 200), 60, what="200 more with node 1 back"
        )
        done.set()
        await publishing_task
        await eventually(
            lambda: consumed_past(len(confirmed)), 60, what="every confirmed message consumed"
        )
    finally:
        done.set()
        await consumer.stop()
        await consuming_task
        await consumer.close()
        await publisher.close()
        await publishing.close()
        await consuming.close()

    # Nothing lost, nothing that was never published: redeliveries of what was unacked when
    # the node stopped (and publishes retried for a lost confirm) may come twice.
    assert set(received) == set(confirmed)
    assert rabbitmq_cluster.where(0) not in moved_to
    print(
        f"{len(confirmed)} confirmed, {len(received)} consumed "
        f"({len(received) - len(set(received))} twice); moved to {moved_to}"
    )


async def test_the_control_plane_on_the_list_sets_its_policies_and_its_queues_replicate(
    rabbitmq_cluster: Cluster, cluster_vhost: str, cluster_stack: Stack
) -> None:
    await cluster_stack.start_control_plane()
    policies = rabbitmq_cluster.management("GET", f"/api/policies/{cluster_vhost}")
    assert "hd-consumed-queues" in {p["name"] for p in policies}
    for queue in (REQUESTS_QUEUE, STATUS_STORE_QUEUE):
        found = rabbitmq_cluster.queue(cluster_vhost, queue)
        assert sorted(found["members"]) == sorted(rabbitmq_cluster.node_names)

        async def governed(name: str = queue) -> bool:
            # The management API's queue details are refreshed every few seconds.
            return rabbitmq_cluster.queue(cluster_vhost, name).get("policy") == "hd-consumed-queues"

        await eventually(governed, 30, interval=0.5, what=f"the policy on {queue}")
