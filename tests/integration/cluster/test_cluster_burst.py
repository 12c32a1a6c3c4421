"""The whole system on a three-node cluster: 1,000 runs while the node every process is
connected to is stopped and started again.

Control plane, monitor, agent and client all take the three nodes' URLs and start on the
first; stopping it moves every connection to the next node. What a user would look at says
whether that cost anything: the runs in PostgreSQL (all SUCCESS, on their first attempt, no
failure recorded) and Docker's own event stream (one container per attempt, none twice).

A soak test: the 1,000 runs took 6.5-7.5 minutes on the 2-core machine (about 2.5 runs/s,
busy with other work), so the default run leaves it out (``-m 'not soak'`` in pyproject's
addopts). Run it with ``make soak``, or ``pytest -m soak tests/integration/cluster``: given by
path alone it is deselected like in the default run.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from tests.integration.cluster.conftest import Cluster
from tests.integration.conftest import Stack
from tests.integration.docker_events import ContainerEvents
from tests.support import eventually
from worker_agent.containers import LABEL_AGENT
from worker_agent.settings import AgentSettings

RUNS = 1_000
COMMAND = ["true"]
SLOTS = 32
#: The agent's own heartbeat interval, so that the monitor's default thresholds apply (lost
#: after 3 x 2 s of silence), as in production: a failover must not look like a lost agent.
AGENT_OPTIONS = (
    "--keep-finished",
    "--heartbeat-interval",
    str(AgentSettings.heartbeat_interval_s),
)

pytestmark = [pytest.mark.soak, pytest.mark.timeout(1200)]


@pytest.fixture
def container_events(cluster_stack: Stack) -> Iterator[ContainerEvents]:
    recording = ContainerEvents(f"{LABEL_AGENT}={cluster_stack.agent_id(0)}").start()
    yield recording
    recording.stop()


@pytest.fixture
async def db(cluster_stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(
        cluster_stack.database_url, server_settings={"search_path": cluster_stack.schema}
    )
    yield connection
    await connection.close()


async def count_by(db: asyncpg.Connection, column: str, run_ids: list[uuid.UUID]) -> Counter[str]:
    rows = await db.fetch(
        f"SELECT {column} AS value, count(*) AS n FROM runs WHERE run_id = ANY($1::uuid[]) "
        "GROUP BY 1",
        run_ids,
    )
    return Counter({str(row["value"]): row["n"] for row in rows})


async def ended(db: asyncpg.Connection, run_ids: list[uuid.UUID]) -> int:
    found = await count_by(db, "state", run_ids)
    return found["SUCCESS"] + found["FAILURE"] + found["CANCELED"]


async def test_1000_runs_all_succeed_once_while_the_connected_node_stops_and_starts(
    rabbitmq_cluster: Cluster,
    cluster_stack: Stack,
    db: asyncpg.Connection,
    container_events: ContainerEvents,
) -> None:
    stack = cluster_stack
    began = time.monotonic()
    await stack.start_control_plane()
    await stack.start_monitor()
    await stack.start_agent(0, max_concurrent=SLOTS, extra=AGENT_OPTIONS)
    async with stack.client() as client:
        run_ids = list(
            await asyncio.gather(
                *(client.submit(stack.run_image, COMMAND, queue=stack.queue) for _ in range(RUNS))
            )
        )

    async def ended_past(count: int) -> bool:
        return await ended(db, run_ids) >= count

    # Stop the first node (every process is connected to it) with a quarter of the runs done,
    # keep it down through another quarter, and bring it back for the rest.
    await eventually(lambda: ended_past(RUNS // 4), 600, interval=0.2, what="a quarter ended")
    stopped = time.monotonic()
    await asyncio.to_thread(rabbitmq_cluster.stop, 0)
    ended_at_stop = await ended(db, run_ids)
    await eventually(
        lambda: ended_past(ended_at_stop + RUNS // 4), 600, interval=0.2, what="node down"
    )
    await asyncio.to_thread(rabbitmq_cluster.start, 0)
    down_s = time.monotonic() - stopped
    await eventually(lambda: ended_past(RUNS), 900, interval=0.5, what=f"all {RUNS} ended")
    took_s = time.monotonic() - began

    assert await count_by(db, "state", run_ids) == {"SUCCESS": RUNS}
    assert await count_by(db, "attempt", run_ids) == {"1": RUNS}
    failures = await db.fetchval(
        "SELECT count(*) FROM run_events WHERE run_id = ANY($1::uuid[]) AND kind = 'RunFailed'",
        run_ids,
    )
    assert failures == 0

    async def all_died() -> bool:
        return container_events.all_died()

    # The agent saw the ends through its own event stream; wait for ours to match.
    await eventually(all_died, 60, what="Docker's die event of every container recorded")
    created = container_events.created()
    per_attempt = Counter(created.values())
    assert sorted(run for run, _ in per_attempt) == sorted(map(str, run_ids))
    assert set(per_attempt.values()) == {1}, "an attempt had more than one container"
    assert {attempt for _, attempt in per_attempt} == {1}
    starts = Counter(life.container_id for life in container_events.lives())
    assert set(starts.values()) == {1}, "a container was started twice"
    print(
        f"{RUNS} runs SUCCESS in {took_s:.0f} s, {len(created)} containers; node 1 down for "
        f"{down_s:.0f} s (stopped with {ended_at_stop} runs ended)"
    )
