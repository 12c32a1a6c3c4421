"""Fixtures that run the project's real processes against the session's services."""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import docker
import pytest

from compose import hosts
from dispatcher.client import Client
from dispatcher.settings import ImageNames
from dispatcher.store import Database
from tests.conftest import SESSION_ID, labels_for_tests, service_unavailable
from tests.support import Proc, management_request
from worker_agent.containers import LABEL_AGENT, LABEL_RUN


class Stack:
    """The control plane and agents of one test, isolated by vhost, schema and queue."""

    def __init__(
        self,
        amqp_url: str,
        database_url: str,
        schema: str,
        unique: str,
        logs: Path,
        docker_client: docker.DockerClient,
        run_image: str,
        management_url: str = "",
    ) -> None:
        self.amqp_url = amqp_url
        self.management_url = management_url
        self.database_url = database_url
        self.schema = schema
        self.queue = f"q-{unique}"
        self.unique = unique
        self.logs = logs
        self.docker = docker_client
        self.run_image = run_image
        self.processes: list[Proc] = []
        self.agent_ids: set[str] = set()

    def _env_for_cli(self) -> dict[str, str]:
        import os

        return {**os.environ, **self._env()}

    def _env(self) -> dict[str, str]:
        env = {
            "HD_AMQP_URL": self.amqp_url,
            "HD_DATABASE_URL": self.database_url,
            "HD_DATABASE_SCHEMA": self.schema,
        }
        if self.management_url:
            # The broker policies (delivery limit, bounded dead letters) go on the test's vhost.
            env["HD_AMQP_MANAGEMENT_URL"] = self.management_url
        return env

    async def start_control_plane(self, components: str = "intake,relay,status") -> Proc:
        n = len(self.processes)
        proc = Proc(
            "dispatcher",
            ["serve", "--components", components, "--log-level", "DEBUG", "--metrics-port", "0"],
            self.logs / f"control-plane-{n}.log",
            self._env(),
        ).start()
        self.processes.append(proc)
        await proc.wait_for_output("control plane running", timeout=60)
        return proc

    async def start_monitor(
        self,
        extra: tuple[str, ...] = (),
        wait_active: bool = True,
        env: dict[str, str] | None = None,
    ) -> Proc:
        """A failure monitor with quick retries; waits until it is the active one."""
        n = len(self.processes)
        proc = Proc(
            "dispatcher",
            [
                "monitor",
                "--log-level",
                "DEBUG",
                "--metrics-port",
                "0",
                "--retry-backoff",
                "0.2",
                *extra,
            ],
            self.logs / f"monitor-{n}.log",
            {**self._env(), **(env or {})},
        ).start()
        self.processes.append(proc)
        await proc.wait_for_output(
            "this monitor is active" if wait_active else "standing by", timeout=60
        )
        return proc

    async def start_web(self, env: dict[str, str] | None = None) -> tuple[Proc, str]:
        """``dispatcher web`` on a free port; returns it with the API's base URL."""
        n = len(self.processes)
        proc = Proc(
            "dispatcher",
            ["web", "--port", "0", "--log-level", "DEBUG"],
            self.logs / f"web-{n}.log",
            {**self._env(), **(env or {})},
        ).start()
        self.processes.append(proc)
        await proc.wait_for_output(r"HTTP API on http://\S+/api/v1", timeout=60)
        found = re.search(r"HTTP API on (http://\S+/api/v1)", proc.output())
        assert found is not None
        return proc, found.group(1)

    def agent_id(self, n: int = 0) -> str:
        return f"t-{SESSION_ID}-{self.unique}-{n}"

    async def start_agent(
        self,
        n: int = 0,
        max_concurrent: int = 4,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Proc:
        """An agent; ``wait``: until it consumes (False: a test waits for what it expects)."""
        agent_id = self.agent_id(n)
        self.agent_ids.add(agent_id)
        proc = Proc(
            "worker_agent",
            [
                "run",
                "--queue",
                self.queue,
                "--agent-id",
                agent_id,
                "--max-concurrent",
                str(max_concurrent),
                "--heartbeat-interval",
                "0.5",
                "--log-level",
                "DEBUG",
                "--metrics-port",
                "0",
                *extra,
            ],
            self.logs / f"agent-{agent_id}-{len(self.processes)}.log",
            {**self._env(), **(env or {})},
        ).start()
        self.processes.append(proc)
        if wait:
            await proc.wait_for_output("consuming", timeout=60)
        return proc

    def queue_stats(self, queue: str) -> dict[str, Any]:
        """What the broker's management API reports of a queue of the test's vhost.

        Its counters are sampled every few seconds: wait on them with ``eventually``.
        """
        assert self.management_url, "this test needs the broker's management API"
        vhost = urllib.parse.urlsplit(self.amqp_url).path.lstrip("/")
        path = f"/api/queues/{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(queue)}"
        stats: dict[str, Any] = management_request(self.management_url, "GET", path)
        return stats

    def client(self) -> Client:
        return Client(self.amqp_url)

    def containers_of(self, run_id: uuid.UUID) -> list[docker.models.containers.Container]:
        return self.docker.containers.list(
            all=True, filters={"label": f"{LABEL_RUN}={run_id}"}, ignore_removed=True
        )

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        for agent_id in self.agent_ids:
            for container in self.docker.containers.list(
                all=True, filters={"label": f"{LABEL_AGENT}={agent_id}"}, ignore_removed=True
            ):
                with contextlib.suppress(docker.errors.NotFound):
                    container.remove(force=True)

    def dump_logs(self) -> str:
        return "\n".join(f"==== {p.log_path.name}\n{p.output()[-4000:]}" for p in self.processes)


@pytest.fixture
async def schema(database_url: str, unique: str) -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL schema for one test; dropped afterwards."""
    name = f"t_{unique}"
    yield name
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await connection.close()


@pytest.fixture
async def store(database_url: str, schema: str) -> AsyncIterator[Database]:
    """The store on the test's schema, migrated."""
    opened = await Database.open(database_url, schema=schema)
    await opened.upgrade()
    yield opened
    await opened.close()


@pytest.fixture
def stack(
    vhost_url: str,
    database_url: str,
    schema: str,
    unique: str,
    tmp_path: Path,
    docker_client: docker.DockerClient,
    run_image: str,
    broker: tuple[str, str],
    request: pytest.FixtureRequest,
) -> Iterator[Stack]:
    built = Stack(
        vhost_url, database_url, schema, unique, tmp_path, docker_client, run_image, broker[1]
    )
    yield built
    built.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(built.dump_logs())


@pytest.fixture(scope="session")
def engine_hosts(
    docker_client: docker.DockerClient, images: ImageNames, run_image: str
) -> Iterator[list[hosts.Host]]:
    """Two agent hosts, each a Docker engine of its own holding the run image (Docker in
    Docker, see compose/hosts.py); started on first use, shared by the session.

    A test that freezes one (``host.freeze()``) thaws it before it ends; what a test starts on
    an engine it removes."""
    try:
        docker_client.images.get(images.host)
    except docker.errors.ImageNotFound:
        service_unavailable(f"image {images.host}", "not built (run `make images`)")
    hosts.remove_leftovers(docker_client)
    prefix = f"hd-t-{SESSION_ID}"
    try:
        started = hosts.up(
            docker_client,
            2,
            prefix,
            image=images.host,
            labels=labels_for_tests(),
            images=[run_image],
            owner=os.getpid(),
        )
    except hosts.HostError as exc:
        service_unavailable("agent hosts (Docker in Docker)", exc)
        raise
    yield started
    for host in started:
        host.close()
    hosts.down(docker_client, prefix)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
