"""The command-line entry points, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from schemas import ALL_MESSAGES


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from dispatcher.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from worker_agent.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dispatcher_help_lists_its_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    assert "schemas" in result.stdout


def test_dispatcher_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("dispatcher 0.")


def test_worker_agent_help_and_version() -> None:
    result = run_agent("--help")
    assert result.returncode == 0
    assert "check" in result.stdout
    result = run_agent("--version")
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
