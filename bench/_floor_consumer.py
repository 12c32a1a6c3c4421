"""The CPU floor of watching heartbeats: consume, decode and ack, nothing else.

python bench/_floor_consumer.py AMQP_URL QUEUE
"""

from __future__ import annotations

import asyncio
import sys

import aio_pika
from _harness import ROOT  # noqa: F401 - puts the project on the path

from schemas import event_decoder


async def main(url: str, queue_name: str) -> None:
    decoder = event_decoder()
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=256)
        queue = await channel.get_queue(queue_name, ensure=False)
        async with queue.iterator() as messages:
            async for message in messages:
                decoder.decode(message.body)
                await message.ack()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
