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


def _start_rabbitmq(image: str) -> tuple[Any, str]:
    try:
        from testcontainers.community.rabbitmq import RabbitMqContainer
    except ImportError:  # testcontainers before the community split
        from testcontainers.rabbitmq import RabbitMqContainer

    container = (
        RabbitMqContainer(image, username="hd", password="hd")
        .with_exposed_ports(15672)
        .with_kwargs(labels=labels_for_tests())
    )
    container.start()
    params = container.get_connection_params()
    management = f"http://hd:hd@{params.host}:{container.get_exposed_port(15672)}"
    return container, f"amqp://hd:hd@{params.host}:{params.port}/ {management}"


def _start_postgres(image: str) -> tuple[Any, str]:
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers before the community split
        from testcontainers.postgres import PostgresContainer

    container = PostgresContainer(
        image, username="hd", password="hd", dbname="hd", driver=None
    ).with_kwargs(labels=labels_for_tests())
    container.start()
    return container, container.get_connection_url()


@pytest.fixture(scope="session")
def _service_starts(
    docker_client: docker.DockerClient, images: ImageNames
) -> Iterator[dict[str, Future[tuple[Any, str]] | str]]:
    """Start RabbitMQ and PostgreSQL side by side (once), unless the environment names them."""
    starts: dict[str, Future[tuple[Any, str]] | str] = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        if url := os.environ.get("HD_TEST_AMQP_URL"):
            starts["rabbitmq"] = f"{url} {os.environ.get('HD_TEST_AMQP_MANAGEMENT_URL', '')}"
        else:
            _require_image(docker_client, images.rabbitmq)
            starts["rabbitmq"] = pool.submit(_start_rabbitmq, images.rabbitmq)
        if url := os.environ.get("HD_TEST_DATABASE_URL"):
            starts["postgres"] = url
        else:
            _require_image(docker_client, images.postgres)
            starts["postgres"] = pool.submit(_start_postgres, images.postgres)
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
    user = urllib.parse.urlsplit(amqp).username or "guest"
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
