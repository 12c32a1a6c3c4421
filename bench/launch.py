"""Launch latency: submit → container started, against the raw Docker floor.

    python bench/launch.py [--runs N]

Floor: docker-py create + start of the run image, from before the create call to the
container's StartedAt. System: from before the submit (a script publishing SubmitRun) to the
same StartedAt, through RabbitMQ, the control plane, PostgreSQL, the outbox relay and the
agent. Both in this run, on this engine. Targets: overhead (system - floor) at most 5 ms at
p50 and 10 ms at p95.

Both are also split at the container's ``Created`` (the engine's time of the create): the
part before it is the dispatch path's and the create call's, with a spread of a few ms; the
part after it is mostly the engine's start, the same work for both, whose spread of tens of
ms between runs hides a few ms of the system's in the whole.

Path floor: what the dispatch path's guarantees cost at least, on the same broker and
database, with no code of the system in between: a confirmed persistent publish to a quorum
queue and its delivery (the submit reaching the control plane), a committed PostgreSQL
transaction (the run and its outbox row), and a second confirmed publish and delivery (the
LaunchRun reaching the agent). The overhead cannot fall below it without giving one of those
up. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime

import aio_pika
import asyncpg
import docker
from _harness import LABELS, Processes, percentile, progress, report, services

from dispatcher.client import Client, wait_for_outcome
from dispatcher.settings import ImageNames


def stamp(raw: str) -> float:
    """An RFC 3339 time with nanoseconds, as Docker writes them, in seconds since the epoch."""
    head, _, frac = raw.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float(f"0.{frac or '0'}")


def started_at(container: docker.models.containers.Container) -> float:
    container.reload()
    return stamp(container.attrs["State"]["StartedAt"])


def created_and_started(container: docker.models.containers.Container) -> tuple[float, float]:
    """When the engine made the container (``Created``) and when it started it."""
    container.reload()
    return stamp(container.attrs["Created"]), stamp(container.attrs["State"]["StartedAt"])


@dataclass
class Samples:
    """Latencies (s) from before the first call (the create, or the submit) to the engine's
    ``Created`` and to its ``StartedAt``, one per launch."""

    created: list[float] = field(default_factory=list)
    started: list[float] = field(default_factory=list)

    def add(self, before: float, container: docker.models.containers.Container) -> None:
        created, started = created_and_started(container)
        self.created.append(created - before)
        self.started.append(started - before)


def floor(client: docker.DockerClient, image: str, runs: int, into: Samples) -> None:
    for _ in range(runs):
        before = time.time()
        container = client.containers.create(image, ["true"], labels=LABELS)
        container.start()
        into.add(before, container)
        container.remove(force=True)


async def measure(
    amqp_url: str, image: str, runs: int, docker_client: docker.DockerClient
) -> tuple[Samples, Samples]:
    """(floor, system) samples, one of each in turn, so that both see the same load."""
    raw, through = Samples(), Samples()
    async with Client(amqp_url) as client:
        for _ in range(runs):
            await asyncio.to_thread(floor, docker_client, image, 1, raw)
            run_id = uuid.uuid4()
            follower = await client.follow({run_id})
            before = time.time()
            await client.submit(image, ["true"], run_id=run_id)
            outcome = await wait_for_outcome(follower, run_id, timeout=60)
            assert outcome.succeeded, outcome
            [container] = docker_client.containers.list(
                all=True, filters={"label": f"hybrid-dispatcher.run-id={run_id}"}
            )
            through.add(before, container)
            container.remove(force=True)
    return raw, through


async def path_floor(amqp_url: str, database_url: str, runs: int) -> list[float]:
    """``runs`` samples of: publish → delivered, commit, publish → delivered (seconds)."""
    name = f"bench-path-{uuid.uuid4().hex[:8]}"
    table = name.replace("-", "_")
    connection = await aio_pika.connect(amqp_url)
    database = await asyncpg.connect(database_url)
    samples: list[float] = []
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        delivered: asyncio.Queue[None] = asyncio.Queue()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            delivered.put_nowait(None)

        tag = await queue.consume(on_message)
        await database.execute(f"CREATE TABLE {table} (id uuid, body bytea)")
        insert = f"INSERT INTO {table} VALUES ($1, $2)"
        body = b"x" * 300  # about a SubmitRun's size

        async def hop() -> None:
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), name
            )
            await delivered.get()

        for _ in range(runs):
            before = time.perf_counter()
            await hop()
            async with database.transaction():
                await database.execute(insert, uuid.uuid4(), body)
            await hop()
            samples.append(time.perf_counter() - before)
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        with contextlib.suppress(Exception):
            await database.execute(f"DROP TABLE IF EXISTS {table}")
        await database.close()
        await connection.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    image = ImageNames.from_env().run_tiny
    docker_client = docker.from_env()
    with services() as (amqp_url, database_url), Processes(amqp_url, database_url) as procs:
        procs.start("dispatcher", ["serve"])
        agent = procs.start(
            "worker_agent", ["run", "--agent-id", "bench-launch", "--keep-finished"]
        )
        asyncio.run(agent.wait_for_output("consuming", timeout=60))
        progress(
            f"{args.runs} times in turn: docker-py create+start of {image} (the floor), "
            "and submit → container started through the whole system"
        )
        asyncio.run(measure(amqp_url, image, 3, docker_client))  # warm-up
        raw, through = asyncio.run(measure(amqp_url, image, args.runs, docker_client))
        progress(
            f"{args.runs * 4} samples of the path's floor (two quorum-queue hops and a commit)"
        )
        path = asyncio.run(path_floor(amqp_url, database_url, args.runs * 4))
    ms = 1000.0
    figures = {
        "benchmark": "launch",
        "runs": args.runs,
        "floor_p50_ms": round(percentile(raw.started, 50) * ms, 1),
        "floor_p95_ms": round(percentile(raw.started, 95) * ms, 1),
        "system_p50_ms": round(percentile(through.started, 50) * ms, 1),
        "system_p95_ms": round(percentile(through.started, 95) * ms, 1),
        # The same, split at the engine's Created: the part before it is the dispatch path's
        # and the create call's (a few ms of spread), the part after it the engine's start
        # (tens of ms of spread, the same work for both).
        "floor_to_created_p50_ms": round(percentile(raw.created, 50) * ms, 1),
        "system_to_created_p50_ms": round(percentile(through.created, 50) * ms, 1),
        "floor_created_to_started_p50_ms": round(
            percentile([s - c for c, s in zip(raw.created, raw.started, strict=True)], 50) * ms,
            1,
        ),
        "system_created_to_started_p50_ms": round(
            percentile([s - c for c, s in zip(through.created, through.started, strict=True)], 50)
            * ms,
            1,
        ),
    }
    figures["overhead_to_created_p50_ms"] = round(
        figures["system_to_created_p50_ms"] - figures["floor_to_created_p50_ms"], 1
    )
    figures["overhead_p50_ms"] = round(figures["system_p50_ms"] - figures["floor_p50_ms"], 1)
    figures["overhead_p95_ms"] = round(figures["system_p95_ms"] - figures["floor_p95_ms"], 1)
    figures["ratio_p50"] = round(figures["system_p50_ms"] / figures["floor_p50_ms"], 2)
    figures["path_floor_p50_ms"] = round(percentile(path, 50) * ms, 1)
    figures["path_floor_p95_ms"] = round(percentile(path, 95) * ms, 1)
    figures["target_met"] = figures["overhead_p50_ms"] <= 5 and figures["overhead_p95_ms"] <= 10
    progress(
        f"floor p50 {figures['floor_p50_ms']} ms, system p50 {figures['system_p50_ms']} ms "
        f"(+{figures['overhead_p50_ms']} ms; p95 +{figures['overhead_p95_ms']} ms); "
        f"the path's floor p50 {figures['path_floor_p50_ms']} ms"
    )
    progress(
        f"to the engine's Created: floor p50 {figures['floor_to_created_p50_ms']} ms, system "
        f"{figures['system_to_created_p50_ms']} ms (+{figures['overhead_to_created_p50_ms']} "
        f"ms); Created to StartedAt: floor {figures['floor_created_to_started_p50_ms']} ms, "
        f"system {figures['system_created_to_started_p50_ms']} ms"
    )
    report(figures)


if __name__ == "__main__":
    main()
