"""Shared fixtures: real RabbitMQ, PostgreSQL and Docker, started once per session.

Services come from testcontainers on the project's own images (see compose/images/), or from
the environment when they already run:

- ``HD_TEST_AMQP_URL``: an AMQP URL to use instead of starting RabbitMQ;
- ``HD_TEST_DATABASE_URL``: a PostgreSQL URL to use instead of starting PostgreSQL.

When ``CI`` is set, an integration test whose service cannot start fails; elsewhere it is
skipped with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.parse
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from dispatcher.settings import ImageNames

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
# pika (used by testcontainers' readiness probe) logs every refused try while RabbitMQ boots.
logging.getLogger("pika").setLevel(logging.CRITICAL)

#: Every container a test creates carries this label, so that the session removes them all.
TEST_LABEL = "hybrid-dispatcher.test"
SESSION_ID = uuid.uuid4().hex[:12]
IN_CI = bool(os.environ.get("CI"))
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by folder: tests/unit are ``unit``, tests/integration are ``integration``."""
    for item in items:
        parts = Path(str(item.fspath)).relative_to(TESTS).parts
        if parts and parts[0] in ("unit", "integration"):
            item.add_marker(getattr(pytest.mark, parts[0]))


def service_unavailable(what: str, why: object) -> None:
    message = f"{what} is unavailable: {why}"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def labels_for_tests() -> dict[str, str]:
    """Labels for anything a test creates in Docker."""
    return {TEST_LABEL: "1", f"{TEST_LABEL}.session": SESSION_ID}


@pytest.fixture(scope="session")
def images() -> ImageNames:
    return ImageNames.from_env()


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """The real Docker engine; every container labelled by this session is removed at the end."""
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        service_unavailable("the Docker engine", f"{exc} (run `make test`, which starts one)")
    _remove_labelled(client, f"{TEST_LABEL}.session={SESSION_ID}")
    yield client
    _remove_labelled(client, f"{TEST_LABEL}.session={SESSION_ID}")
    client.close()


def _remove_labelled(client: docker.DockerClient, label: str) -> None:
    for container in client.containers.list(
        all=True, filters={"label": label}, ignore_removed=True
    ):
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True, v=True)


def _require_image(client: docker.DockerClient, name: str) -> str:
    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        service_unavailable(f"image {name}", "not built (run `make images`)")
    return name


# ------------------------------------------------------------------------ services


class Certificates:
    """A CA of the session's own, the services' certificate, and client certificates.

    The session's RabbitMQ and PostgreSQL show the server certificate on their TLS listeners
    (beside their plain ones, which the rest of the suite uses)."""

    #: Names the services answer to, as the tests reach them.
    SERVER_NAMES = ("localhost", "127.0.0.1", "::1")

    def __init__(self, directory: Path, extra_names: tuple[str, ...] = ()) -> None:
        import trustme

        self.directory = directory
        self._ca = trustme.CA(organization_name="hybrid-dispatcher tests")
        self.ca = self._write(self._ca.cert_pem, "ca.pem")
        server = self._ca.issue_cert(*dict.fromkeys((*self.SERVER_NAMES, *extra_names)))
        self.server_cert = self._write(server.cert_chain_pems[0], "server.pem")
        self.server_key = self._write(server.private_key_pem, "server-key.pem")

    def _write(self, blob: Any, name: str) -> Path:
        path = self.directory / name
        blob.write_to_path(str(path))
        path.chmod(0o644)  # read by the services' own users in their containers
        return path

    def client(self, name: str) -> tuple[Path, Path]:
        """A client certificate whose common name is ``name``: (certificate, key)."""
        issued = self._ca.issue_cert(name, common_name=name)
        return (
            self._write(issued.cert_chain_pems[0], f"client-{name}.pem"),
            self._write(issued.private_key_pem, f"client-{name}-key.pem"),
        )

    @staticmethod
    def other_ca(directory: Path) -> Path:
        """A CA that signed nothing the services show (for the wrong-CA checks)."""
        import trustme

        path = directory / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(path))
        return path


