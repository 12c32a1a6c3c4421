"""Launch latency: submit → container started, against the raw Docker floor.

    python bench/launch.py [--runs N]

Floor: docker-py create + start of the run image, from before the create call to the
container's StartedAt. System: from before the submit (a script publishing SubmitRun) to the
same StartedAt, through RabbitMQ, the control plane, PostgreSQL, the outbox relay and the
agent. Both in this run, on this engine. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from datetime import datetime

import docker
from _harness import LABELS, Processes, percentile, progress, report, services

from dispatcher.client import Client, wait_for_outcome
from dispatcher.settings import ImageNames


def started_at(container: docker.models.containers.Container) -> float:
    container.reload()
    raw = container.attrs["State"]["StartedAt"]  # RFC 3339 with nanoseconds
    head, _, frac = raw.rstrip("Z").partition(".")
    stamp = datetime.fromisoformat(head + "+00:00").timestamp()
    return stamp + float(f"0.{frac or '0'}")


def floor(client: docker.DockerClient, image: str, runs: int) -> list[float]:
    latencies = []
    for _ in range(runs):
        before = time.time()
        container = client.containers.create(image, ["true"], labels=LABELS)
        container.start()
        latencies.append(started_at(container) - before)
        container.remove(force=True)
    return latencies


async def measure(
    amqp_url: str, image: str, runs: int, docker_client: docker.DockerClient
) -> tuple[list[float], list[float]]:
    """(floor, system) latencies, one of each in turn, so that both see the same load."""
    raw: list[float] = []
    through: list[float] = []
    async with Client(amqp_url) as client:
        for _ in range(runs):
            raw.extend(await asyncio.to_thread(floor, docker_client, image, 1))
            run_id = uuid.uuid4()
            follower = await client.follow({run_id})
            before = time.time()
            await client.submit(image, ["true"], run_id=run_id)
            outcome = await wait_for_outcome(follower, run_id, timeout=60)
            assert outcome.succeeded, outcome
            [container] = docker_client.containers.list(
                all=True, filters={"label": f"hybrid-dispatcher.run-id={run_id}"}
            )
            through.append(started_at(container) - before)
            container.remove(force=True)
    return raw, through


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
    ms = 1000.0
    figures = {
        "benchmark": "launch",
        "runs": args.runs,
        "floor_p50_ms": round(percentile(raw, 50) * ms, 1),
        "floor_p95_ms": round(percentile(raw, 95) * ms, 1),
        "system_p50_ms": round(percentile(through, 50) * ms, 1),
        "system_p95_ms": round(percentile(through, 95) * ms, 1),
    }
    figures["overhead_p50_ms"] = round(figures["system_p50_ms"] - figures["floor_p50_ms"], 1)
    figures["ratio_p50"] = round(figures["system_p50_ms"] / figures["floor_p50_ms"], 2)
    figures["target_p50_within_floor_plus_50ms"] = figures["overhead_p50_ms"] <= 50
    progress(
        f"floor p50 {figures['floor_p50_ms']} ms, system p50 {figures['system_p50_ms']} ms "
        f"(+{figures['overhead_p50_ms']} ms)"
    )
    report(figures)


if __name__ == "__main__":
    main()
