"""A RabbitMQ cluster of three nodes for the tests that ask for it, and a Stack on it.

The cluster is started once per session, and only when a test asks for it (the three nodes
boot side by side, 20-30 s): the rest of the suite never pays for it. Each node publishes
its AMQP and management ports on fixed loopback ports, so that a node stopped and started
again answers where the clients' URL list says it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import secrets
import socket
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from dispatcher.settings import ImageNames
from tests.conftest import SESSION_ID, labels_for_tests, service_unavailable
from tests.integration.conftest import Stack
from tests.support import management_request
from transport.connection import probe
from transport.errors import BrokerUnavailable
from transport.urls import join

NODES = 3
USER = PASSWORD = "hd"
#: How long the whole cluster, or one restarted node, may take to be ready.
BOOT_TIMEOUT_S = 180.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """Three clustered RabbitMQ nodes (our image), each at fixed ports on 127.0.0.1."""

    def __init__(self, client: docker.DockerClient, image: str) -> None:
        self._client = client
        self.image = image
        self.names = [f"hd-rmq-{SESSION_ID}-{n}" for n in range(1, NODES + 1)]
        #: RabbitMQ's names of the nodes, in the order of ``names``.
        self.node_names = [f"rabbit@{name}" for name in self.names]
        self.amqp_ports = [_free_port() for _ in self.names]
        self.management_ports = [_free_port() for _ in self.names]
        self.containers: list[Any] = []
        self.network: Any = None

    # ------------------------------------------------------------------ start and stop

    def start_all(self) -> None:
        """Create the network and boot the three nodes side by side; wait until clustered."""
        self.network = self._client.networks.create(
            f"hd-cluster-{SESSION_ID}", driver="bridge", labels=labels_for_tests()
        )
        cookie = secrets.token_hex(16)
        with ThreadPoolExecutor(max_workers=NODES) as pool:
            self.containers = list(pool.map(lambda n: self._run(n, cookie), range(NODES)))
        self._wait(self.ready, "the three nodes clustered, each taking AMQP connections")

    def _run(self, n: int, cookie: str) -> Any:
        name = self.names[n]
        return self._client.containers.run(
            self.image,
            name=name,
            hostname=name,
            detach=True,
            network=self.network.name,
            environment={
                "RABBITMQ_DEFAULT_USER": USER,
                "RABBITMQ_DEFAULT_PASS": PASSWORD,
                "RABBITMQ_ERLANG_COOKIE": cookie,
                "RABBITMQ_NODENAME": self.node_names[n],
                "RABBITMQ_CLUSTER_NODES": ",".join(self.node_names),
            },
            ports={
                "5672/tcp": ("127.0.0.1", self.amqp_ports[n]),
                "15672/tcp": ("127.0.0.1", self.management_ports[n]),
            },
            labels=labels_for_tests(),
        )

    def stop(self, n: int) -> None:
        """Stop node ``n`` (0-based) as ``docker stop`` does: SIGTERM, a clean shutdown."""
        self.containers[n].stop(timeout=60)

    def start(self, n: int) -> None:
        """Start node ``n`` again; returns once it is back in the cluster and takes clients."""
        self.containers[n].start()
        self._wait(lambda: self.ready(n), f"{self.names[n]} back in the cluster")

    def remove(self) -> None:
        for container in self.containers:
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True, v=True)
        if self.network is not None:
            with contextlib.suppress(docker.errors.NotFound):
                self.network.remove()

    def _wait(self, ready: Any, what: str) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while not ready():
            for container in self.containers:
                container.reload()
                if container.status == "exited":
                    logs = container.logs(tail=40).decode(errors="replace")
                    raise RuntimeError(f"{container.name} exited:\n{logs}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not within {BOOT_TIMEOUT_S} s: {what}")
            time.sleep(0.5)

    # ------------------------------------------------------------------ what it answers

    def ready(self, *only: int) -> bool:
        """Every node (or those given) runs in the cluster and completes an AMQP handshake."""
        wanted = only or tuple(range(NODES))
        running = self.running_nodes()
        if not all(self.node_names[n] in running for n in wanted):
            return False
        for n in wanted:
            try:
                asyncio.run(probe(self.urls()[n], timeout=5))
            except BrokerUnavailable:
                return False
        return True

    def running_nodes(self) -> set[str]:
        """The nodes the cluster reports running (asked of any node that answers)."""
        try:
            nodes = self.management("GET", "/api/nodes")
        except (OSError, http.client.HTTPException):
            return set()
        return {node["name"] for node in nodes if node.get("running")}

    def urls(self, vhost: str = "") -> list[str]:
        """Each node's AMQP URL, on ``vhost`` (the default one when empty)."""
        path = "/" + urllib.parse.quote(vhost, safe="") if vhost else "/"
        return [f"amqp://{USER}:{PASSWORD}@127.0.0.1:{port}{path}" for port in self.amqp_ports]

    def url(self, vhost: str = "") -> str:
        """The broker setting that lists the three nodes."""
        return join(self.urls(vhost))

    def where(self, n: int) -> str:
        """``host:port`` of node ``n``, as ``FailoverConnection.node`` names it."""
        return f"127.0.0.1:{self.amqp_ports[n]}"

    def management_urls(self) -> list[str]:
        return [f"http://{USER}:{PASSWORD}@127.0.0.1:{port}" for port in self.management_ports]

    def management(self, method: str, path: str, body: Any = None) -> Any:
        """A management API call at the first node that answers."""
        error: Exception | None = None
        for base in self.management_urls():
            try:
                return management_request(base, method, path, body)
            except (OSError, http.client.HTTPException) as exc:  # that node is down
                error = exc
        assert error is not None
        raise error

    def queue(self, vhost: str, name: str) -> dict[str, Any]:
        """The management API's view of a queue (``members`` and ``online`` for quorum)."""
        path = f"/api/queues/{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(name)}"
        found: dict[str, Any] = self.management("GET", path)
        return found


