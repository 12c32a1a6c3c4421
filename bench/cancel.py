"""Cancel latency: cancel → container stopped, against Docker's own stop.

    python bench/cancel.py [--runs N]

Floor: ``docker stop`` (docker-py, 10 s grace) of a running container of the run image whose
command exits on SIGTERM, from before the call to the container's FinishedAt. System: from
before ``Client.cancel`` (10 s grace) of a STARTED run of the same command to its container's
FinishedAt, through RabbitMQ, the control plane, PostgreSQL, the outbox relay and the agent.
Both in this run, on this engine, one of each in turn. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time
import uuid
from datetime import datetime

import docker
from _harness import LABELS, Processes, percentile, progress, report, services

from dispatcher.client import Client, wait_for_outcome
from dispatcher.settings import ImageNames
from schemas import RunStarted

#: Exits at SIGTERM (within its 0.1 s sleep), as a well-behaved job does.
COMMAND = ["sh", "-c", "trap 'exit 143' TERM; while true; do sleep 0.1; done"]
GRACE_S = 10.0


def finished_at(container: docker.models.containers.Container) -> float:
    container.reload()
    raw = container.attrs["State"]["FinishedAt"]  # RFC 3339 with nanoseconds
    head, _, frac = raw.rstrip("Z").partition(".")
    stamp = datetime.fromisoformat(head + "+00:00").timestamp()
    return stamp + float(f"0.{frac or '0'}")


def floor_once(client: docker.DockerClient, image: str) -> float:
    container = client.containers.create(image, COMMAND, labels=LABELS)
    container.start()
    time.sleep(0.3)  # the shell is up and its trap set, as the system's run is once STARTED
    before = time.time()
    container.stop(timeout=int(GRACE_S))
    took = finished_at(container) - before
    container.remove(force=True)
    return took


async def measure(
    amqp_url: str, image: str, runs: int, docker_client: docker.DockerClient
) -> tuple[list[float], list[float]]:
    """(floor, system) latencies, one of each in turn, so that both see the same load."""
    raw: list[float] = []
    through: list[float] = []
    async with Client(amqp_url) as client:
        for _ in range(runs):
            raw.append(await asyncio.to_thread(floor_once, docker_client, image))
            run_id = uuid.uuid4()
            follower = await client.follow({run_id})
            started = asyncio.Event()
            seen = functools.partial(_set_when_started, started)
            ending = asyncio.create_task(wait_for_outcome(follower, run_id, 60, seen))
            await client.submit(image, COMMAND, run_id=run_id)
            await asyncio.wait_for(started.wait(), 60)
            await asyncio.sleep(0.3)  # as the floor: the trap is set
            before = time.time()
            await client.cancel(run_id, grace_s=GRACE_S)
            outcome = await ending
            assert outcome.canceled, outcome
            [container] = docker_client.containers.list(
                all=True, filters={"label": f"hybrid-dispatcher.run-id={run_id}"}
            )
            through.append(finished_at(container) - before)
            container.remove(force=True)
    return raw, through


def _set_when_started(started: asyncio.Event, event: object) -> None:
    if isinstance(event, RunStarted):
        started.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    image = ImageNames.from_env().run_tiny
    docker_client = docker.from_env()
    with services() as (amqp_url, database_url), Processes(amqp_url, database_url) as procs:
        procs.start("dispatcher", ["serve"])
        agent = procs.start(
            "worker_agent", ["run", "--agent-id", "bench-cancel", "--keep-finished"]
        )
        asyncio.run(agent.wait_for_output("consuming", timeout=60))
        progress(
            f"{args.runs} times in turn: docker stop of a running {image} container (the "
            "floor), and cancel → container stopped through the whole system"
        )
        asyncio.run(measure(amqp_url, image, 2, docker_client))  # warm-up
        raw, through = asyncio.run(measure(amqp_url, image, args.runs, docker_client))
    ms = 1000.0
    figures = {
        "benchmark": "cancel",
        "runs": args.runs,
        "floor_p50_ms": round(percentile(raw, 50) * ms, 1),
        "floor_p95_ms": round(percentile(raw, 95) * ms, 1),
        "system_p50_ms": round(percentile(through, 50) * ms, 1),
        "system_p95_ms": round(percentile(through, 95) * ms, 1),
    }
    figures["overhead_p50_ms"] = round(figures["system_p50_ms"] - figures["floor_p50_ms"], 1)
    figures["overhead_p95_ms"] = round(figures["system_p95_ms"] - figures["floor_p95_ms"], 1)
    progress(
        f"floor p50 {figures['floor_p50_ms']} ms, system p50 {figures['system_p50_ms']} ms "
        f"(+{figures['overhead_p50_ms']} ms)"
    )
    report(figures)


if __name__ == "__main__":
    main()