#: Where the services find the session's certificates.
_TLS_MOUNT = "/run/hd-tls"


def _start_rabbitmq(image: str, certificates: Certificates) -> tuple[Any, str]:
    try:
        from testcontainers.community.rabbitmq import RabbitMqContainer
    except ImportError:  # testcontainers before the community split
        from testcontainers.rabbitmq import RabbitMqContainer

    container = (
        RabbitMqContainer(image, username="hd", password="hd")
        .with_exposed_ports(15672, 5671, 15671)
        .with_volume_mapping(str(certificates.directory), _TLS_MOUNT, "ro")
        .with_env("RABBITMQ_TLS_CERT", f"{_TLS_MOUNT}/server.pem")
        .with_env("RABBITMQ_TLS_KEY", f"{_TLS_MOUNT}/server-key.pem")
        .with_env("RABBITMQ_TLS_CA", f"{_TLS_MOUNT}/ca.pem")
        # Mutual TLS on the AMQPS listener; the plain one stays open for the rest of the suite.
        .with_env("RABBITMQ_TLS_REQUIRE_CLIENT_CERT", "true")
        # The image's health check starts an Erlang VM every 5 s (a fifth of a core, in
        # bursts); testcontainers waits for the broker itself.
        .with_kwargs(labels=labels_for_tests(), healthcheck={"test": ["NONE"]})
    )
    container.start()
    params = container.get_connection_params()
    management = f"http://hd:hd@{params.host}:{container.get_exposed_port(15672)}"
    return container, f"amqp://hd:hd@{params.host}:{params.port}/ {management}"


def _start_postgres(image: str, certificates: Certificates) -> tuple[Any, str]:
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers before the community split
        from testcontainers.postgres import PostgresContainer

    container = (
        PostgresContainer(image, username="hd", password="hd", dbname="hd", driver=None)
        .with_volume_mapping(str(certificates.directory), _TLS_MOUNT, "ro")
        .with_env("POSTGRES_TLS_CERT", f"{_TLS_MOUNT}/server.pem")
        .with_env("POSTGRES_TLS_KEY", f"{_TLS_MOUNT}/server-key.pem")
        .with_kwargs(labels=labels_for_tests())
    )
    container.start()
    return container, container.get_connection_url()


@pytest.fixture(scope="session")
def certificates(
    tmp_path_factory: pytest.TempPathFactory, docker_client: docker.DockerClient
) -> Certificates:
    """The session's CA and certificates (the services' TLS listeners show them)."""
    # Run inside a container, the tests reach the services through the bridge's gateway.
    bridge = docker_client.networks.get("bridge").attrs.get("IPAM", {}).get("Config") or []
    gateways = tuple(c["Gateway"] for c in bridge if c.get("Gateway"))
    override = (os.environ["TC_HOST"],) if os.environ.get("TC_HOST") else ()
    return Certificates(tmp_path_factory.mktemp("tls"), (*gateways, *override))


@pytest.fixture(scope="session")
def _service_starts(
    docker_client: docker.DockerClient, images: ImageNames, certificates: Certificates
) -> Iterator[dict[str, Future[tuple[Any, str]] | str]]:
    """Start RabbitMQ and PostgreSQL side by side (once), unless the environment names them."""
    starts: dict[str, Future[tuple[Any, str]] | str] = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        if url := os.environ.get("HD_TEST_AMQP_URL"):
            starts["rabbitmq"] = f"{url} {os.environ.get('HD_TEST_AMQP_MANAGEMENT_URL', '')}"
        else:
            _require_image(docker_client, images.rabbitmq)
            starts["rabbitmq"] = pool.submit(_start_rabbitmq, images.rabbitmq, certificates)
        if url := os.environ.get("HD_TEST_DATABASE_URL"):
            starts["postgres"] = url
        else:
            _require_image(docker_client, images.postgres)
            starts["postgres"] = pool.submit(_start_postgres, images.postgres, certificates)
        yield starts
        for start in starts.values():
            if isinstance(start, Future) and start.exception() is None:
                start.result()[0].stop()


