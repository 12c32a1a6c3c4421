"""The SDK: jobs, config checks, progress frames, the code server and the run command."""

from __future__ import annotations

import datetime
import io
import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from hd_sdk import ConfigError, Context, Registry, job, validate_config
from hd_sdk.config import MAX_PROBLEMS
from hd_sdk.config import problems as problems_of
from hd_sdk.frames import encode_frame, parse_frame
from hd_sdk.jobs import Job, load_registry
from hd_sdk.server import launch_spec, make_server

ROOT = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": f"{ROOT / 'sdk'}:{ROOT / 'examples'}", "PATH": "/usr/bin:/bin"}


def test_jobs_are_declared_with_their_definitions() -> None:
    registry = Registry()

    @job(description="Adds.", config_schema={"type": "object"}, registry=registry)
    def add(context: Context, config: dict[str, int]) -> None:
        pass

    assert registry.definitions() == [
        {"name": "add", "description": "Adds.", "config_schema": {"type": "object"}}
    ]
    with pytest.raises(ValueError, match="declared twice"):
        job(name="add", registry=registry)(add)
    with pytest.raises(ValueError, match="unsupported keyword"):
        job(name="other", config_schema={"patternProperties": {}}, registry=registry)(add)
    with pytest.raises(KeyError, match="no job 'nope'"):
        registry.get("nope")


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": ["string", "null"]}, "unknown type"),
        ({"properties": "x"}, "properties must be an object"),
        ({"minimum": "5"}, "minimum must be a number"),
        ({"maximum": True}, "maximum must be a number"),
        ({"enum": 5}, "enum must be a list"),
        ({"required": [1]}, "required must list names"),
        ({"maxLength": -1}, "maxLength must not be negative"),
        ({"items": "x"}, "must be an object"),
        ({"additionalProperties": {}}, "additionalProperties must be true or false"),
        ({"properties": {"a": {"minLength": 1.5}}}, "minLength must be a whole number"),
    ],
)
def test_a_schema_with_a_value_of_the_wrong_kind_is_refused_when_the_job_is_declared(
    schema: dict[str, object], words: str
) -> None:
    """Not found wrong by a run's config later, where it broke the check itself (a list as
    ``type`` is not hashable, a string ``minimum`` does not compare with a number)."""

    def body(context: Context, config: dict[str, object]) -> None:
        pass

    with pytest.raises(ValueError, match=words):
        job(name="bad", config_schema=schema, registry=Registry())(body)


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "count": {"type": "integer", "minimum": 1, "maximum": 10},
        "mode": {"enum": ["fast", "slow"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({}, "config.name is required"),
        ({"name": ""}, "config.name must be at least 1 characters"),
        ({"name": "x", "count": 0}, "config.count must be at least 1"),
        ({"name": "x", "count": True}, "config.count must be of type integer"),
        ({"name": "x", "mode": "medium"}, "config.mode must be one of"),
        ({"name": "x", "tags": ["a", 1]}, "config.tags[1] must be of type string"),
        ({"name": "x", "extra": 1}, "config.extra is not a known field"),
        ([], "config must be of type object"),
    ],
)
def test_a_config_is_checked_naming_each_problem(config: object, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_config(SCHEMA, config)
    assert any(problem in p for p in caught.value.problems)


def test_a_valid_config_passes() -> None:
    validate_config(SCHEMA, {"name": "x", "count": 3, "mode": "fast", "tags": ["a"]})


def test_progress_is_written_as_frames() -> None:
    out = io.StringIO()
    context = Context("demo", stream=out)
    with context.step("load"):
        context.log("loading")
    context.metadata(rows=3)
    with pytest.raises(RuntimeError), context.step("explode"):
        raise RuntimeError("boom")
    frames = [parse_frame(line) for line in out.getvalue().splitlines()]
    assert [f["event"] for f in frames if f] == [
        "step_started",
        "log",
        "step_finished",
        "metadata",
        "step_started",
        "step_finished",
    ]
    assert frames[2]["status"] == "succeeded"  # type: ignore[index]
    assert frames[-1]["status"] == "failed"  # type: ignore[index]
    assert frames[3]["values"] == {"rows": 3}  # type: ignore[index]
    assert parse_frame("an ordinary line") is None
    assert parse_frame("\x02hd1 {broken json") is None


def run_sdk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hd_sdk", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )


def test_a_job_runs_and_reports_its_steps() -> None:
    result = run_sdk("run", "--module", "hello_location", "--job", "count", "--config", '{"to": 3}')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line for line in lines if parse_frame(line) is None] == ["1", "2", "3"]
    steps = [f["step"] for f in map(parse_frame, lines) if f and f["event"] == "step_finished"]
    assert steps == ["count-1", "count-2", "count-3"]


def test_a_failing_job_exits_1_and_a_bad_config_exits_2() -> None:
    failed = run_sdk("run", "--module", "hello_location", "--job", "broken")
    assert failed.returncode == 1
    assert "this job always fails" in failed.stderr
    bad = run_sdk("run", "--module", "hello_location", "--job", "hello", "--config", "{}")
    assert bad.returncode == 2
    assert "config.name is required" in bad.stderr
    unknown = run_sdk("run", "--module", "hello_location", "--job", "nope")
    assert unknown.returncode == 2
    assert "no job 'nope'" in unknown.stderr


