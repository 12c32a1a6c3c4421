"""The HTTP API: the runs list, a run's page and live events, against asyncpg reading the
same rows in the same run.

    python bench/web.py [--runs 100000] [--seconds 10] [--clients 8] [--live 20]

- Runs list: requests per second of ``GET /api/v1/runs?state=SUCCESS&limit=50`` with
  ``--clients`` at once for ``--seconds``, with ``--runs`` runs in the table; floor: the same
  query (``store.runs.page``) through an asyncpg pool of the same size.
- A run's page: p50 and p95 of ``GET /api/v1/runs/{id}`` over random runs; floor: reading the
  same run, events and progress with asyncpg.
- Live events: from a container's start (Docker's StartedAt) to its STARTED event arriving on
  ``/api/v1/events``; floor: the same row seen by polling ``run_events`` with asyncpg every
  5 ms. ``--live`` runs, one at a time. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import time
import uuid
from datetime import datetime

import docker
import httpx
from _harness import Processes, percentile, progress, report, services

from dispatcher.client import Client
from dispatcher.settings import ImageNames
from dispatcher.store import Database, RunFilters


async def fill(store: Database, runs: int) -> list[uuid.UUID]:
    """Insert ``runs`` finished runs with three events each, in batches; return their ids."""
    ids = [uuid.uuid4() for _ in range(runs)]
    states = ["SUCCESS"] * 8 + ["FAILURE", "CANCELED"]
    async with store.connections.connection() as connection:
        for start in range(0, runs, 10_000):
            chunk = ids[start : start + 10_000]
            await connection.execute(
                """
                INSERT INTO runs (run_id, idempotency_key, queue, image, command, env, tags,
                                  state, created_at, started_at, finished_at, exit_code)
                SELECT r.id, r.id::text, 'bench', 'busybox', '["true"]', '{}',
                       '{"team": "bench"}', r.state,
                       now() - r.n * interval '1 second', now() - r.n * interval '1 second',
                       now() - r.n * interval '1 second' + interval '2 seconds', 0
                FROM unnest($1::uuid[], $2::text[], $3::int[]) AS r(id, state, n)
                """,
                chunk,
                [random.choice(states) for _ in chunk],
                list(range(start, start + len(chunk))),
            )
            await connection.execute(
                """
                INSERT INTO run_events (event_id, run_id, attempt, kind, from_state, to_state,
                                        payload)
                SELECT gen_random_uuid(), r.id, 1, k.kind, k.f, k.t, '{}'
                FROM unnest($1::uuid[]) AS r(id),
                     (VALUES ('SubmitRun', NULL, 'QUEUED'), ('RunStarted', 'QUEUED', 'STARTED'),
                             ('RunSucceeded', 'STARTED', 'SUCCESS')) AS k(kind, f, t)
                """,
                chunk,
            )
            progress(f"  {start + len(chunk)} runs in the table")
        await connection.execute("ANALYZE runs; ANALYZE run_events")
    return ids


async def rate(work: object, clients: int, seconds: float) -> float:
    """Calls per second of ``work`` (an async callable) with ``clients`` at once."""
    done = 0
    deadline = time.monotonic() + seconds

    async def client() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await work()  # type: ignore[operator]
            done += 1

    began = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.monotonic() - began)


async def timed(work: object, times: int) -> list[float]:
    took = []
    for _ in range(times):
        before = time.perf_counter()
        await work()  # type: ignore[operator]
        took.append(time.perf_counter() - before)
    return took


def started_at(docker_client: docker.DockerClient, run_id: uuid.UUID) -> float:
    [container] = docker_client.containers.list(
        all=True, filters={"label": f"hybrid-dispatcher.run-id={run_id}"}
    )
    raw = container.attrs["State"]["StartedAt"]
    head, _, frac = raw.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float(f"0.{frac or '0'}")


async def live(
    base: str, headers: dict[str, str], amqp_url: str, store: Database, runs: int
) -> tuple[list[float], list[float]]:
    """(asyncpg, SSE) delays from each run's container start to its STARTED event."""
    docker_client = docker.from_env()
    image = ImageNames.from_env().run_tiny
    through_db: list[float] = []
    through_sse: list[float] = []
    async with Client(amqp_url) as client, httpx.AsyncClient(base_url=base, timeout=60) as http:
        for _ in range(runs):
            run_id = uuid.uuid4()
            seen_sse: asyncio.Future[float] = asyncio.get_running_loop().create_future()

            async def listen(
                run_id: uuid.UUID = run_id, seen: asyncio.Future[float] = seen_sse
            ) -> None:
                params = {"run_id": str(run_id)}
                async with http.stream("GET", "/events", params=params, headers=headers) as s:
                    async for line in s.aiter_lines():
                        if line.startswith("data: ") and '"to_state":"STARTED"' in line:
                            seen.set_result(time.time())
                            return

            listener = asyncio.create_task(listen())
            await asyncio.sleep(0.2)  # the stream is open
            await client.submit(image, ["sleep", "1"], run_id=run_id)

            async def in_table(run_id: uuid.UUID = run_id) -> float:
                async with store.connections.connection() as connection:
                    # The floor is a poll of the table, by definition.
                    while not await connection.fetchval(  # noqa: ASYNC110
                        "SELECT 1 FROM run_events WHERE run_id = $1 AND to_state = 'STARTED'",
                        run_id,
                    ):
                        await asyncio.sleep(0.005)
                return time.time()

            seen_db = await asyncio.wait_for(in_table(), 60)
            seen = await asyncio.wait_for(seen_sse, 60)
            listener.cancel()
            start = await asyncio.to_thread(started_at, docker_client, run_id)
            through_db.append(seen_db - start)
            through_sse.append(seen - start)
    return through_db, through_sse


