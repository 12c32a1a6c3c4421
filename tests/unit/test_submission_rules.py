"""What a submission may carry beyond the wire contract: a job run brings no image, command,
env or ready check of its own, and a ``secret:NAME`` reference has a safe NAME. The client
refuses before sending; the locations registry refuses a bad reference too. What a run asks
of an agent (CPUs, memory, GPUs) must fit one live agent of its queue."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from dispatcher.cli_common import printable
from dispatcher.client import check_submission
from dispatcher.errors import ConfigError, InvalidSubmission
from dispatcher.store.locations import check_location
from dispatcher.submissions import Problem, capacity_problem
from dispatcher.submitters import Limits, reach_problem
from schemas import SubmitRun
from schemas.resources import Capacity
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


def test_a_location_whose_command_is_not_utf8_is_refused_in_words() -> None:
    # What an argument that is not UTF-8 becomes in Python: a lone surrogate.
    with pytest.raises(ConfigError, match="holds text that is not UTF-8"):
        check_location("hello", "example:1", "default", command=("serve", "\udcff"))


def test_what_others_wrote_cannot_drive_the_terminal() -> None:
    shown = printable("fine\r\x1b[2K\x1b]0;owned\x07\x9b31m\tok é")
    assert shown == "fine\ufffd\ufffd[2K\ufffd]0;owned\ufffd\ufffd31m\tok é"


def test_submit_help_shows_secret_references() -> None:
    result = run("submit", "--help")
    assert result.returncode == 0
    assert "KEY=secret:NAME" in result.stdout


# --------------------------------------------------- what a run asks of an agent


def asking(**fields: Any) -> SubmitRun:
    return SubmitRun(run_id=uuid.uuid4(), image="busybox", queue="default", **fields)


def test_a_run_asking_more_cpus_than_the_largest_live_agent_is_refused_with_both() -> None:
    offers = {"small": Capacity(cpus=2), "bigger": Capacity(cpus=4, gpus=1)}
    found = capacity_problem(asking(cpus=8), offers)
    assert found == Problem(
        "cpus", "the run asks for 8 CPUs; the largest live agent of queue default offers 4 CPUs"
    )
    assert capacity_problem(asking(cpus=4), offers) is None
    gpus = capacity_problem(asking(gpus=2), offers)
    assert gpus is not None and gpus.field == "gpus"
    assert gpus.reason.endswith("offers 1 GPU")


def test_what_no_agent_counts_or_no_agent_lives_for_is_not_refused() -> None:
    # Memory not counted by one of them: any limit fits there.
    offers = {"a": Capacity(cpus=2, memory_mb=512), "b": Capacity(cpus=1)}
    assert capacity_problem(asking(memory_limit_mb=100_000), offers) is None
    # No live agent: the queue-unserved alert says so; an agent may be on its way.
    assert capacity_problem(asking(cpus=64, gpus=8), {}) is None
    # A run that asks for nothing fits any agent.
    assert capacity_problem(asking(), {"a": Capacity(cpus=1)}) is None


def test_a_run_that_no_one_agent_holds_whole_is_refused_naming_them() -> None:
    offers = {
        "cpu-box": Capacity(cpus=16, memory_mb=1024),
        "mem-box": Capacity(cpus=1, memory_mb=65536),
    }
    found = capacity_problem(asking(cpus=4, memory_limit_mb=4096), offers)
    assert found == Problem(
        "cpus",
        "the run asks for 4 CPUs and 4096 MB of memory; no live agent of queue default offers "
        "all of it (cpu-box: 16 CPUs, 1024 MB of memory, no GPU; mem-box: 1 CPU, 65536 MB of "
        "memory, no GPU)",
    )


def test_submit_has_cpus_and_gpus_next_to_memory() -> None:
    result = run("submit", "--help")
    assert result.returncode == 0
    for option in ("--memory-mb", "--cpus", "--gpus"):
        assert option in result.stdout
    for fields in ({"cpus": 0.0}, {"gpus": -1}):
        with pytest.raises(InvalidSubmission) as refused:
            check_submission(asking(**fields))
        assert refused.value.field == next(iter(fields))


def test_only_a_trusted_identity_says_who_submitted() -> None:
    from dispatcher.submitters import submitted_by_problem

    via_api = SubmitRun(run_id=uuid.uuid4(), image="busybox", submitted_by="ops-bot")
    assert submitted_by_problem(via_api, "hd-control-plane", {"hd-control-plane"}) is None
    for sender in ("token-a", None):
        why = submitted_by_problem(via_api, sender, {"hd-control-plane"})
        assert why is not None and "submitted_by is set only by" in why
    plain = SubmitRun(run_id=uuid.uuid4(), image="busybox")
    assert submitted_by_problem(plain, "token-a", {"hd-control-plane"}) is None


def test_a_limited_token_cancels_only_what_it_could_submit() -> None:
    assert reach_problem("any", Limits(), "q", None) is None
    by_queue = Limits(queues=("etl",))
    assert reach_problem("t", by_queue, "etl", None) is None
    assert "only runs on its queues (allowed: etl)" in (
        reach_problem("t", by_queue, "ml", None) or ""
    )
    by_location = Limits(locations=("jobs",))
    assert reach_problem("t", by_location, "any-queue", "jobs") is None
    # A run of an image is not one of its locations' jobs.
    assert "only jobs of its locations" in (reach_problem("t", by_location, "q", None) or "")
    assert "only jobs of its locations" in (reach_problem("t", by_location, "q", "other") or "")


@pytest.mark.parametrize("field", ["cpus", "max_runtime_s", "start_timeout_s", "queue_timeout_s"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_number_json_cannot_carry_is_refused_not_sent_as_null(field: str, value: float) -> None:
    submission = SubmitRun(run_id=uuid.uuid4(), image="busybox", **{field: value})  # type: ignore[arg-type]
    with pytest.raises(InvalidSubmission, match=f"{field}: .* is not a finite number"):
        check_submission(submission)


async def test_what_the_contract_refuses_as_it_is_built_is_an_invalid_submission() -> None:
    """Before anything is sent, and before the client even needs its broker: a config nested
    too deep or a key too long in bytes is refused as every other bad submission is (it used
    to escape as the contract's own OutOfBounds, a traceback from `dispatcher submit`)."""
    from dispatcher.client import Client

    client = Client("amqp://nobody@127.0.0.1:1/")
    deep: dict[str, Any] = {}
    for _ in range(40):
        deep = {"a": deep}
    with pytest.raises(InvalidSubmission, match="config: nested deeper than 32 levels"):
        await client.submit("busybox", config=deep)
    with pytest.raises(InvalidSubmission, match="idempotency_key: 1200 bytes of text"):
        await client.submit("busybox", idempotency_key="é" * 600)


async def test_a_cancel_the_control_plane_could_not_read_is_refused_before_it_is_sent() -> None:
    from dispatcher.client import Client

    client = Client("amqp://nobody@127.0.0.1:1/")
    with pytest.raises(InvalidSubmission, match="invalid cancel: reason: Expected `str` of len"):
        await client.cancel(uuid.uuid4(), reason="x" * 20_000)
    with pytest.raises(InvalidSubmission, match="grace_s: nan is no finite number"):
        await client.cancel(uuid.uuid4(), grace_s=float("nan"))


async def test_a_command_given_as_one_string_is_refused_not_split_into_letters() -> None:
    from dispatcher.client import Client

    client = Client("amqp://nobody@127.0.0.1:1/")
    with pytest.raises(InvalidSubmission, match=r"command: a list of arguments, not a string"):
        await client.submit("busybox", "echo hi")
    with pytest.raises(InvalidSubmission, match=r"ready_check: a list of arguments"):
        await client.submit("busybox", ["true"], ready_check="test -f /ready")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
async def test_a_number_json_cannot_carry_inside_the_config_is_refused(bad: float) -> None:
    from dispatcher.client import Client

    client = Client("amqp://nobody@127.0.0.1:1/")
    config = {"rates": [1.0, {"max": bad}]}
    with pytest.raises(InvalidSubmission, match=r"config\.rates\[1\]\.max: not a finite number"):
        await client.submit(location="loc", job="j", config=config)


async def test_text_that_is_no_utf_8_is_an_invalid_submission_not_a_traceback() -> None:
    from dispatcher.client import Client

    client = Client("amqp://nobody@127.0.0.1:1/")
    undecodable = b"x\xff".decode("utf-8", "surrogateescape")  # as a shell argument arrives
    with pytest.raises(InvalidSubmission, match="text that is not UTF-8"):
        await client.submit("busybox", ["echo", undecodable])
    with pytest.raises(InvalidSubmission, match="a reason that is not UTF-8"):
        await client.cancel(uuid.uuid4(), reason=undecodable)


@pytest.mark.parametrize("timeout", ["0", "-1", "nan"])
def test_runs_cancel_refuses_a_timeout_that_bounds_nothing(timeout: str) -> None:
    from typer.testing import CliRunner

    from dispatcher.cli import app

    run_id = str(uuid.uuid4())
    done = CliRunner().invoke(
        app, ["runs", "cancel", run_id, "--amqp-url", "amqp://g@127.0.0.1:1/", "--timeout", timeout]
    )
    assert done.exit_code != 0
    assert "--timeout must be more than 0 seconds" in done.output
