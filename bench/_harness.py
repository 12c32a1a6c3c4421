"""Shared set-up of the benchmarks: real services, real processes, percentiles.

Services come from the project's images through testcontainers, unless HD_BENCH_AMQP_URL and
HD_BENCH_DATABASE_URL name running ones (with HD_BENCH_AMQP_MANAGEMENT_URL for a fresh vhost).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import aio_pika
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

from dispatcher.client import Client  # noqa: E402
from dispatcher.settings import ImageNames  # noqa: E402
from schemas import RunEnded  # noqa: E402
from tests.support import Proc  # noqa: E402

LABELS = {"hybrid-dispatcher.bench": "1"}

#: What to undo when the watchdog ends the benchmark: ``os._exit`` skips every ``finally``.
_on_fatal: list[Callable[[], object]] = []


def on_fatal(cleanup: Callable[[], object]) -> None:
    """Run ``cleanup`` (remove containers, hosts...) should the watchdog end the benchmark."""
    _on_fatal.append(cleanup)


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@contextmanager
def services() -> Iterator[tuple[str, str]]:
    """(AMQP URL, database URL) of a RabbitMQ and a PostgreSQL for this benchmark."""
    if os.environ.get("HD_BENCH_AMQP_URL") and os.environ.get("HD_BENCH_DATABASE_URL"):
        yield os.environ["HD_BENCH_AMQP_URL"], os.environ["HD_BENCH_DATABASE_URL"]
        return
    from testcontainers.community.postgres import PostgresContainer
    from testcontainers.community.rabbitmq import RabbitMqContainer

    images = ImageNames.from_env()
    progress("starting RabbitMQ and PostgreSQL")
    # Without the image's health check: it starts an Erlang VM every 5 s, a fifth of a core
    # in bursts that would land in the middle of a floor or a system run.
    rabbit = RabbitMqContainer(images.rabbitmq, username="hd", password="hd").with_kwargs(
        labels=LABELS, healthcheck={"test": ["NONE"]}
    )
    postgres = PostgresContainer(
        images.postgres, username="hd", password="hd", dbname="hd", driver=None
    ).with_kwargs(labels=LABELS)
    with rabbit, postgres:
        on_fatal(rabbit.stop)
        on_fatal(postgres.stop)
        params = rabbit.get_connection_params()
        yield f"amqp://hd:hd@{params.host}:{params.port}/", postgres.get_connection_url()


class Processes:
    """Control plane and agent processes of one benchmark, stopped on exit."""

    def __init__(self, amqp_url: str, database_url: str) -> None:
        self.env = {
            "HD_AMQP_URL": amqp_url,
            "HD_DATABASE_URL": database_url,
            "HD_DATABASE_SCHEMA": f"bench_{uuid.uuid4().hex[:8]}",
        }
        self.logs = Path(tempfile.mkdtemp(prefix="hd-bench-"))
        self.started: list[Proc] = []
        #: Queues the benchmark made (agents' instructions and control queues, say): deleted
        #: on exit with the schema, so that a broker and a database kept between benchmarks
        #: do not fill up with the leftovers of earlier ones.
        self.queues: list[str] = []

    def start(self, module: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        # No process of a benchmark serves metrics: a port in use (the demo's, say) must not
        # be what a benchmark measures.
        if args and args[0] in ("serve", "monitor", "run") and "--metrics-port" not in args:
            args = [*args, "--metrics-port", "0"]
        log = self.logs / f"{module}-{len(self.started)}.log"
        proc = Proc(module, args, log, {**self.env, **(env or {})})
        self.started.append(proc.start())
        return proc

    def __enter__(self) -> Processes:
        self._watching = True
        threading.Thread(target=self._watch, name="bench-watchdog", daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self._watching = False
        for proc in reversed(self.started):
            proc.stop()
        asyncio.run(self._forget())

    async def _forget(self) -> None:
        """Drop the benchmark's schema and delete its queues."""
        schema = self.env["HD_DATABASE_SCHEMA"]
        database = await asyncpg.connect(self.env["HD_DATABASE_URL"])
        try:
            await database.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await database.close()
        if self.queues:
            async with await aio_pika.connect(self.env["HD_AMQP_URL"]) as connection:
                channel = await connection.channel()
                for name in self.queues:
                    await channel.queue_delete(name, if_unused=False, if_empty=False)

    def _watch(self) -> None:
        """Fail fast when a process of the benchmark dies: its log tail says why.

        An exit by a signal is the benchmark's own doing (it kills agents on purpose); an
        exit with an error code is not, and waiting for its work would only time out.
        """
        while self._watching:
            for proc in list(self.started):
                code = proc.process.poll() if proc.process is not None else None
                if code is not None and code > 0 and self._watching:
                    progress(f"{proc.module} {' '.join(proc.args)} exited with code {code}:")
                    print(proc.output()[-3000:], file=sys.stderr, flush=True)
                    self._fatal()
            time.sleep(0.2)

    def _fatal(self) -> None:
        """Stop the other processes and undo what was registered, then exit 1."""
        self._watching = False
        for proc in reversed(self.started):
            with suppress(Exception):
                proc.stop(timeout=10)
        for cleanup in reversed(_on_fatal):
            with suppress(Exception):
                cleanup()
        os._exit(1)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(p) - 1]


def report(figures: dict[str, object]) -> None:
    """The benchmark's result: one JSON object, always the last line printed."""
    print(json.dumps(figures, sort_keys=True), flush=True)


async def submit_all(
    amqp_url: str, image: str, agent_queue: str, runs: int, timeout: float
) -> tuple[float, float, dict[uuid.UUID, str]]:
    """Submit ``runs`` runs of ``true`` at once; (first submit, last RunEnded, each run's
    final state)."""
    ended: dict[uuid.UUID, str] = {}
    async with Client(amqp_url) as client:
        run_ids = [uuid.uuid4() for _ in range(runs)]
        follower = await client.follow(set(run_ids))

        async def until_all_ended() -> float:
            async with contextlib.aclosing(follower.events()) as events:
                async for event in events:
                    if isinstance(event, RunEnded):
                        ended[event.run_id] = event.state
                        if len(ended) == runs:
                            return time.time()
            raise RuntimeError("the status stream ended")

        waiting = asyncio.create_task(until_all_ended())
        began = time.time()
        await asyncio.gather(
            *(client.submit(image, ["true"], queue=agent_queue, run_id=r) for r in run_ids)
        )
        try:
            last = await asyncio.wait_for(waiting, timeout)
        except TimeoutError:
            raise SystemExit(
                f"only {len(ended)} of {runs} runs ended within {timeout:.0f} s"
            ) from None
    return began, last, ended
