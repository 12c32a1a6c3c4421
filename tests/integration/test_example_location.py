"""The example code location's image: a code server, and runs from its launch specs."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import docker
import pytest

from dispatcher.settings import ImageNames
from hd_sdk.frames import parse_frame
from tests.conftest import labels_for_tests
from tests.support import eventually


@pytest.fixture
def location_image(docker_client: docker.DockerClient, images: ImageNames) -> str:
    try:
        docker_client.images.get(images.example_location)
    except docker.errors.ImageNotFound:
        pytest.fail(f"{images.example_location} is not built (run `make images`)")
    return images.example_location


@pytest.fixture
def code_server(docker_client: docker.DockerClient, location_image: str) -> Iterator[str]:
    container = docker_client.containers.run(location_image, labels=labels_for_tests(), detach=True)
    try:
        container.reload()
        address = container.attrs["NetworkSettings"]["IPAddress"]
        yield f"http://{address}:8080"
    finally:
        container.remove(force=True)


def get(url: str, body: object = None) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_the_example_location_serves_definitions_and_runs_its_jobs(
    code_server: str, docker_client: docker.DockerClient, location_image: str
) -> None:
    async def healthy() -> bool:
        try:
            return get(f"{code_server}/health")[0] == 200
        except OSError:
            return False

    await eventually(healthy, 60, what="the code server answering")
    status, definitions = get(f"{code_server}/definitions")
    assert status == 200
    assert {j["name"] for j in definitions["jobs"]} == {"hello", "count", "broken"}  # type: ignore[index]

    status, spec = get(f"{code_server}/launch-spec", {"job": "count", "config": {"to": 2}})
    assert status == 200
    run = docker_client.containers.run(
        location_image,
        spec["command"],
        labels=labels_for_tests(),
        detach=True,  # type: ignore[index]
    )
    try:
        assert run.wait(timeout=60)["StatusCode"] == 0
        lines = run.logs().decode().split("\n")
    finally:
        run.remove(force=True)
    frames = [f for f in map(parse_frame, lines) if f]
    assert [f["step"] for f in frames if f["event"] == "step_finished"] == ["count-1", "count-2"]
    assert [line for line in lines if line and parse_frame(line) is None] == ["1", "2"]

    status, error = get(f"{code_server}/launch-spec", {"job": "hello", "config": {}})
    assert status == 400
    assert error == {"error": "config.name is required"}
