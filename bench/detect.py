"""Failure detection: how soon a dead agent is acted on, and what watching 1,000 agents costs.

    python bench/detect.py [--kills 20] [--agents 1000] [--seconds 20]

1. Detection latency, default settings (heartbeat every 2 s, lost after 3 missed beats):
   real agents are SIGKILLed at random points of their heartbeat cycle; latency is from the
   kill to the monitor's ``lost_at`` in PostgreSQL. Floor: the silence threshold itself (6 s),
   which no detector that waits for missed heartbeats can beat.
2. Monitor CPU: 1,000 simulated agents heartbeat every 2 s for a while; the active monitor's
   CPU time over that window, as a share of one core. Floor: a bare consumer of the same
   stream (decode and ack only), measured at the same time.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid

import aio_pika
import asyncpg
from _harness import ROOT, Processes, cpu_seconds, percentile, progress, report, services

from schemas import AgentHeartbeat, encode
from schemas.topology import AGENT_EVENTS, STATUS_EXCHANGE, heartbeat_routing_key
from transport.connection import connect

HEARTBEAT_S = 2.0
LOST_AFTER_BEATS = 3


async def lost_at(database_url: str, schema: str, agent_id: str) -> float | None:
    connection = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        value = await connection.fetchval(
            "SELECT lost_at FROM agents WHERE agent_id = $1 AND status = 'LOST'", agent_id
        )
    finally:
        await connection.close()
    return value.timestamp() if value else None


async def detection(procs: Processes, database_url: str, kills: int, batch: int) -> list[float]:
    latencies: list[float] = []
    schema = procs.env["HD_DATABASE_SCHEMA"]
    while len(latencies) < kills:
        n = min(batch, kills - len(latencies))
        ids = [f"bench-detect-{uuid.uuid4().hex[:6]}" for _ in range(n)]
        agents = [
            procs.start("worker_agent", ["run", "--agent-id", i, "--metrics-port", "0"])
            for i in ids
        ]
        for agent in agents:
            await agent.wait_for_output("consuming", timeout=120)
        # Let each beat a few times, then kill each at a random point of its cycle.
        await asyncio.sleep(2 * HEARTBEAT_S)
        killed: dict[str, float] = {}
        for agent_id, agent in zip(ids, agents, strict=True):
            await asyncio.sleep(random.uniform(0, HEARTBEAT_S / n))
            agent.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            killed[agent_id] = time.time()
        for agent in agents:
            agent.process.wait(30)  # type: ignore[union-attr]
        for agent_id, at in killed.items():
            deadline = time.time() + 60
            while (seen := await lost_at(database_url, schema, agent_id)) is None:
                if time.time() > deadline:
                    raise SystemExit(f"agent {agent_id} was never declared lost")
                await asyncio.sleep(0.1)
            latencies.append(seen - at)
        progress(f"detection: {len(latencies)}/{kills} kills measured")
    return latencies


async def heartbeat_load(url: str, agents: int, seconds: float) -> int:
    """Publish one heartbeat per simulated agent every 2 s, spread evenly; returns how many."""
    connection = await connect(url, "bench-heartbeats")
    sent = 0
    async with connection:
        channel = await connection.channel(publisher_confirms=False)
        exchange = await channel.get_exchange(STATUS_EXCHANGE, ensure=False)
        ids = [f"sim-{i:04d}" for i in range(agents)]
        # Readers refuse a status event without its publisher's (broker-checked) user_id.
        user = urllib.parse.unquote(urllib.parse.urlsplit(url).username or "") or None
        gap = HEARTBEAT_S / agents
        started = time.monotonic()
        sequence = 0
        while time.monotonic() - started < seconds:
            for agent_id in ids:
                beat = AgentHeartbeat(agent_id=agent_id, sequence=sequence, interval_s=HEARTBEAT_S)
                await exchange.publish(
                    aio_pika.Message(encode(beat), user_id=user),
                    heartbeat_routing_key(beat.agent_id),
                )
                sent += 1
                target = started + sent * gap
                if (delay := target - time.monotonic()) > 0:
                    await asyncio.sleep(delay)
            sequence += 1
    return sent


async def floor_queue(url: str) -> str:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"bench-floor-{uuid.uuid4().hex[:6]}", exclusive=False)
        await queue.bind(STATUS_EXCHANGE, routing_key=AGENT_EVENTS)
        return queue.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--batch", type=int, default=5, help="agents killed per round")
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with services() as (amqp_url, database_url), Processes(amqp_url, database_url) as procs:
        procs.start("dispatcher", ["serve", "--metrics-port", "0"])
        monitor = procs.start("dispatcher", ["monitor", "--metrics-port", "0"])
        asyncio.run(monitor.wait_for_output("this monitor is active", timeout=60))
        progress(f"detection: {args.kills} agent kills, {args.batch} per round, default settings")
        latencies = asyncio.run(detection(procs, database_url, args.kills, args.batch))

        # The CPU part needs the monitor alone on the heartbeats: stop the control plane.
        procs.started[0].stop()
        queue = asyncio.run(floor_queue(amqp_url))
        floor_proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "_floor_consumer.py"), amqp_url, queue]
        )
        time.sleep(2)
        monitor_pid = monitor.process.pid  # type: ignore[union-attr]
        progress(f"CPU: {args.agents} simulated agents beating every 2 s for {args.seconds:.0f} s")
        cpu_before = (cpu_seconds(monitor_pid), cpu_seconds(floor_proc.pid))
        wall_before = time.monotonic()
        sent = asyncio.run(heartbeat_load(amqp_url, args.agents, args.seconds))
        wall = time.monotonic() - wall_before
        cpu_after = (cpu_seconds(monitor_pid), cpu_seconds(floor_proc.pid))
        floor_proc.terminate()
        floor_proc.wait(10)
    monitor_share = (cpu_after[0] - cpu_before[0]) / wall
    floor_share = (cpu_after[1] - cpu_before[1]) / wall
    threshold = HEARTBEAT_S * LOST_AFTER_BEATS
    figures = {
        "benchmark": "detect",
        "kills": len(latencies),
        "floor_silence_threshold_s": threshold,
        "detection_p50_s": round(percentile(latencies, 50), 2),
        "detection_p99_s": round(percentile(latencies, 99), 2),
        "detection_max_s": round(max(latencies), 2),
        "target_p99_at_most_8s": percentile(latencies, 99) <= 8.0,
        "simulated_agents": args.agents,
        "heartbeats_per_s": round(sent / wall),
        "monitor_cpu_share_of_one_core": round(monitor_share, 3),
        "floor_consumer_cpu_share": round(floor_share, 3),
        "cpu_ratio_to_floor": round(monitor_share / floor_share, 2) if floor_share else None,
        "target_cpu_at_most_25_percent": monitor_share <= 0.25,
    }
    progress(
        f"detection p50 {figures['detection_p50_s']} s, p99 {figures['detection_p99_s']} s; "
        f"monitor CPU {monitor_share:.1%} of a core (floor {floor_share:.1%})"
    )
    report(figures)


if __name__ == "__main__":
    main()