def _service_url(starts: dict[str, Future[tuple[Any, str]] | str], name: str) -> str:
    start = starts[name]
    if isinstance(start, str):
        return start
    try:
        return start.result(timeout=240)[1]
    except Exception as exc:
        service_unavailable(name, repr(exc))
        raise


@pytest.fixture(scope="session")
def broker(_service_starts: dict[str, Future[tuple[Any, str]] | str]) -> tuple[str, str]:
    """(AMQP URL, management URL or "") of the RabbitMQ broker shared by the session."""
    amqp, _, management = _service_url(_service_starts, "rabbitmq").partition(" ")
    return amqp, management.strip()


@pytest.fixture(scope="session")
def amqp_url(broker: tuple[str, str]) -> str:
    """URL of a real RabbitMQ broker shared by the session (its default vhost)."""
    return broker[0]


@pytest.fixture
def vhost_url(broker: tuple[str, str], unique: str) -> Iterator[str]:
    """An AMQP URL on a fresh virtual host of the shared broker, deleted after the test.

    Every exchange and queue name of the project is fixed, so tests that run the real
    components isolate themselves by virtual host.
    """
    amqp, management = broker
    if not management:
        yield amqp  # no management API given: share the default vhost
        return
    from tests.support import management_request

    name = f"t-{unique}"
    management_request(management, "PUT", f"/api/vhosts/{name}")
    user = urllib.parse.urlsplit(amqp).username or ""
    management_request(
        management,
        "PUT",
        f"/api/permissions/{name}/{user}",
        {"configure": ".*", "write": ".*", "read": ".*"},
    )
    yield f"{amqp.rstrip('/')}/{name}"
    management_request(management, "DELETE", f"/api/vhosts/{name}")


@pytest.fixture(scope="session")
def database_url(_service_starts: dict[str, Future[tuple[Any, str]] | str]) -> str:
    """URL of a real PostgreSQL database shared by the session."""
    return _service_url(_service_starts, "postgres")


@pytest.fixture(scope="session")
def run_image(docker_client: docker.DockerClient, images: ImageNames) -> str:
    """The tiny run image (busybox), built locally."""
    return _require_image(docker_client, images.run_tiny)


@pytest.fixture
def unique() -> str:
    """A short unique suffix for names (queues, schemas, containers) of one test."""
    return uuid.uuid4().hex[:10]


class TlsEndpoints:
    """The TLS listeners of the session's own services (see ``Certificates``)."""

    def __init__(self, starts: dict[str, Future[tuple[Any, str]] | str]) -> None:
        rabbitmq, postgres = starts["rabbitmq"], starts["postgres"]
        if not isinstance(rabbitmq, Future) or not isinstance(postgres, Future):
            service_unavailable("the TLS listeners", "the services come from the environment")
            raise AssertionError  # unreachable: the call above fails or skips
        broker = _started(rabbitmq)
        self.host = broker.get_container_host_ip()
        self.amqps_port = int(broker.get_exposed_port(5671))
        self.management_port = int(broker.get_exposed_port(15671))
        #: The database's plain URL (add sslmode=, sslrootcert=... to it).
        self.postgres_url = _service_url(starts, "postgres")

    def amqps_url(self, user: str, password: str, vhost: str, **query: str) -> str:
        """An AMQPS URL of the session's broker (``vhost`` as in its AMQP URL's path)."""
        credentials = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
        url = f"amqps://{credentials}@{self.host}:{self.amqps_port}/{vhost}"
        return f"{url}?{urllib.parse.urlencode(query)}" if query else url


def _started(start: Future[tuple[Any, str]]) -> Any:
    try:
        return start.result(timeout=240)[0]
    except Exception as exc:
        service_unavailable("a service", repr(exc))
        raise


@pytest.fixture(scope="session")
def tls_endpoints(_service_starts: dict[str, Future[tuple[Any, str]] | str]) -> TlsEndpoints:
    """Where the session's services listen for TLS (fails or skips if they came from outside)."""
    return TlsEndpoints(_service_starts)
