"""The command-line entry points: started as a user starts them (a process of their own), and
their commands' answers to bad input (in-process, through the same Typer applications)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dispatcher.cli import app as dispatcher_app
from schemas import ALL_MESSAGES, SCHEMA_VERSION
from worker_agent.cli import app as agent_app

# The commands read HD_* variables; the tests decide every input themselves.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("HD_")}


def run_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=CLEAN_ENV,
    )


def invoke(app: object, *args: str) -> subprocess.CompletedProcess[str]:
    """A command run in this process, its outcome shaped as a process's."""
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("HD_")}
    result = CliRunner().invoke(app, list(args), env=unset)  # type: ignore[arg-type]
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return invoke(dispatcher_app, *args)


def run_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return invoke(agent_app, *args)


def test_dispatcher_help_lists_its_commands() -> None:
    result = run_module("dispatcher", "--help")
    assert result.returncode == 0
    assert "schemas" in result.stdout


def test_dispatcher_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("dispatcher 0.")


def test_worker_agent_help_and_version() -> None:
    result = run_module("worker_agent", "--help")
    assert result.returncode == 0
    assert "check" in result.stdout
    result = run_module("worker_agent", "--version")
    assert result.returncode == 0
    assert result.stdout.startswith("worker-agent 0.")


def test_schemas_export_writes_one_valid_schema_per_message(tmp_path: Path) -> None:
    out = tmp_path / "schemas"
    result = run("schemas", "export", str(out))
    assert result.returncode == 0, result.stderr
    for message_type in ALL_MESSAGES:
        kind = message_type.__struct_config__.tag
        schema = json.loads((out / f"{kind}.json").read_text())
        assert schema["$defs"][kind]["properties"]["kind"] == {"enum": [kind]}
        # A higher version is refused by every consumer: the schema says so.
        version = schema["$defs"][kind]["properties"]["schema_version"]
        assert version["maximum"] == SCHEMA_VERSION
        assert f"schema_version {SCHEMA_VERSION}" in schema["$comment"]
    assert (out / "union-Request.json").exists()


def test_schemas_export_refuses_a_file_as_directory(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    result = run("schemas", "export", str(target))
    assert result.returncode == 2
    assert "not a directory" in result.stderr


@pytest.mark.parametrize("args", [("schemas",), ("no-such-command",)])
def test_bad_usage_explains(args: tuple[str, ...]) -> None:
    result = run(*args)
    assert result.returncode != 0
    assert "Usage" in result.stdout + result.stderr


def test_schemas_export_refuses_an_empty_path_and_says_why_it_cannot_write(
    tmp_path: Path,
) -> None:
    """An empty path wrote every schema into the working directory; one under a file was a
    traceback."""
    result = run("schemas", "export", "")
    assert result.returncode == 2
    assert "give a directory to write into" in result.stderr
    (tmp_path / "file").write_text("x")
    result = run("schemas", "export", str(tmp_path / "file" / "sub"))
    assert result.returncode == 1
    assert "cannot write into" in result.stderr and "Not a directory" in result.stderr


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (("--config", '{"to": 3}'), "--config goes with --location and --job"),
        (("--ready-check", " "), "--ready-check is empty"),
    ],
)
def test_submit_refuses_options_it_would_ignore(extra: tuple[str, ...], words: str) -> None:
    result = run("submit", "--amqp-url", "amqp://127.0.0.1:1/", "--image", "x", *extra, "--", "t")
    assert result.returncode == 2
    assert words in result.stderr


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ('{"a": "\\ud800"}', "no valid Unicode"),  # a lone surrogate, escaped in JSON
        ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deep"),
        ("", "--config is not JSON"),
    ],
    ids=["lone surrogate", "deeper than the parser", "empty"],
)
def test_a_job_config_that_cannot_be_carried_is_refused_in_words(config: str, words: str) -> None:
    """Each was a traceback (UnicodeEncodeError, RecursionError), or taken for no config."""
    result = run(
        "submit", "--amqp-url", "amqp://127.0.0.1:1/", "--location", "l", "--job", "j",
        "--config", config,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert words in result.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("submit", "--amqp-url", "amqp://x/", "--", "true"), "--image is required"),
        (("submit", "--image", "busybox", "--", "true"), "no broker"),
        (
            ("submit", "--image", "busybox", "--amqp-url", "amqp://x/", "--env", "NOEQUALS"),
            "KEY=VALUE",
        ),
        (("serve", "--amqp-url", "amqp://x/"), "no database"),
        (("runs", "list", "--state", "NAPPING", "--database-url", "postgresql://x/"), "state"),
    ],
)
def test_dispatcher_explains_bad_input(args: tuple[str, ...], words: str) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert words in result.stderr


