"""Burst: N short runs submitted at once to one agent, against a pool doing the same lifecycles.

    python bench/burst.py [--runs N] [--slots 4,16] [--rounds R]

For each slot count S, on the local engine, over the transport the agent uses (docker-py's
``from_env``: DOCKER_HOST, and TLS when DOCKER_TLS_VERIFY says so):

Floor: a pool of S threads on one docker-py client with S connections, doing per container
what the agent does: create, start, wait, read the output, remove, of the tiny run image with
``true``; N lifecycles, half before the system's burst and half after, so that both see the
same drift of a shared machine; rate = N / their wall time.

System: one control plane and one agent (``worker-agent run --max-concurrent S``, a queue of
its own); N runs of ``true`` submitted at once with the Python client; rate = N / (first
submit → last RunEnded), and the time from the first submit to the last container's start
(Docker's events, followed live); each burst on an agent started for it.

R rounds (3 by default) of floor, system, floor per slot count: the rates are pooled (all
runs over all their time), and each round's ratio is listed too. One round is a ten-second
sample of a shared machine: rounds of the same code have differed by a tenth. Targets: at
least 0.9 of the floor's rate at 4 slots, 0.8 at 16, pooled. The last line is one JSON
object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import docker
from _harness import LABELS, Processes, on_fatal, progress, report, services, submit_all

from dispatcher.settings import ImageNames
from schemas.topology import control_queue, instructions_queue

#: The agent's labels on its containers (worker_agent.containers).
AGENT_LABEL = "hybrid-dispatcher.agent-id"
RUN_LABEL = "hybrid-dispatcher.run-id"
#: The least share of the floor's rate the system must reach, by slot count.
TARGETS = {4: 0.9, 16: 0.8}
#: Longest a burst may take before the benchmark gives up.
TIMEOUT_S = 600.0
#: The floor's containers, told apart from those of other benchmarks (and removed should the
#: benchmark be ended).
FLOOR_LABELS = {**LABELS, "hybrid-dispatcher.bench-burst": str(os.getpid())}


def load_average() -> float:
    return round(os.getloadavg()[0], 1)


# ------------------------------------------------------------------------ floor


def floor(image: str, runs: int, slots: int) -> float:
    """Seconds for ``runs`` lifecycles (create, start, wait, output, remove), ``slots`` at once."""
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for item in range(runs):
        todo.put(item)
    # One client and as many connections as threads, as the agent holds its engine.
    client = docker.from_env(timeout=120, max_pool_size=slots)
    api = client.api

    def worker() -> None:
        while True:
            try:
                todo.get_nowait()
            except queue.Empty:
                return
            container = api.create_container(image, ["true"], labels=FLOOR_LABELS)
            try:
                api.start(container["Id"])
                api.wait(container["Id"])
                api.logs(container["Id"], stdout=True, stderr=True)
            finally:
                api.remove_container(container["Id"], force=True, v=True)

    try:
        with ThreadPoolExecutor(max_workers=slots, thread_name_prefix="floor") as pool:
            began = time.perf_counter()
            for job in [pool.submit(worker) for _ in range(slots)]:
                job.result()
            return time.perf_counter() - began
    finally:
        client.close()


def remove_floor_containers() -> None:
    client = docker.from_env()
    try:
        label = "hybrid-dispatcher.bench-burst"
        for container in client.containers.list(
            all=True, filters={"label": f"{label}={FLOOR_LABELS[label]}"}
        ):
            container.remove(force=True)
    finally:
        client.close()


# ------------------------------------------------------------------------ system


class Starts:
    """Start times (s since the epoch) of one agent's containers, from Docker's events
    followed live: the engine's backlog of events is too short to read a burst afterwards."""

    def __init__(self, agent_id: str) -> None:
        self.times: list[float] = []
        self._client = docker.from_env(timeout=None)
        self._stream = self._client.api.events(
            since=int(time.time()) - 1,
            decode=True,
            filters={"type": "container", "event": ["start"], "label": f"{AGENT_LABEL}={agent_id}"},
        )
        self._reader = threading.Thread(target=self._read, name="bench-events", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):  # closing the stream ends the loop with an error
            for event in self._stream:
                self.times.append(int(event["timeNano"]) / 1e9)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stream.close()
        self._client.close()
        self._reader.join(5)


