"""Simulated agents' heartbeats, published as agents publish them: confirmed and persistent.

python bench/_heartbeats.py AMQP_URL FIRST COUNT START_AT END_AT [INTERVAL]

Agents ``sim-FIRST`` ... ``sim-(FIRST+COUNT-1)`` each beat every INTERVAL seconds (default 2),
spread evenly over the interval, from START_AT to END_AT (seconds since the epoch). A
publisher behind its schedule publishes as fast as it can and skips no beat, so its rate is
what this machine allows. Prints one JSON object: how far behind its schedule it fell, and
the agents that went silent for longer than the monitor's loss threshold (three intervals
between two confirmed beats), each with the time its first such silence began: from then on
a monitor is right to declare it lost.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.parse

import aio_pika
from _harness import ROOT  # noqa: F401 - puts the project on the path

from schemas import AgentHeartbeat, encode
from schemas.topology import STATUS_EXCHANGE, heartbeat_routing_key

#: Publishes awaiting their confirm at once: enough to hide the broker's round trip (a quorum
#: queue confirms once its log is on disk), bounded so that a slow broker slows the publisher.
FLIGHT = 2000
#: The monitor's default loss threshold, in heartbeat intervals.
LOST_AFTER_BEATS = 3


async def main(
    url: str, first: int, count: int, start_at: float, end_at: float, interval: float
) -> dict[str, object]:
    # Readers refuse a status event without its publisher's (broker-checked) user_id.
    user = urllib.parse.unquote(urllib.parse.urlsplit(url).username or "") or None
    ids = [f"sim-{n:05d}" for n in range(first, first + count)]
    keys = [heartbeat_routing_key(agent_id) for agent_id in ids]
    gap = interval / count
    silent = LOST_AFTER_BEATS * interval
    #: When each agent's last beat was confirmed (None: not yet, and unknown to a monitor).
    confirmed: list[float | None] = [None] * count
    silent_since: dict[str, float] = {}
    behind = 0.0
    flight = asyncio.Semaphore(FLIGHT)
    pending: set[asyncio.Task[None]] = set()

    async def beat(exchange: aio_pika.abc.AbstractExchange, n: int, body: bytes) -> None:
        try:
            message = aio_pika.Message(
                body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, user_id=user
            )
            await exchange.publish(message, keys[n])
            now = time.time()
            last = confirmed[n]
            if last is not None and now - last > silent:
                silent_since.setdefault(ids[n], last)
            confirmed[n] = now
        finally:
            flight.release()

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(STATUS_EXCHANGE, ensure=False)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        sequence = 0
        while time.time() < end_at:
            for n, agent_id in enumerate(ids):
                due = start_at + (sequence * count + n) * gap
                if (wait := due - time.time()) > 0:
                    await asyncio.sleep(wait)
                else:
                    behind = max(behind, -wait)
                if time.time() >= end_at:
                    break
                body = encode(
                    AgentHeartbeat(agent_id=agent_id, sequence=sequence, interval_s=interval)
                )
                await flight.acquire()
                task = asyncio.create_task(beat(exchange, n, body))
                pending.add(task)
                task.add_done_callback(pending.discard)
            sequence += 1
        await asyncio.gather(*pending)
    for n, last in enumerate(confirmed):
        if last is not None and end_at - last > silent:
            silent_since.setdefault(ids[n], last)
    return {"behind_s": round(behind, 3), "silent_since": silent_since}


if __name__ == "__main__":
    url, first, count, start_at, end_at, *rest = sys.argv[1:]
    result = asyncio.run(
        main(
            url,
            int(first),
            int(count),
            float(start_at),
            float(end_at),
            float(rest[0]) if rest else 2.0,
        )
    )
    print(json.dumps(result), flush=True)
