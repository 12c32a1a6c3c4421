"""What a submission may carry beyond the wire contract: a job run brings no image, command,
env or ready check of its own, and a ``secret:NAME`` reference has a safe NAME. The client
refuses before sending; the locations registry refuses a bad reference too."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from dispatcher.client import check_submission
from dispatcher.errors import ConfigError, InvalidSubmission
from dispatcher.store.locations import check_location
from schemas import SubmitRun
from tests.unit.test_cli import run


def job(**fields: Any) -> SubmitRun:
    """A job submission as ``Client.submit_job`` and ``dispatcher submit --location`` build it."""
    return SubmitRun(run_id=uuid.uuid4(), location="hello", job="count", config={"to": 3}, **fields)


def plain(env: dict[str, str]) -> SubmitRun:
    return SubmitRun(run_id=uuid.uuid4(), image="busybox", command=("true",), env=env)


def test_a_job_submission_with_only_location_job_and_config_passes() -> None:
    check_submission(job())
    check_submission(job(queue="default", max_runtime_s=60, tags={"team": "data"}))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"env": {"TOKEN": "mine"}}, "env"),
        ({"env": {"TOKEN": "secret:TOKEN"}}, "env"),
        ({"command": ("sh", "-c", "env")}, "command"),
        ({"ready_check": ("cat", "/proc/1/environ")}, "ready_check"),
        ({"image": "busybox"}, "image"),
    ],
)
def test_a_job_submission_that_brings_its_own_is_refused_naming_the_field(
    fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidSubmission) as refused:
        check_submission(job(**fields))
    assert refused.value.field == field
    assert "takes its image, command and environment from its location" in str(refused.value)
    assert f"also sets {field}" in str(refused.value)


def test_every_field_a_job_brings_is_named() -> None:
    with pytest.raises(InvalidSubmission) as refused:
        check_submission(job(env={"A": "1"}, command=("x",)))
    assert refused.value.field == "command"
    assert "also sets command, env" in str(refused.value)


@pytest.mark.parametrize("value", ["secret:TOKEN", "secret:db-password_2", "secret:" + "A" * 64])
def test_a_plain_run_may_refer_to_a_secret_by_a_safe_name(value: str) -> None:
    check_submission(plain({"TOKEN": value, "PLAIN": "not:a secret"}))


@pytest.mark.parametrize(
    "value",
    [
        "secret:",
        "secret:../../etc/shadow",
        "secret:a/b",
        "secret:two words",
        "secret:_LEADING",
        "secret:DOT.TED",
        "secret:" + "A" * 65,
        "secret:TOKEN\n",
    ],
)
def test_a_secret_reference_without_a_safe_name_is_refused(value: str) -> None:
    with pytest.raises(InvalidSubmission) as refused:
        check_submission(plain({"TOKEN": value}))
    assert refused.value.field == "env"
    assert "secret reference of 'TOKEN'" in str(refused.value)


def test_a_location_refuses_a_secret_reference_without_a_safe_name() -> None:
    check_location("hello", "example:1", "default", {"TOKEN": "secret:TOKEN"})
    with pytest.raises(ConfigError, match="secret reference of 'TOKEN'"):
        check_location("hello", "example:1", "default", {"TOKEN": "secret:../x"})


def test_submit_help_shows_secret_references() -> None:
    result = run("submit", "--help")
    assert result.returncode == 0
    assert "KEY=secret:NAME" in result.stdout