@pytest.fixture(scope="session")
def rabbitmq_cluster(docker_client: docker.DockerClient, images: ImageNames) -> Iterator[Cluster]:
    """Three RabbitMQ nodes in one cluster, started on first use and removed at the end."""
    try:
        docker_client.images.get(images.rabbitmq)
    except docker.errors.ImageNotFound:
        service_unavailable(f"image {images.rabbitmq}", "not built (run `make images`)")
    cluster = Cluster(docker_client, images.rabbitmq)
    try:
        cluster.start_all()
    except Exception as exc:
        cluster.remove()
        service_unavailable("the RabbitMQ cluster", repr(exc))
    yield cluster
    cluster.remove()


@pytest.fixture
def cluster_vhost(rabbitmq_cluster: Cluster, unique: str) -> Iterator[str]:
    """A fresh vhost on the cluster for one test (every name of the project is fixed)."""
    name = f"t-{unique}"
    rabbitmq_cluster.management("PUT", f"/api/vhosts/{name}")
    rabbitmq_cluster.management(
        "PUT",
        f"/api/permissions/{name}/{USER}",
        {"configure": ".*", "write": ".*", "read": ".*"},
    )
    yield name
    with contextlib.suppress(OSError):
        rabbitmq_cluster.management("DELETE", f"/api/vhosts/{name}")


@pytest.fixture
def cluster_stack(
    rabbitmq_cluster: Cluster,
    cluster_vhost: str,
    database_url: str,
    schema: str,
    unique: str,
    tmp_path: Path,
    docker_client: docker.DockerClient,
    run_image: str,
    request: pytest.FixtureRequest,
) -> Iterator[Stack]:
    """The project's processes of one test, every one given the three nodes' URLs."""
    built = Stack(
        rabbitmq_cluster.url(cluster_vhost),
        database_url,
        schema,
        unique,
        tmp_path,
        docker_client,
        run_image,
        ",".join(rabbitmq_cluster.management_urls()),
    )
    yield built
    built.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(built.dump_logs())