def system(procs: Processes, amqp_url: str, image: str, runs: int, slots: int) -> dict[str, Any]:
    """One agent with ``slots`` slots, every run submitted at once; the agent is stopped after."""
    suffix = uuid.uuid4().hex[:8]
    agent_queue, agent_id = f"bench-burst-{suffix}", f"bench-burst-{slots}-{suffix}"
    args = ["run", "--queue", agent_queue, "--agent-id", agent_id]
    procs.queues += [instructions_queue(agent_queue), control_queue(agent_id)]
    # Its log goes where the others' do: that folder must still be there (a shared /tmp may
    # have been swept since the benchmark began).
    procs.logs.mkdir(parents=True, exist_ok=True)
    agent = procs.start("worker_agent", [*args, "--max-concurrent", str(slots)])
    try:
        asyncio.run(agent.wait_for_output("consuming", timeout=120))
        asyncio.run(submit_all(amqp_url, image, agent_queue, slots, TIMEOUT_S))  # warm-up
        load = load_average()
        starts = Starts(agent_id)
        try:
            began, last, ended = asyncio.run(
                submit_all(amqp_url, image, agent_queue, runs, TIMEOUT_S)
            )
        finally:
            starts.close()
    finally:
        agent.stop()
    # The stream starts a second early (its ``since`` is in whole seconds): the warm-up's
    # starts are left out.
    started = sorted(at - began for at in starts.times if at >= began)
    client = docker.from_env()
    try:
        left = client.containers.list(all=True, filters={"label": f"{AGENT_LABEL}={agent_id}"})
    finally:
        client.close()
    return {
        "system_runs_per_s": round(runs / (last - began), 2),
        "system_all_ended_s": round(last - began, 2),
        "system_first_container_started_s": round(started[0], 2) if started else None,
        "system_last_container_started_s": round(started[-1], 2) if started else None,
        "containers_started_seen": len(started),
        "runs_succeeded": sum(1 for state in ended.values() if state == "SUCCESS"),
        "containers_left": len(left),
        "load_average": load,
    }


def burst(
    procs: Processes, amqp_url: str, image: str, runs: int, slots: int, rounds: int
) -> dict[str, Any]:
    """Floor and system at ``slots``, ``rounds`` times; in each round the floor's lifecycles
    are split around the system's burst. The rates are pooled over the rounds (all runs over
    all their time), so that one round's drift on a shared machine weighs as one of many."""
    floor(image, slots, slots)  # warm-up: the first creates are slower
    floor_s = system_s = 0.0
    loads: list[float] = []
    each: list[dict[str, Any]] = []
    for turn in range(1, rounds + 1):
        progress(f"{slots} slots, round {turn}/{rounds}: floor, {runs // 2} lifecycles")
        loads.append(load_average())
        took = floor(image, runs // 2, slots)
        progress(f"{slots} slots, round {turn}/{rounds}: system, {runs} runs submitted at once")
        figures = system(procs, amqp_url, image, runs, slots)
        progress(f"{slots} slots, round {turn}/{rounds}: floor, {runs - runs // 2} more")
        loads.append(load_average())
        took += floor(image, runs - runs // 2, slots)
        floor_s += took
        system_s += figures["system_all_ended_s"]
        figures["floor_lifecycles_per_s"] = round(runs / took, 2)
        figures["ratio"] = round(figures["system_runs_per_s"] / (runs / took), 2)
        progress(
            f"{slots} slots, round {turn}/{rounds}: floor {figures['floor_lifecycles_per_s']}/s,"
            f" system {figures['system_runs_per_s']}/s (ratio {figures['ratio']}), last start"
            f" at {figures['system_last_container_started_s']} s,"
            f" {figures['runs_succeeded']}/{runs} SUCCESS, load {figures['load_average']}"
        )
        each.append(figures)
    floor_rate = runs * rounds / floor_s
    system_rate = runs * rounds / system_s
    ratio = system_rate / floor_rate
    target = TARGETS.get(slots)
    result = {
        "floor_lifecycles_per_s": round(floor_rate, 2),
        "floor_load_average": round(sum(loads) / len(loads), 1),
        "system_runs_per_s": round(system_rate, 2),
        "ratio": round(ratio, 2),
        "round_ratios": [f["ratio"] for f in each],
        "runs_succeeded": sum(f["runs_succeeded"] for f in each),
        "containers_started_seen": sum(f["containers_started_seen"] for f in each),
        "containers_left": sum(f["containers_left"] for f in each),
        "system_last_container_started_s": [f["system_last_container_started_s"] for f in each],
        "rounds": each,
        "target_ratio": target,
        "target_met": None if target is None else ratio >= target,
    }
    progress(
        f"{slots} slots, {rounds} round(s) pooled: floor {floor_rate:.2f}/s, system"
        f" {system_rate:.2f}/s (ratio {result['ratio']}; rounds {result['round_ratios']}),"
        f" {result['runs_succeeded']}/{runs * rounds} SUCCESS"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=60, help="runs (and floor lifecycles)")
    parser.add_argument("--slots", default="4,16", help="slot counts, comma-separated")
    parser.add_argument(
        "--rounds", type=int, default=3, help="floor-system-floor rounds per slot count, pooled"
    )
    args = parser.parse_args()
    # A SIGTERM (a CI's timeout) unwinds like Ctrl-C, through every clean-up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    counts = [int(n) for n in args.slots.split(",") if n.strip()]
    image = ImageNames.from_env().run_tiny
    on_fatal(remove_floor_containers)
    figures: dict[str, Any] = {"benchmark": "burst", "runs": args.runs, "rounds": args.rounds}
    with services() as (amqp_url, database_url), Processes(amqp_url, database_url) as procs:
        control_plane = procs.start("dispatcher", ["serve"])
        asyncio.run(control_plane.wait_for_output("control plane running", timeout=60))
        for slots in counts:
            figures[f"slots_{slots}"] = burst(procs, amqp_url, image, args.runs, slots, args.rounds)
    figures["load_average_end"] = load_average()
    figures["targets_met"] = all(
        f["target_met"] is not False for key, f in figures.items() if key.startswith("slots_")
    )
    report(figures)


if __name__ == "__main__":
    main()