@pytest.fixture
def server() -> Iterator[str]:
    registry = load_registry("hello_location")
    httpd = make_server(registry, "hello_location", 0, host="127.0.0.1")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def call(url: str, body: object = None) -> tuple[int, dict[str, object]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_code_server_answers_health_definitions_and_launch_specs(server: str) -> None:
    assert call(f"{server}/health") == (200, {"status": "ok", "jobs": 3})
    status, definitions = call(f"{server}/definitions")
    assert status == 200
    assert [j["name"] for j in definitions["jobs"]] == ["broken", "count", "hello"]  # type: ignore[index]
    status, spec = call(f"{server}/launch-spec", {"job": "hello", "config": {"name": "Ada"}})
    assert status == 200
    assert spec["command"][-4:] == ["--job", "hello", "--config", '{"name":"Ada"}']  # type: ignore[index]
    status, error = call(f"{server}/launch-spec", {"job": "hello", "config": {"name": 3}})
    assert (status, error) == (400, {"error": "config.name must be of type string, got int"})
    status, error = call(f"{server}/launch-spec", {"job": "nope", "config": {}})
    assert status == 400
    assert "no job 'nope'" in str(error["error"])


def raw_post(server: str, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """A POST to /launch-spec written by hand (a Content-Length of one's choosing)."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as peer:
        peer.sendall(f"POST /launch-spec HTTP/1.1\r\nHost: x\r\n{head}\r\n\r\n".encode() + body)
        answer = b""
        while chunk := peer.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2]


def test_the_code_server_refuses_bodies_it_should_not_read_or_cannot_use(server: str) -> None:
    """A negative length read until the peer hung up; a huge one was a MemoryError; a body
    that is no object was a 500. Each is now a 4xx in words."""
    for length in ("-1", str(10**14), "x"):
        status, body = raw_post(server, f"Content-Length: {length}")
        assert status == 413, (length, body)
    for request in ([], None, {"job": []}, {"config": {}}):
        assert call(f"{server}/launch-spec", request if request is not None else "null")[0] == 400
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    assert raw_post(server, f"Content-Length: {len(deep)}", deep)[0] == 400


def test_what_json_cannot_carry_is_refused_in_words() -> None:
    """A NaN passed every minimum and maximum; a schema that is no JSON failed /definitions
    with a dropped connection; metadata with keys of mixed kinds failed the job."""
    nan = run_sdk("run", "--module", "hello_location", "--job", "count", "--config", '{"to": NaN}')
    assert nan.returncode == 2
    assert "NaN, which JSON has no number for" in nan.stderr
    assert problems_of({"type": "number", "minimum": 1}, float("nan")) == [
        "config must be a finite number, got nan"
    ]
    for schema in ({"default": datetime.date(2026, 1, 1)}, {"minimum": float("inf")}):
        with pytest.raises(ValueError, match=r"schema is not JSON"):
            job(name="bad", config_schema=schema, registry=Registry())(lambda c, v: None)
    assert parse_frame(encode_frame("metadata", values={1: "a", "b": 2})) == {
        "event": "metadata",
        "values": {"1": "a", "b": 2},
    }
    assert parse_frame('\x02hd1 {"event": []}') is None


def test_the_run_command_says_what_is_wrong_in_one_line() -> None:
    for args, words in [
        (("--module", "", "--job", "x"), "Empty module name"),
        (("--module", "hello_location", "--job", "count", "--config", "[" * 30_000), "too deep"),
    ]:
        done = run_sdk("run", *args)
        assert done.returncode == 2, done.stderr
        assert words in done.stderr
        assert "Traceback" not in done.stderr


def test_a_config_far_off_its_schema_lists_the_first_problems_and_a_long_enum_is_counted() -> None:
    schema = {
        "type": "object",
        "properties": {"xs": {"type": "array", "items": {"enum": list(range(9990))}}},
    }
    found = problems_of(schema, {"xs": [-1] * 9999})
    assert len(found) == MAX_PROBLEMS
    assert found[0] == "config.xs[0] must be one of the 9990 values its schema lists"
    assert problems_of(schema, {"xs": list(range(9990))}) == []
    # A short enum is quoted; unhashable options are compared as they are.
    short = {"enum": ["a", [1, 2], {"k": 1}]}
    assert problems_of(short, [1, 2]) == []
    assert problems_of(short, {"k": 1}) == []
    assert problems_of(short, "b") == ["config must be one of ['a', [1, 2], {'k': 1}]"]


def test_a_launch_spec_s_config_is_as_short_as_json_goes() -> None:
    registry = Registry()
    registry.add(Job("accents", lambda context, config: None))
    spec = launch_spec(registry, "jobs", "accents", {"s": "é" * 3, "n": [1, 2]})
    assert spec["command"][-1] == '{"s":"ééé","n":[1,2]}'


def test_a_description_that_is_no_string_is_refused_when_declared() -> None:
    with pytest.raises(ValueError, match="description must be a string"):
        Registry().add(Job("b", lambda context, config: None, description=b"x"))  # type: ignore[arg-type]
