"""The in-memory broker and publisher pass the broker's contract."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.contracts.broker_contract import BrokerContract, BrokerHarness
from tests.fakes.broker import FakeBroker
from tests.fakes.publisher import FakePublisher
from transport.topology import declare_topology


class TestFakeBroker(BrokerContract):
    @pytest.fixture
    async def harness(self) -> AsyncIterator[BrokerHarness]:
        broker = FakeBroker()
        async with broker.channel() as channel:
            await declare_topology(channel)  # type: ignore[arg-type]  # aio-pika's surface
        publisher = FakePublisher(broker)
        yield BrokerHarness(broker, publisher)
        await publisher.close()
        await broker.close()
