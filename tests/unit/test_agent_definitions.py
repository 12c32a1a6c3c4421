"""A location's definitions always travel: cut to fit one message, the least useful first."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from schemas import (
    MAX_MESSAGE_BYTES,
    LocationFailed,
    LocationLoaded,
    LocationSpec,
    encode,
    event_decoder,
)
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

    async def ask_why(self, server: CodeServer, path: str) -> tuple[object, str]:
        assert path == "/definitions"
        return self.definitions, ""


class Published:
    def __init__(self) -> None:
        self.events: list[object] = []

    async def publish(self, exchange: str, routing_key: str, event: object) -> None:
        self.events.append(event)


async def test_a_location_with_the_most_and_largest_definitions_still_loads() -> None:
    # The most jobs, with the largest descriptions and schemas an answer of at most
    # MAX_ANSWER_BYTES (32 MiB) can hold: 1,000 jobs of 16 KiB + 14 KiB, about 30 MiB.
    servers: Any = Servers({"jobs": described(1000, 16 * KIB, 14 * KIB)})
    published: Any = Published()
    connection: Any = None
    keeper = LocationKeeper(servers, connection, published, "a1", ("default",))
    server = CodeServer("f" * 64, "etl", 1, True, "10.0.0.2", None)
    spec = LocationSpec(name="etl", image="etl:1")
    assert await keeper._report_loaded(spec, server) == ""
    [event] = published.events
    assert isinstance(event, LocationLoaded)
    sent = travels(event)
    # Every job is there, so that submissions to any of them are accepted.
    assert [job.name for job in sent.jobs] == [f"job-{i:04d}" for i in range(1000)]


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ({"jobs": {"a": 1}}, "jobs are not a list"),
        ({"jobs": "all of them"}, "jobs are not a list"),
        ([], "not a JSON object"),
    ],
)
async def test_definitions_that_cannot_be_read_say_why(answer: object, why: str) -> None:
    published: Any = Published()
    keeper = LocationKeeper(Servers(answer), None, published, "a1", ("default",))  # type: ignore[arg-type]
    server = CodeServer("f" * 64, "etl", 1, True, "10.0.0.2", None)
    assert why in await keeper._report_loaded(LocationSpec(name="etl", image="etl:1"), server)
    assert published.events == []


def test_only_strings_are_taken_for_names_and_descriptions_and_a_name_twice_keeps_its_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    deep: object = "x"
    for _ in range(5000):  # str() of it, on a loop already deep, raised RecursionError
        deep = [deep]
    jobs = [
        {"name": "a", "description": deep},
        {"name": "a", "description": "the second a"},
        {"name": deep},
        {"name": 7},
        {"name": "b", "description": b"bytes".decode() + "ok"},
        "not a job",
    ]
    found = job_definitions("etl", jobs)
    assert [(j.name, j.description) for j in found] == [("a", ""), ("b", "bytesok")]
    # One line for all that was left out.
    [line] = [r for r in caplog.records if "left out" in r.getMessage()]
    assert "4 job(s) left out" in line.getMessage()


def test_past_the_most_jobs_the_rest_is_counted_not_read(caplog: pytest.LogCaptureFixture) -> None:
    jobs: list[object] = [{"name": f"j{i}"} for i in range(1000)]
    jobs += [{"name": "!bad"}] * 500_000
    found = job_definitions("etl", jobs)
    assert len(found) == 1000
    lines = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert lines == ["location etl: 500000 job(s) past the first 1000 left out"]


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


class _Runtime:
    def __init__(self) -> None:
        self.removed: list[str] = []

    async def output_tail(self, container_id: str, lines: int, redactor: object) -> tuple[str, ...]:
        return ("serving on :8080",)

    async def remove(self, container_id: str) -> None:
        self.removed.append(container_id)


class _HealthyWithoutDefinitions:
    """A code server that answers /health and never gives its definitions."""

    def __init__(self) -> None:
        self.runtime = _Runtime()

    async def ask(self, server: CodeServer, path: str) -> object:
        return {"ok": True} if path == "/health" else None

    async def ask_why(self, server: CodeServer, path: str) -> tuple[object, str]:
        return None, "/definitions: HTTP 500"


async def test_a_healthy_server_without_definitions_fails_its_location_in_words_in_time() -> None:
    servers: Any = _HealthyWithoutDefinitions()
    published: Any = Published()
    keeper = LocationKeeper(servers, None, published, "a1", ("default",), startup_timeout_s=0.2)  # type: ignore[arg-type]
    spec = LocationSpec(name="etl", image="etl:1")
    # Adopted after the agent's restart, it has run for hours: one lost answer, or three in
    # a row, do not give it up before this keeper has known it for a startup's time.
    adopted = CodeServer("b" * 64, "etl", 1, True, "10.0.0.3", time.time() - 7200)
    for _ in range(3):
        await keeper._keep(spec, [adopted])
    assert published.events == []
    await asyncio.sleep(0.3)
    await keeper._keep(spec, [adopted])
    [failed] = published.events
    assert isinstance(failed, LocationFailed)
    assert failed.message == "code server has no definitions to give: /definitions: HTTP 500"
    assert failed.output_tail == ("serving on :8080",)
    assert servers.runtime.removed == ["b" * 64]


async def test_definitions_without_a_jobs_list_load_a_location_of_no_jobs() -> None:
    published: Any = Published()
    keeper = LocationKeeper(Servers({}), None, published, "a1", ("default",))  # type: ignore[arg-type]
    server = CodeServer("f" * 64, "etl", 1, True, "10.0.0.2", None)
    assert await keeper._report_loaded(LocationSpec(name="etl", image="etl:1"), server) == ""
    [event] = published.events
    assert isinstance(event, LocationLoaded) and event.jobs == ()
