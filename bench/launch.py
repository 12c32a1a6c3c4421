"""Launch latency: submit → container started, against the raw Docker floor.

    python bench/launch.py [--runs N]

Floor: docker-py create + start of the run image, confined as the agent confines every
container by default (capabilities dropped, no new privileges, a pids limit), from before the
create call to the container's StartedAt. System: from before the submit (a script
publishing SubmitRun) to the same StartedAt, through RabbitMQ, the control plane,
PostgreSQL, the outbox relay and the agent. Both in this run, on this engine. Targets:
overhead (system - floor) at most 5 ms at p50 and 10 ms at p95.

Both are also split at the container's ``Created`` (the engine's time of the create): the
part before it is the dispatch path's and the create call's, with a spread of a few ms; the
part after it is mostly the engine's start, the same work for both, whose spread of tens of
ms between runs hides a few ms of the system's in the whole.

Path floor: what the dispatch path's guarantees cost at least, on the same broker and
database, with no code of the system in between: a confirmed persistent publish to a quorum
queue and its delivery (the submit reaching the control plane), a committed PostgreSQL
transaction (the run and its outbox row), and a second confirmed publish and delivery (the
LaunchRun reaching the agent). The overhead cannot fall below it without giving one of those
up. It is sampled in turn with the launches, after as long with nothing to do as a submit of
the system's (``IDLE_S``), and also back to back, where the broker and the database are warm
and answer faster. The last line is one JSON object.
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
from worker_agent.policy import LaunchPolicy


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


#: How the agent confines every container by default (``worker-agent run``'s policy): the
#: floor makes the same container. (Here, that made no difference one could measure: 219.7
#: against 219.1 ms at p50, 60 of each in turn.)
CONFINED = LaunchPolicy().container_options()


def floor(client: docker.DockerClient, image: str, runs: int, into: Samples) -> None:
    for _ in range(runs):
        before = time.time()
        container = client.containers.create(image, ["true"], labels=LABELS, **CONFINED)
        container.start()
        into.add(before, container)
        container.remove(force=True)


#: How long the broker and the database have nothing to do before a sample of the path's
#: floor taken in turn with the launches: about as long as before a submit of the system's,
#: which comes after the floor's launch. Woken from idle, a quorum-queue hop takes about
#: twice as long as back to back (its confirm and delivery: 2.3-2.7 ms against 1.2 ms here).
IDLE_S = 0.2


async def measure(
    amqp_url: str,
    image: str,
    runs: int,
    docker_client: docker.DockerClient,
    path: PathFloor,
) -> tuple[Samples, Samples, list[float]]:
    """(floor, system, path floor) samples, one of each in turn, so that all see the same
    load; the path's after ``IDLE_S`` with nothing to do, as the system's submit."""
    raw, through, idle_path = Samples(), Samples(), []
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
            await asyncio.sleep(IDLE_S)
            idle_path.append(await path.sample())
    return raw, through, idle_path


async def measure_all(
    amqp_url: str, database_url: str, image: str, runs: int, docker_client: docker.DockerClient
) -> tuple[Samples, Samples, list[float], list[float]]:
    """A warm-up, then ``measure``; then the path's floor back to back (warm)."""
    async with PathFloor(amqp_url, database_url) as path:
        await measure(amqp_url, image, 3, docker_client, path)
        measured = await measure(amqp_url, image, runs, docker_client, path)
        progress(f"{runs * 4} samples of the path's floor back to back")
        warm_path = [await path.sample() for _ in range(runs * 4)]
    return (*measured, warm_path)


class PathFloor:
    """Samples of what the path's guarantees cost at least: publish → delivered, commit,
    publish → delivered, through a quorum queue of its own and a table of its own."""

    def __init__(self, amqp_url: str, database_url: str) -> None:
        self.amqp_url, self.database_url = amqp_url, database_url
        self.name = f"bench-path-{uuid.uuid4().hex[:8]}"
        self.table = self.name.replace("-", "_")
        self.delivered: asyncio.Queue[None] = asyncio.Queue()
        self.body = b"x" * 300  # about a SubmitRun's size

    async def __aenter__(self) -> PathFloor:
        self.connection = await aio_pika.connect(self.amqp_url)
        self.database = await asyncpg.connect(self.database_url)
        self.channel = await self.connection.channel(publisher_confirms=True)
        queue = await self.channel.declare_queue(
            self.name, durable=True, arguments={"x-queue-type": "quorum"}
        )

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            self.delivered.put_nowait(None)

        self.queue, self.tag = queue, await queue.consume(on_message)
        await self.database.execute(f"CREATE TABLE {self.table} (id uuid, body bytea)")
        return self

    async def __aexit__(self, *_: object) -> None:
        with contextlib.suppress(Exception):
            await self.queue.cancel(self.tag)
            await self.queue.delete(if_unused=False, if_empty=False)
        with contextlib.suppress(Exception):
            await self.database.execute(f"DROP TABLE IF EXISTS {self.table}")
        await self.database.close()
        await self.connection.close()

    async def _hop(self) -> None:
        message = aio_pika.Message(self.body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await self.channel.default_exchange.publish(message, self.name)
        await self.delivered.get()

    async def sample(self) -> float:
        """One sample (seconds)."""
        before = time.perf_counter()
        await self._hop()
        async with self.database.transaction():
            await self.database.execute(
                f"INSERT INTO {self.table} VALUES ($1, $2)", uuid.uuid4(), self.body
            )
        await self._hop()
        return time.perf_counter() - before


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
        raw, through, path, warm_path = asyncio.run(
            measure_all(amqp_url, database_url, image, args.runs, docker_client)
        )
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
    figures["path_floor_warm_p50_ms"] = round(percentile(warm_path, 50) * ms, 1)
    figures["target_met"] = figures["overhead_p50_ms"] <= 5 and figures["overhead_p95_ms"] <= 10
    progress(
        f"floor p50 {figures['floor_p50_ms']} ms, system p50 {figures['system_p50_ms']} ms "
        f"(+{figures['overhead_p50_ms']} ms; p95 +{figures['overhead_p95_ms']} ms); "
        f"the path's floor p50 {figures['path_floor_p50_ms']} ms "
        f"({figures['path_floor_warm_p50_ms']} ms back to back)"
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
