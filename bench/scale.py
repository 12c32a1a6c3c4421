"""Scale: launches per second across agent hosts, and the monitor's cost at 5,000 agents.

    python bench/scale.py [--hosts 2,4] [--runs 120] [--slots 4]
                          [--agents 5000] [--interval 2] [--seconds 30] [--publishers 2]

``--hosts ''`` runs the monitor part alone, ``--agents 0`` the launch part alone.

1. Launch rate, for each host count H: H agent hosts (Docker in Docker, ``compose/hosts.py``)
   start with the run image loaded. Floor: on all H engines at once, SLOTS threads an engine
   create, start, wait for and remove containers of ``true`` (docker-py), RUNS in all, half
   before the system's runs and half after; rate = RUNS / their wall time. System: one
   control plane, one agent a host (SLOTS slots, its engine by DOCKER_HOST); RUNS runs of
   ``true`` submitted at once with the Python client; rate = RUNS / (first submit → last
   RunEnded), and the time to the last container's start (Docker's events on the hosts'
   engines). The hosts' engines use vfs, slower than the outer engine: the floor is taken on
   those same engines.
2. Monitor CPU: AGENTS simulated agents heartbeat every INTERVAL (confirmed, persistent, as
   agents publish, from PUBLISHERS processes, ``bench/_heartbeats.py``); once the monitor
   knows them all, its CPU time over SECONDS, as a share of one core and per heartbeat it
   consumed. The rate offered is what the broker took in over the window (a queue nobody
   reads counts it), next to the publishers' own count of confirmed beats. Floor: a bare
   consumer of the same stream (decode and ack) on the control plane's status queue. Whether
   a consumer fell behind is what its queue grew by over the window. No agent may be
   declared lost while it beats: only those whose beats the publishers could not send within
   the loss threshold (three intervals) may be.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aio_pika
import asyncpg
import docker
from _harness import (
    LABELS,
    ROOT,
    Processes,
    cpu_seconds,
    on_fatal,
    progress,
    report,
    services,
    submit_all,
)

from compose import hosts
from dispatcher.settings import ImageNames
from schemas.topology import (
    AGENT_EVENTS,
    STATUS_EXCHANGE,
    STATUS_MONITOR_QUEUE,
    STATUS_STORE_QUEUE,
    control_queue,
    instructions_queue,
)
from tests.support import Proc
from transport.topology import declare_topology

#: The agent's label on its containers (worker_agent.containers.LABEL_RUN).
RUN_LABEL = "hybrid-dispatcher.run-id"
#: The monitor's default loss threshold, in heartbeat intervals.
LOST_AFTER_BEATS = 3
#: At most this long for the monitor to meet every agent before the window opens anyway
#: (meeting an agent costs more than hearing from it again).
WARM_UP_S = 20.0
#: The monitor's CPU with no agent is measured this long before the first beat.
IDLE_S = 5.0


def load_average() -> float:
    return round(os.getloadavg()[0], 1)


# ------------------------------------------------------------------------ launch rate


def floor(engines: list[hosts.Host], image: str, runs: int, slots: int) -> float:
    """Seconds for ``runs`` container lifecycles, ``slots`` threads an engine, all at once."""
    todo: list[queue.SimpleQueue[int]] = []
    for n in range(len(engines)):
        share: queue.SimpleQueue[int] = queue.SimpleQueue()
        for item in range(runs // len(engines) + (n < runs % len(engines))):
            share.put(item)
        todo.append(share)

    def worker(host: hosts.Host, share: queue.SimpleQueue[int]) -> None:
        api = docker.APIClient(base_url=host.docker_url, timeout=120)
        try:
            while True:
                try:
                    share.get_nowait()
                except queue.Empty:
                    return
                container = api.create_container(image, ["true"], labels=LABELS)
                api.start(container["Id"])
                api.wait(container["Id"])
                api.remove_container(container["Id"], v=True)
        finally:
            api.close()

    with ThreadPoolExecutor(max_workers=len(engines) * slots) as pool:
        began = time.perf_counter()
        jobs = [
            pool.submit(worker, host, share)
            for host, share in zip(engines, todo, strict=True)
            for _ in range(slots)
        ]
        for job in jobs:
            job.result()
        return time.perf_counter() - began


class Starts:
    """The start times (s since the epoch) of the agents' containers on some engines, from
    Docker's event streams, followed live: the engines' backlog is too short for a burst."""

    def __init__(self, engines: list[hosts.Host]) -> None:
        self.times: list[float] = []
        self._streams = []
        since = int(time.time()) - 1
        for host in engines:
            api = host.client.api
            stream = api.events(
                since=since,
                decode=True,
                filters={"type": "container", "event": ["start"], "label": RUN_LABEL},
            )
            self._streams.append(stream)
            threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        with contextlib.suppress(Exception):  # closing the stream ends the loop with an error
            for event in stream:
                self.times.append(event["timeNano"] / 1e9)

    def close(self) -> None:
        for stream in self._streams:
            with contextlib.suppress(Exception):
                stream.close()


def launch_rate(
    procs: Processes, outer: docker.DockerClient, amqp_url: str, count: int, args: Any
) -> dict[str, Any]:
    """Floor and system on ``count`` fresh hosts; the floor's runs are split into halves
    before and after the system's, so that both see the same drift of a shared machine."""
    image = ImageNames.from_env().run_tiny
    prefix = f"hd-bench-scale-{os.getpid()}"
    on_fatal(lambda: hosts.down(outer, prefix))
    progress(f"{count} hosts: starting, loading {image}")
    engines = hosts.up(outer, count, prefix, labels=LABELS, images=[image], owner=os.getpid())
    try:
        floor(engines, image, 2 * count, args.slots)  # warm-up: the first create is slower
        progress(f"{count} hosts: floor, {args.runs // 2} lifecycles, {args.slots} an engine")
        took = floor(engines, image, args.runs // 2, args.slots)
        progress(f"{count} hosts: system, {args.runs} runs of `true` submitted at once")
        figures = system(procs, engines, amqp_url, image, args)
        progress(f"{count} hosts: floor, {args.runs - args.runs // 2} more lifecycles")
        took += floor(engines, image, args.runs - args.runs // 2, args.slots)
    finally:
        for host in engines:
            host.close()
        hosts.down(outer, prefix)
    floor_rate = args.runs / took
    figures = {
        "floor_lifecycles_per_s": round(floor_rate, 2),
        **figures,
        "ratio": round(figures["system_runs_per_s"] / floor_rate, 2),
    }
    progress(
        f"{count} hosts: floor {floor_rate:.2f}/s, system {figures['system_runs_per_s']}/s "
        f"(ratio {figures['ratio']}), {figures['runs_succeeded']}/{args.runs} SUCCESS"
    )
    return figures


def system(
    procs: Processes, engines: list[hosts.Host], amqp_url: str, image: str, args: Any
) -> dict[str, Any]:
    """One agent a host, every run submitted at once; the agents are stopped after."""
    agent_queue = f"bench-scale-{uuid.uuid4().hex[:8]}"
    procs.queues.append(instructions_queue(agent_queue))
    procs.queues += [control_queue(f"{host.name}-agent") for host in engines]
    agents = []
    try:
        for host in engines:
            agent_args = ["run", "--queue", agent_queue, "--agent-id", f"{host.name}-agent"]
            agent_args += ["--max-concurrent", str(args.slots)]
            agents.append(
                procs.start("worker_agent", agent_args, env={"DOCKER_HOST": host.docker_url})
            )
        for agent in agents:
            asyncio.run(agent.wait_for_output("consuming", timeout=120))
        asyncio.run(submit_all(amqp_url, image, agent_queue, 2 * len(engines), 120))  # warm-up
        load = load_average()
        starts = Starts(engines)
        try:
            began, last, ended = asyncio.run(
                submit_all(amqp_url, image, agent_queue, args.runs, 600)
            )
            time.sleep(0.5)  # the last start event is read by now: its run has ended
        finally:
            starts.close()
    finally:
        for agent in agents:
            agent.stop()
    leftovers = sum(
        len(host.client.containers.list(all=True, filters={"label": RUN_LABEL})) for host in engines
    )
    # The stream starts a second early (its ``since`` is in whole seconds): the warm-up's
    # starts are left out.
    started = [at - began for at in starts.times if at >= began]
    return {
        "system_runs_per_s": round(args.runs / (last - began), 2),
        "system_all_ended_s": round(last - began, 2),
        "system_last_container_started_s": round(max(started), 2) if started else None,
        "containers_started_seen": len(started),
        "runs_succeeded": sum(1 for state in ended.values() if state == "SUCCESS"),
        "containers_left": leftovers,
        "load_average": load,
    }


# ------------------------------------------------------------------------ monitor CPU


async def seed_agents(database_url: str, schema: str, ids: list[str]) -> None:
    """The agents' rows, as the control plane's status consumer writes them from their first
    heartbeats (it does not run here): a monitor's verdict is an UPDATE of its agent's row."""
    connection = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        await connection.execute(
            "INSERT INTO agents (agent_id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING", ids
        )
    finally:
        await connection.close()


async def lost_agents(database_url: str, schema: str) -> set[str]:
    connection = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        rows = await connection.fetch(
            "SELECT agent_id FROM agents WHERE agent_id LIKE 'sim-%' AND status = 'LOST'"
        )
    finally:
        await connection.close()
    return {row["agent_id"] for row in rows}


async def counting_queue(amqp_url: str, name: str, delete: bool = False) -> None:
    """Declare (or delete) a queue that every heartbeat is routed to and nobody consumes."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        if delete:
            await channel.queue_delete(name)
            return
        # The monitor may be declaring them at this very moment: declaring is idempotent.
        await declare_topology(channel)
        declared = await channel.declare_queue(name, durable=False)
        await declared.bind(STATUS_EXCHANGE, routing_key=AGENT_EVENTS)


async def backlog(amqp_url: str, queue_name: str) -> int:
    """Messages waiting in a queue: what its consumer has not kept up with."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue_name, passive=True)
        return int(declared.declaration_result.message_count or 0)


def monitor_cpu(procs: Processes, amqp_url: str, database_url: str, args: Any) -> dict[str, Any]:
    metrics_port = free_port()
    monitor = procs.start("dispatcher", ["monitor", "--metrics-port", str(metrics_port)])
    asyncio.run(monitor.wait_for_output("this monitor is active", timeout=60))
    schema = procs.env["HD_DATABASE_SCHEMA"]
    asyncio.run(seed_agents(database_url, schema, [f"sim-{n:05d}" for n in range(args.agents)]))
    try:
        seen = beat_for_a_while(monitor, metrics_port, amqp_url, database_url, schema, args)
    finally:
        monitor.stop()
    wall = seen["window"][1] - seen["window"][0]
    # Every beat the broker took went to the counting queue and to both consumers' queues;
    # what a consumer did not get through is still waiting in its queue.
    published, *grown = seen["growth"]
    handled = [published - waiting for waiting in grown]
    cost = [cpu / n * 1e6 if n > 0 else None for cpu, n in zip(seen["cpu"], handled, strict=True)]
    # Its sweeps cost the monitor the same whatever the rate: the rest is the heartbeats'.
    busy = seen["cpu"][0] - seen["idle"] * wall
    cost_above_idle = busy / handled[0] * 1e6 if handled[0] > 0 else None
    # An agent whose beats the publishers sent more than a loss threshold apart is rightly
    # lost from then on (a second of slack: the monitor times a beat by its delivery, the
    # publisher by its confirm); any other lost agent is the monitor's mistake.
    excused = {
        agent
        for r in seen["publishers"]
        for agent, since in r["silent_since"].items()
        if since + LOST_AFTER_BEATS * args.interval <= seen["checked_at"] + 1.0
    }
    lost = seen["lost"]
    # Projected to the rate asked only from a steady state: with agents lost and back, the
    # monitor spends its time on those decisions (a transaction each), not on heartbeats.
    steady = cost_above_idle is not None and not lost and seen["known"] == args.agents
    monitor_share, floor_share = (cpu / wall for cpu in seen["cpu"])
    asked = args.agents / args.interval
    publishers = seen["publishers"]
    beating = seen["beating_s"]
    offered = sum(r["confirmed"] for r in publishers) / beating
    progress(
        f"monitor: {monitor_share:.1%} of a core (floor {floor_share:.1%}) at "
        f"{published / wall:.0f} heartbeats/s of {asked:.0f} asked (publishers: {offered:.0f}/s "
        f"confirmed over {beating:.0f} s); its queue grew by {grown[0]} over the window "
        f"(floor's: {grown[1]}); {len(lost)} agent(s) lost, {len(excused)} silent past the "
        f"threshold, {len(lost - excused)} lost while beating"
    )
    return {
        "simulated_agents": args.agents,
        "heartbeat_interval_s": args.interval,
        "heartbeats_per_s_asked": round(asked),
        "heartbeats_per_s_achieved": round(published / wall),
        "heartbeats_per_s_confirmed_to_publishers": round(offered),
        "heartbeats_refused_by_broker": sum(r["refused"] for r in publishers),
        "heartbeat_publishers": len(publishers),
        "publishers_cpu_us_per_heartbeat": round(
            sum(r["cpu_s"] for r in publishers)
            / max(1, sum(r["published"] for r in publishers))
            * 1e6
        ),
        "publishers_behind_schedule_max_s": max(r["behind_s"] for r in publishers),
        "agents_known_to_monitor_at_window": seen["known"],
        "monitor_cpu_share_of_one_core": round(monitor_share, 3),
        "floor_consumer_cpu_share": round(floor_share, 3),
        "cpu_ratio_to_floor": round(monitor_share / floor_share, 2) if floor_share else None,
        "monitor_heartbeats_handled_per_s": round(handled[0] / wall),
        "monitor_cpu_us_per_heartbeat": round(cost[0]) if cost[0] else None,
        "floor_cpu_us_per_heartbeat": round(cost[1]) if cost[1] else None,
        "monitor_idle_cpu_share": round(seen["idle"], 3),
        "monitor_cpu_us_per_heartbeat_above_idle": (
            round(cost_above_idle) if cost_above_idle else None
        ),
        "monitor_cpu_share_projected_at_asked_rate": (
            round(seen["idle"] + cost_above_idle * 1e-6 * asked, 3)
            if steady and cost_above_idle
            else None
        ),
        "monitor_queue_backlog_at_end": seen["backlog_at_end"],
        "monitor_queue_growth_over_window": grown[0],
        "floor_queue_growth_over_window": grown[1],
        "agents_lost": len(lost),
        "agents_silent_past_threshold": len(excused),
        "agents_lost_while_beating": len(lost - excused),
        "load_average": seen["load_average"],
    }


def beat_for_a_while(
    monitor: Proc, metrics_port: int, amqp_url: str, database_url: str, schema: str, args: Any
) -> dict[str, Any]:
    """Run the publishers and the floor consumer; once the monitor knows every agent (or
    after WARM_UP_S), measure both consumers over the window, then look for lost agents."""
    helpers: list[subprocess.Popen[bytes]] = []

    def end_helpers() -> None:
        for helper in helpers:
            helper.kill()
            helper.wait(10)

    on_fatal(end_helpers)
    bench = ROOT / "bench"
    # Counts the beats the broker took in: a queue that nobody reads.
    counting = f"bench-scale-count-{uuid.uuid4().hex[:8]}"
    queues = (counting, STATUS_MONITOR_QUEUE, STATUS_STORE_QUEUE)
    asyncio.run(counting_queue(amqp_url, counting))
    try:
        helpers.append(
            subprocess.Popen(
                [sys.executable, bench / "_floor_consumer.py", amqp_url, STATUS_STORE_QUEUE]
            )
        )
        # Before the first beat: what the monitor costs with nothing to watch.
        pids = (monitor.process.pid, helpers[0].pid)  # type: ignore[union-attr]
        idle_from, idle_cpu = time.time(), cpu_seconds(pids[0])
        start_at = idle_from + IDLE_S
        # The publishers beat on for a moment after the window, while lost agents are counted.
        end_at = start_at + WARM_UP_S + args.seconds + 10.0
        share = -(-args.agents // args.publishers)
        for first in range(0, args.agents, share):
            count = min(share, args.agents - first)
            command = [sys.executable, str(bench / "_heartbeats.py"), amqp_url, str(first)]
            helpers.append(
                subprocess.Popen(
                    [*command, str(count), str(start_at), str(end_at), str(args.interval)],
                    stdout=subprocess.PIPE,
                )
            )
        progress(
            f"monitor: {args.agents} simulated agents beating every {args.interval:g} s from "
            f"{args.publishers} publishers; the window opens once the monitor knows them all"
        )
        time.sleep(max(0.0, start_at - time.time()))
        idle = (cpu_seconds(pids[0]) - idle_cpu) / (time.time() - idle_from)
        known = 0
        while time.time() < start_at + WARM_UP_S and known < args.agents:
            time.sleep(0.5)
            known = agents_known(metrics_port)
        progress(f"monitor: knows {known} agents; measuring for {args.seconds:g} s")
        window_from = time.time()
        cpu_before = [cpu_seconds(pid) for pid in pids]
        backlog_before = [asyncio.run(backlog(amqp_url, name)) for name in queues]
        load = load_average()
        time.sleep(args.seconds)
        window = (window_from, time.time())
        cpu = [cpu_seconds(pid) - used for pid, used in zip(pids, cpu_before, strict=True)]
        backlog_after = [asyncio.run(backlog(amqp_url, name)) for name in queues]
        # At once, while the agents still beat: none may be lost but those the publishers
        # left silent.
        checked_at = time.time()
        lost = asyncio.run(lost_agents(database_url, schema))
        lost |= set(re.findall(r"agent (sim-\d+) lost \(", monitor.output()))
        publishers = [json.loads(helper.communicate(timeout=120)[0]) for helper in helpers[1:]]
    finally:
        end_helpers()
        asyncio.run(counting_queue(amqp_url, counting, delete=True))
    return {
        "window": window,
        "checked_at": checked_at,
        "known": known,
        "idle": idle,
        "cpu": cpu,
        "growth": [a - b for a, b in zip(backlog_after, backlog_before, strict=True)],
        "backlog_at_end": backlog_after[1],
        "lost": lost,
        "publishers": publishers,
        "beating_s": end_at - start_at,
        "load_average": load,
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def agents_known(metrics_port: int) -> int:
    """Agents the monitor has heard of (alive or lost), from its metrics."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return 0
    found = re.findall(r"^hd_agents_(?:alive|lost) ([0-9.e+]+)$", text, re.MULTILINE)
    return int(sum(float(value) for value in found))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", default="2,4", help="host counts, comma-separated ('' skips)")
    parser.add_argument("--runs", type=int, default=120, help="runs (and floor lifecycles)")
    parser.add_argument("--slots", type=int, default=4, help="agent slots, floor threads")
    parser.add_argument("--agents", type=int, default=5000, help="simulated agents (0 skips)")
    parser.add_argument("--interval", type=float, default=2.0, help="heartbeat interval (s)")
    parser.add_argument("--seconds", type=float, default=30.0, help="monitor CPU window")
    parser.add_argument("--publishers", type=int, default=2, help="heartbeat processes")
    args = parser.parse_args()
    # A SIGTERM (a CI's timeout) unwinds like Ctrl-C, through every clean-up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    counts = [int(n) for n in args.hosts.split(",") if n.strip()]
    figures: dict[str, Any] = {"benchmark": "scale", "runs": args.runs, "slots": args.slots}
    outer = docker.from_env(timeout=600)
    with services() as (amqp_url, database_url), Processes(amqp_url, database_url) as procs:
        # The monitor first, alone with its heartbeats: a control plane would write each one
        # to PostgreSQL, and the agents of the launch part would be agents it must watch.
        if args.agents:
            figures["monitor"] = monitor_cpu(procs, amqp_url, database_url, args)
        if counts:
            control_plane = procs.start("dispatcher", ["serve"])
            asyncio.run(control_plane.wait_for_output("control plane running", timeout=60))
            for count in counts:
                figures[f"hosts_{count}"] = launch_rate(procs, outer, amqp_url, count, args)
    figures["load_average_end"] = load_average()
    report(figures)


if __name__ == "__main__":
    main()
