"""The agent installed on its own (`hybrid-dispatcher[agent]`, the agent image) does its job.

The agent runs in a container of the agent image (built by `make images` from the project's
wheelhouse with only the `agent` extra), not from the host's virtualenv: asyncpg is not
installed there, and Python's import log (``-X importtime``) of the agent's whole life shows no
control-plane module. The agent reaches the host's Docker engine through the mounted socket
and the test's broker through the host's network; the control plane runs on the host as in the
other tests.
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
from collections.abc import Iterator

import docker
import docker.errors
import pytest
from docker.models.containers import Container

from dispatcher.settings import ImageNames
from dispatcher.states import RunState
from dispatcher.store import Database
from tests.conftest import labels_for_tests, service_unavailable
from tests.integration.conftest import Stack
from tests.integration.test_dispatch import wait_for_state
from tests.support import eventually
from worker_agent.containers import LABEL_AGENT, LABEL_ATTEMPT, LABEL_RUN

#: ``python -X importtime`` writes one line per module imported, to stderr.
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$", re.MULTILINE)


@pytest.fixture(scope="module")
def agent_image(docker_client: docker.DockerClient, images: ImageNames) -> str:
    try:
        docker_client.images.get(images.agent)
    except docker.errors.ImageNotFound:
        service_unavailable(f"image {images.agent}", "not built (run `make images`)")
    return images.agent


def _docker_socket() -> str:
    """The host path of the Docker engine's socket, to mount into the agent's container."""
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        return urllib.parse.urlsplit(host).path
    if host:
        pytest.skip(f"DOCKER_HOST={host}: this test mounts the engine's Unix socket")
    return "/var/run/docker.sock"


@contextlib.contextmanager
def _removed_after(container: Container) -> Iterator[Container]:
    try:
        yield container
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)


def _in_image(docker_client: docker.DockerClient, image: str, *command: str) -> tuple[int, str]:
    """Run ``command`` in a throwaway container of ``image``: (exit code, its output)."""
    container = docker_client.containers.create(image, list(command), labels=labels_for_tests())
    with _removed_after(container):
        container.start()
        status = container.wait(timeout=60)
        return int(status["StatusCode"]), container.logs().decode(errors="replace")


def _imported(stderr: str) -> set[str]:
    return set(IMPORT_LINE.findall(stderr))


async def test_the_agent_image_has_no_control_plane_and_runs_a_container(
    stack: Stack, store: Database, docker_client: docker.DockerClient, agent_image: str
) -> None:
    # Installed without the control plane's dependencies.
    code, output = _in_image(docker_client, agent_image, "python", "-c", "import asyncpg")
    assert code != 0, output
    assert "ModuleNotFoundError: No module named 'asyncpg'" in output
    code, output = _in_image(docker_client, agent_image, "python", "-c", "import docker, aio_pika")
    assert code == 0, output

    await stack.start_control_plane()
    agent_id = stack.agent_id()
    stack.agent_ids.add(agent_id)  # the stack removes the run containers it labelled
    socket = _docker_socket()
    agent = docker_client.containers.run(
        agent_image,
        [
            "python",
            "-X",
            "importtime",
            "-m",
            "worker_agent",
            "run",
            "--queue",
            stack.queue,
            "--agent-id",
            agent_id,
            "--heartbeat-interval",
            "0.5",
            "--keep-finished",
            "--log-level",
            "DEBUG",
            "--metrics-port",
            "0",
        ],
        # The broker only: the agent is given no database.
        environment={"HD_AMQP_URL": stack.amqp_url},
        network_mode="host",
        volumes={socket: {"bind": "/var/run/docker.sock", "mode": "rw"}},
        # The image runs as an unprivileged user: the socket's group lets it reach the engine.
        group_add=[str(os.stat(socket).st_gid)],
        labels=labels_for_tests(),
        name=f"hd-agent-{agent_id}",
        detach=True,
    )
    with _removed_after(agent):
        try:

            async def heard_of() -> bool:
                agent.reload()
                assert agent.status in ("created", "running"), agent.logs().decode()[-3000:]
                return any(a["agent_id"] == agent_id for a in await store.agents.all())

            await eventually(heard_of, 60, what=f"a heartbeat of {agent_id} in PostgreSQL")

            async with stack.client() as client:
                run_id = await client.submit(
                    stack.run_image,
                    ["sh", "-c", "echo hello from the agent image"],
                    queue=stack.queue,
                )
            run = await wait_for_state(store, run_id, RunState.SUCCESS, RunState.FAILURE)
            assert run.state == RunState.SUCCESS, run
            assert run.exit_code == 0
            assert run.agent_id == agent_id
            assert run.output_tail == ["hello from the agent image"]

            # The run's container (kept: --keep-finished) was made by that agent.
            containers = stack.containers_of(run_id)
            assert [c.id for c in containers] == [run.container_id]
            labels = containers[0].labels
            assert labels[LABEL_AGENT] == agent_id
            assert labels[LABEL_RUN] == str(run_id)
            assert labels[LABEL_ATTEMPT] == "1"
            assert stack.run_image in containers[0].image.tags
        finally:
            agent.stop(timeout=30)  # SIGTERM: an orderly shutdown
            exit_code = int(agent.wait(timeout=60)["StatusCode"])
            stderr = agent.logs(stdout=False, stderr=True).decode(errors="replace")
            (stack.logs / f"agent-{agent_id}-image.log").write_text(stderr)
            print(f"==== the agent's container\n{stderr[-4000:]}")  # shown when the test fails

    assert exit_code == 0, stderr[-3000:]
    # Every module the agent imported over its life, from start to exit.
    imported = _imported(stderr)
    assert {"worker_agent.launcher", "worker_agent.agent", "aio_pika", "docker"} <= imported
    control_plane = sorted(
        name for name in imported if name.split(".")[0] in ("dispatcher", "asyncpg")
    )
    assert control_plane == [], control_plane