def test_submit_refuses_what_json_cannot_carry_and_what_is_no_command_line() -> None:
    """A NaN or an infinity would reach the control plane as null: no limit at all."""
    base = ("submit", "--amqp-url", "amqp://127.0.0.1:1/", "--image", "busybox")
    for option in ("--cpus", "--max-runtime", "--start-timeout", "--queue-timeout"):
        for value in ("nan", "inf"):
            result = run(*base, option, value, "--", "true")
            assert result.returncode == 2, (option, value, result.stderr)
            assert f"{option} must be a finite number" in result.stderr
    result = run(*base, "--ready-check", 'echo "x', "--", "true")
    assert result.returncode == 2
    assert "--ready-check is not a command line" in result.stderr
    result = run(*base, "--wait", "--timeout", "-1", "--", "true")
    assert result.returncode == 2
    assert "--timeout must be more than 0 seconds" in result.stderr
    result = run("runs", "list", "--database-url", "postgresql://x/", "--limit", "-1")
    assert result.returncode == 2
    assert "Invalid value for '--limit'" in result.stderr
    result = run("monitor", "--log-level", "LOUD")
    assert result.returncode == 2
    assert "Invalid value for '--log-level'" in result.stderr


def test_a_broker_that_cannot_be_reached_is_one_line() -> None:
    """aiormq's own log line for the failed connect is left out: the command says it."""
    result = run_module(
        "dispatcher",
        "submit",
        "--amqp-url",
        "amqp://u:p@127.0.0.1:1/",
        "--image",
        "x",
        "--",
        "true",
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if line.startswith("error: ")
    ]
    assert "cannot connect to the broker" in result.stderr


def test_drain_signals_only_an_agent() -> None:
    """SIGUSR1 ends most programs: drain refuses what is not a process id, and a process that
    is not ``worker-agent run``, which lives on."""
    for pid in ("0", "-1"):
        result = run_agent("drain", "--", pid)
        assert result.returncode == 2
        assert "not a process id" in result.stderr
    other = subprocess.Popen(["sleep", "60"])
    try:
        result = run_agent("drain", str(other.pid))
        assert result.returncode == 1
        assert "is not a running `worker-agent run`" in result.stderr
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_worker_agent_run_explains_bad_input() -> None:
    result = run_agent("run", "--amqp-url", "amqp://x/", "--queue", "has space")
    assert result.returncode == 2
    assert "queue name" in result.stderr
    result = run_agent("run", "--queue", "default")
    assert result.returncode == 2
    assert "no broker" in result.stderr
    # A metrics port that is no port, or is taken: one line, not a traceback.
    result = run_agent("run", "--amqp-url", "amqp://x/", "--metrics-port", "70000")
    assert (result.returncode, result.stderr.strip()) == (
        2,
        "error: --metrics-port 70000 is no port: give 1 to 65535, or 0 for none",
    )
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run_agent("run", "--amqp-url", "amqp://x/", "--metrics-port", port)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot serve metrics on port {port}")
    assert "Traceback" not in result.stderr + result.stdout


def test_worker_agent_check_says_a_docker_host_that_is_no_url_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker_agent.checks import check_docker

    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:notaport")
    result = check_docker()
    assert not result.ok
    assert "no Docker engine answers" in result.detail


def test_a_token_limited_to_a_location_no_location_can_be_named_is_refused() -> None:
    result = run(
        *("tokens", "add", "t1", "--location", "Not A.Location"),
        *("--amqp-url", "amqp://x/", "--database-url", "postgresql://x/y"),
    )
    assert result.returncode == 2
    assert "location name 'Not A.Location' is invalid" in result.stderr


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """A port that accepts connections and never says a word (a firewall's black hole, a
    wrong service)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield f"amqp://u:p@127.0.0.1:{listener.getsockname()[1]}/"
    listener.close()


@pytest.mark.parametrize(
    "command",
    [
        ["submit", "--image", "busybox", "--wait", "--timeout", "1"],
        ["runs", "wait", "7c1f6c3e-0000-4000-8000-000000000000", "--timeout", "1"],
        ["runs", "cancel", "7c1f6c3e-0000-4000-8000-000000000000", "--timeout", "1"],
    ],
    ids=["submit --wait", "runs wait", "runs cancel"],
)
def test_a_broker_that_never_answers_is_said_as_such_within_the_timeout(
    silent_broker: str, command: list[str]
) -> None:
    """It was said as a run that did not end (exit 124) after the timeout, or the timeout was
    not applied to the connect at all (30 s)."""
    result = run(*command, "--amqp-url", silent_broker)
    assert result.returncode == 1, result.stderr
    assert "the broker did not answer within 1 s" in result.stderr
    assert "nothing was sent" in result.stderr
