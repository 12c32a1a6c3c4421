"""A location's definitions always travel: cut to fit one message, the least useful first."""

from __future__ import annotations

from typing import Any

import pytest

from schemas import MAX_MESSAGE_BYTES, LocationLoaded, LocationSpec, encode, event_decoder
from worker_agent.code_servers import CodeServer
from worker_agent.definitions import SHORT_DESCRIPTION, fit_to_message, job_definitions
from worker_agent.locations import LocationKeeper

pytestmark = pytest.mark.unit

KIB = 1024


def schema(size: int) -> dict[str, Any]:
    """A JSON Schema encoding to about ``size`` bytes."""
    return {"type": "object", "description": "s" * (size - 40)}


def described(count: int, description_bytes: int, schema_bytes: int) -> list[dict[str, Any]]:
    """What a code server answers on /definitions, for ``count`` jobs."""
    return [
        {
            "name": f"job-{i:04d}",
            "description": "d" * description_bytes,
            "config_schema": schema(schema_bytes),
        }
        for i in range(count)
    ]


def loaded(jobs: list[dict[str, Any]]) -> LocationLoaded:
    return LocationLoaded(
        location="etl",
        generation=1,
        agent_id="a1",
        container_id="f" * 64,
        jobs=job_definitions("etl", jobs),
    )


def travels(event: LocationLoaded) -> LocationLoaded:
    payload = encode(event)
    assert len(payload) <= MAX_MESSAGE_BYTES
    decoded = event_decoder().decode(payload)
    assert decoded == event
    assert isinstance(decoded, LocationLoaded)
    return decoded


class Servers:
    """The code servers' side the keeper uses to report a location loaded."""

    def __init__(self, definitions: object) -> None:
        self.definitions = definitions

    async def ask(self, server: CodeServer, path: str) -> object:
        assert path == "/definitions"
        return self.definitions


class Published:
    def __init__(self) -> None:
        self.events: list[object] = []

    async def publish(self, exchange: str, routing_key: str, event: object) -> None:
        self.events.append(event)


async def test_a_location_with_the_most_and_largest_definitions_still_loads() -> None:
    servers: Any = Servers({"jobs": described(1000, 16 * KIB, 60 * KIB)})
    published: Any = Published()
    connection: Any = None
    keeper = LocationKeeper(servers, connection, published, "a1", ("default",))
    server = CodeServer("f" * 64, "etl", 1, True, "10.0.0.2", None)
    spec = LocationSpec(name="etl", image="etl:1")
    assert await keeper._report_loaded(spec, server)
    [event] = published.events
    assert isinstance(event, LocationLoaded)
    sent = travels(event)
    # Every job is there, so that submissions to any of them are accepted.
    assert [job.name for job in sent.jobs] == [f"job-{i:04d}" for i in range(1000)]


def test_descriptions_are_cut_before_any_config_schema_is_left_out() -> None:
    event = loaded(described(1000, 16 * KIB, 200))
    assert len(encode(event)) > MAX_MESSAGE_BYTES
    sent = travels(fit_to_message(event))
    assert len(sent.jobs) == 1000
    assert all(job.config_schema == schema(200) for job in sent.jobs)
    # As many descriptions as needed are cut, and no more.
    cut = [job for job in sent.jobs if len(job.description) < 16 * KIB]
    assert 0 < len(cut) < 1000
    assert all(len(job.description.encode()) <= SHORT_DESCRIPTION for job in cut)
    assert all(job.description.startswith("d") for job in sent.jobs)


def test_config_schemas_are_left_out_the_largest_first_once_descriptions_are_gone() -> None:
    small = described(500, 4 * KIB, 100)
    large = described(500, 4 * KIB, 60 * KIB)
    for i, job in enumerate(large):
        job["name"] = f"large-{i:04d}"
    sent = travels(fit_to_message(loaded(small + large)))
    assert len(sent.jobs) == 1000
    assert all(job.description == "" for job in sent.jobs)
    by_name = {job.name: job for job in sent.jobs}
    # The small schemas are all kept; as many large ones as fit.
    assert all(by_name[job["name"]].config_schema == schema(100) for job in small)
    kept = [job for job in large if by_name[job["name"]].config_schema]
    assert 0 < len(kept) < len(large)


def test_definitions_that_fit_are_sent_as_they_are() -> None:
    event = loaded(described(10, 16 * KIB, 60 * KIB))
    assert fit_to_message(event) is event
    travels(event)


def test_jobs_are_left_out_only_when_nothing_else_is_left_to_cut() -> None:
    event = loaded([{"name": f"job-{i:04d}"} for i in range(100)])
    budget = len(encode(event)) - 10
    fitted = fit_to_message(event, budget)
    assert len(encode(fitted)) <= budget
    assert [job.name for job in fitted.jobs] == [job.name for job in event.jobs[:-1]]