async def measure(
    args: argparse.Namespace, amqp_url: str, database_url: str, procs: Processes
) -> dict[str, object]:
    schema = procs.env["HD_DATABASE_SCHEMA"]
    store = await Database.open(database_url, schema=schema, max_size=args.clients + 2)
    try:
        await store.upgrade()
        secret = await store.api_tokens.add("bench", "read", "bench")
        headers = {"Authorization": f"Bearer {secret}"}
        web = procs.start("dispatcher", ["web", "--port", "0"])
        await web.wait_for_output(r"HTTP API on http://\S+/api/v1", timeout=60)
        found = re.search(r"HTTP API on (http://\S+/api/v1)", web.output())
        assert found is not None
        base = found.group(1)
        progress(f"filling the table with {args.runs} runs")
        ids = await fill(store, args.runs)

        limits = httpx.Limits(max_connections=args.clients)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:

            async def api_list() -> None:
                answer = await http.get(
                    "/runs", params={"state": "SUCCESS", "limit": 50}, headers=headers
                )
                assert answer.status_code == 200 and len(answer.json()["runs"]) == 50

            async def db_list() -> None:
                rows = await store.runs.page(RunFilters(state="SUCCESS"), 51)
                assert len(rows) == 51

            async def api_run() -> None:
                answer = await http.get(f"/runs/{random.choice(ids)}", headers=headers)
                assert answer.status_code == 200

            async def db_run() -> None:
                run_id = random.choice(ids)
                await store.runs.get(run_id)
                await store.runs.events(run_id)
                await store.output.progress(run_id)

            await rate(api_list, args.clients, 1.0)  # warm-up
            progress(f"runs list: {args.clients} clients for {args.seconds} s, API then asyncpg")
            api_rps = await rate(api_list, args.clients, args.seconds)
            db_rps = await rate(db_list, args.clients, args.seconds)
            progress("a run's page: 500 reads each, API then asyncpg")
            api_page = await timed(api_run, 500)
            db_page = await timed(db_run, 500)

        progress(f"live events: {args.live} runs, container start → STARTED event")
        agent = procs.start("worker_agent", ["run", "--agent-id", "bench-web", "--keep-finished"])
        await agent.wait_for_output("consuming", timeout=60)
        db_live, sse_live = await live(base, headers, amqp_url, store, args.live)
    finally:
        await store.close()
    ms = 1000.0
    return {
        "benchmark": "web",
        "runs_in_table": args.runs,
        "clients": args.clients,
        "list_api_rps": round(api_rps, 1),
        "list_asyncpg_rps": round(db_rps, 1),
        "list_ratio": round(api_rps / db_rps, 3),
        "run_page_api_p50_ms": round(percentile(api_page, 50) * ms, 2),
        "run_page_api_p95_ms": round(percentile(api_page, 95) * ms, 2),
        "run_page_asyncpg_p95_ms": round(percentile(db_page, 95) * ms, 2),
        "start_to_event_asyncpg_p50_ms": round(percentile(db_live, 50) * ms, 1),
        "start_to_event_sse_p50_ms": round(percentile(sse_live, 50) * ms, 1),
        "start_to_event_sse_p95_ms": round(percentile(sse_live, 95) * ms, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--live", type=int, default=20)
    args = parser.parse_args()
    with services() as (amqp_url, database_url), Processes(amqp_url, database_url) as procs:
        procs.start("dispatcher", ["serve"])
        figures = asyncio.run(measure(args, amqp_url, database_url, procs))
    progress(
        f"runs list {figures['list_api_rps']} req/s vs asyncpg {figures['list_asyncpg_rps']}; "
        f"run page p95 {figures['run_page_api_p95_ms']} ms; start → SSE p50 "
        f"{figures['start_to_event_sse_p50_ms']} ms (asyncpg poll "
        f"{figures['start_to_event_asyncpg_p50_ms']} ms)"
    )
    report(figures)


if __name__ == "__main__":
    main()
