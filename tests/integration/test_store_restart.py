"""PostgreSQL restarted while runs report events: no event lost, every final state right."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator

import asyncpg
import docker
import pytest

from dispatcher.settings import ImageNames
from dispatcher.states import RunState
from dispatcher.store import Database
from tests.conftest import labels_for_tests
from tests.integration.conftest import Stack
from tests.support import eventually


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def own_database(
    docker_client: docker.DockerClient, images: ImageNames
) -> AsyncIterator[tuple[str, docker.models.containers.Container]]:
    """A PostgreSQL of this test's own, on a fixed host port so that it survives a restart."""
    port = _free_port()
    container = docker_client.containers.run(
        images.postgres,
        detach=True,
        environment={"POSTGRES_USER": "hd", "POSTGRES_PASSWORD": "hd", "POSTGRES_DB": "hd"},
        ports={"5432/tcp": ("127.0.0.1", port)},
        labels=labels_for_tests(),
    )
    url = f"postgresql://hd:hd@127.0.0.1:{port}/hd"
    try:
        await eventually(lambda: _answers(url), 60, interval=0.3, what="PostgreSQL answers")
        yield url, container
    finally:
        container.remove(force=True, v=True)


async def _answers(url: str) -> bool:
    try:
        connection = await asyncpg.connect(url, timeout=2)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return False
    await connection.close()
    return True


async def test_runs_end_right_across_a_postgresql_restart(
    stack: Stack, own_database: tuple[str, docker.models.containers.Container]
) -> None:
    url, container = own_database
    stack.database_url = url
    store = await Database.open(url, schema=stack.schema)
    try:
        await store.upgrade()
        control_plane = await stack.start_control_plane()
        # Not about a lost agent: a slow heartbeat on a loaded machine must not fail a run.
        monitor = await stack.start_monitor(("--lost-after-beats", "20"))
        agent = await stack.start_agent(max_concurrent=20)
        expected: dict[uuid.UUID, int] = {}
        async with stack.client() as client:
            for i in range(20):
                # Output before and after the restart, and half of them fail.
                script = f"echo begin {i}; sleep 4; echo end {i}; exit {i % 2 * 3}"
                run_id = await client.submit(
                    stack.run_image, ["sh", "-c", script], queue=stack.queue
                )
                expected[run_id] = i % 2 * 3

        async def some_started() -> bool:
            return (await store.runs.count_by_state())["STARTED"] >= 5

        await eventually(some_started, 120, interval=0.2, what="runs started")
        # Restart while runs start, print and exit: their events meet a database that is gone.
        await asyncio.to_thread(container.restart, timeout=5)
        await eventually(lambda: _answers(url), 60, interval=0.3, what="PostgreSQL back")

        async def all_ended() -> bool:
            try:
                runs = await store.runs.recent(limit=100)
            except Exception:  # the store's pool reconnects on its next use
                return False
            return len(runs) == 20 and all(
                r.state in (RunState.SUCCESS, RunState.FAILURE) for r in runs
            )

        await eventually(all_ended, 180, interval=0.5, what="20 runs ended")
        # Every process rode the outage out (the monitor stood by, then led again).
        for proc in (control_plane, monitor, agent):
            assert proc.process is not None and proc.process.poll() is None, proc.output()[-2000:]
        for run in await store.runs.recent(limit=100):
            code = expected[run.run_id]
            assert run.exit_code == code
            assert run.state == (RunState.SUCCESS if code == 0 else RunState.FAILURE)
            assert run.attempt == 1
            kinds = [e.kind for e in await store.runs.events(run.run_id)]
            final = "RunSucceeded" if code == 0 else "RunFailed"
            # Its claim (sent again while the store was away) before its own events.
            assert kinds[:2] == ["SubmitRun", "RunClaimed"], kinds
            assert [k for k in kinds if k != "RunClaimed"] == [
                "SubmitRun",
                "RunLaunched",
                "RunStarted",
                final,
            ], kinds
            i = list(expected).index(run.run_id)

            async def output(run_id: uuid.UUID = run.run_id) -> list[str]:
                # The final state may be read a moment before the last output batch is.
                return [line for _, _, line in await store.output.lines(run_id)]

            async def complete(run_id: uuid.UUID = run.run_id, i: int = i) -> bool:
                return await output(run_id) == [f"begin {i}", f"end {i}"]

            await eventually(complete, 30, interval=0.3, what=f"output of run {i}")
    finally:
        await store.close()
