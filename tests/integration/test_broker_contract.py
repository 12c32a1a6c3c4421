"""RabbitMQ, through aio-pika and ``Publisher``, passes the broker's contract."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.contracts.broker_contract import BrokerContract, BrokerHarness
from transport.connection import connect
from transport.publisher import Publisher
from transport.topology import declare_topology


class TestRabbitMQ(BrokerContract):
    @pytest.fixture
    async def harness(self, vhost_url: str) -> AsyncIterator[BrokerHarness]:
        connection = await connect(vhost_url, "broker contract")
        async with connection.channel() as channel:
            await declare_topology(channel)
        publisher = Publisher(connection, retry_deadline_s=10)
        try:
            yield BrokerHarness(connection, publisher)
        finally:
            await publisher.close()
            await connection.close()
