"""Dispatch throughput: submissions persisted and dispatched per second, against raw publishing.

    python bench/throughput.py [--runs N] [--rounds R]

Floor: aio-pika publishes with publisher confirms, persistent, to a quorum queue, from one
process (in flights of 500), taken before each round and once after the last.
System: N SubmitRun wait in the requests queue; the control plane (intake + outbox relay)
starts, and the clock runs from its first line of work until every run is in PostgreSQL and
every LaunchRun has been confirmed into the instructions queue. Twice: intake and relay in
one process (``serve``'s default), then each in a process of its own (``--components``), as
the compose stack runs them. R rounds (3 by default) of floor, one process, split, and the
floor once more at the end; each figure is pooled over its rounds (all runs over all their
time): one round is a second or two of a shared machine, whose floor alone has moved by half
between rounds. Target: at least half of the floor.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import aio_pika
import asyncpg
from _harness import Processes, progress, report, services

from schemas import SubmitRun, encode
from schemas.topology import (
    REQUESTS_EXCHANGE,
    REQUESTS_ROUTING_KEY,
    instructions_queue,
)
from transport.connection import connect
from transport.topology import declare_topology

FLIGHT = 500


async def publish_all(
    channel: aio_pika.abc.AbstractChannel, exchange: str, key: str, bodies: list[bytes]
) -> None:
    target = await channel.get_exchange(exchange, ensure=False)
    for start in range(0, len(bodies), FLIGHT):
        await asyncio.gather(
            *(
                target.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), key
                )
                for body in bodies[start : start + FLIGHT]
            )
        )


async def floor(url: str, n: int) -> float:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            f"bench-floor-{uuid.uuid4().hex[:8]}",
            arguments={"x-queue-type": "quorum"},
            durable=True,
        )
        bodies = [encode(SubmitRun(run_id=uuid.uuid4(), image="busybox")) for _ in range(n)]
        started = time.perf_counter()
        await publish_all(channel, "", queue.name, bodies)
        elapsed = time.perf_counter() - started
        await queue.delete(if_unused=False, if_empty=False)
    return n / elapsed


async def preload(url: str, n: int, agent_queue: str) -> None:
    connection = await connect(url, "bench-preload")
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(channel, (agent_queue,))
        bodies = [
            encode(
                SubmitRun(
                    run_id=uuid.uuid4(), image="busybox", queue=agent_queue, command=("true",)
                )
            )
            for _ in range(n)
        ]
        await publish_all(channel, REQUESTS_EXCHANGE, REQUESTS_ROUTING_KEY, bodies)


async def follow(url: str, agent_queue: str, n: int, started: float) -> float:
    """Seconds from ``started`` until ``n`` LaunchRun wait in the agent queue's instructions
    queue (counted by passive declares on one channel, every 50 ms)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        last = -1
        while True:
            queue = await channel.declare_queue(instructions_queue(agent_queue), passive=True)
            count = int(queue.declaration_result.message_count or 0)
            if count != last:
                progress(f"dispatched {count}/{n}")
                last = count
            if count >= n:
                return time.perf_counter() - started
            await asyncio.sleep(0.05)


async def persisted(database_url: str, schema: str) -> int:
    connection = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        return int(await connection.fetchval("SELECT count(*) FROM runs"))
    finally:
        await connection.close()


#: How the control plane's intake and relay are run: in one process (``serve``'s default), or
#: each in a process of its own (as the compose stack runs them).
LAYOUTS = {"one_process": [["intake,relay"]], "split": [["relay"], ["intake"]]}


def system(amqp_url: str, database_url: str, n: int, layout: str) -> tuple[float, int]:
    """Runs/s from N queued submissions to N LaunchRun confirmed, and the rows persisted."""
    agent_queue = f"bench-{uuid.uuid4().hex[:8]}"
    with Processes(amqp_url, database_url) as procs:
        procs.queues.append(instructions_queue(agent_queue))
        progress(f"{layout}: queueing {n} submissions for the control plane")
        asyncio.run(preload(amqp_url, n, agent_queue))
        # Migrations first, so that the clock measures the work, not the start-up.
        procs.start("dispatcher", ["db", "upgrade"]).process.wait(60)  # type: ignore[union-attr]
        started = [
            procs.start("dispatcher", ["serve", "--components", *components])
            for components in LAYOUTS[layout]
        ]
        for proc in started:
            asyncio.run(proc.wait_for_output("control plane running", timeout=60))
        elapsed = asyncio.run(follow(amqp_url, agent_queue, n, time.perf_counter()))
        rows = asyncio.run(persisted(database_url, procs.env["HD_DATABASE_SCHEMA"]))
    rate = n / elapsed
    progress(f"{layout}: {rate:.0f} runs/s persisted and dispatched")
    return rate, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of floor and both layouts, pooled"
    )
    args = parser.parse_args()
    n = args.runs
    floors: list[float] = []
    systems: dict[str, list[tuple[float, int]]] = {layout: [] for layout in LAYOUTS}
    with services() as (amqp_url, database_url):
        asyncio.run(floor(amqp_url, 500))  # warm-up
        for turn in range(1, args.rounds + 1):
            progress(f"round {turn}/{args.rounds}, floor: {n} confirmed persistent publishes")
            floors.append(asyncio.run(floor(amqp_url, n)))
            progress(f"floor: {floors[-1]:.0f} msg/s")
            for layout in LAYOUTS:
                systems[layout].append(system(amqp_url, database_url, n, layout))
        # The floor again, after: the machine's pace drifts.
        floors.append(asyncio.run(floor(amqp_url, n)))
        progress(f"floor after: {floors[-1]:.0f} msg/s")
    # Pooled: all messages over all their time, for the floor and for each layout.
    floor_rate = len(floors) * n / sum(n / rate for rate in floors)
    figures: dict[str, object] = {
        "benchmark": "throughput",
        "runs": n,
        "rounds": args.rounds,
        "floor_publish_confirmed_per_s": round(floor_rate),
        "floors_per_s": [round(rate) for rate in floors],
    }
    for layout, results in systems.items():
        rate = len(results) * n / sum(n / r for r, _ in results)
        figures[layout] = {
            "system_dispatched_per_s": round(rate),
            "ratio": round(rate / floor_rate, 2),
            "rounds_per_s": [round(r) for r, _ in results],
            "runs_persisted": [rows for _, rows in results],
            "target_ratio_0_5_met": rate / floor_rate >= 0.5,
        }
        progress(
            f"{layout}: {rate:.0f} runs/s pooled over {len(results)} round(s), ratio "
            f"{rate / floor_rate:.2f} to the floor's {floor_rate:.0f} msg/s"
        )
    report(figures)


if __name__ == "__main__":
    main()
