"""How an attempt's end is reported."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from schemas import FailureReason, RunFailed, RunSucceeded
from worker_agent.containers import ContainerInfo
from worker_agent.outcome import final_event


@dataclass
class Ended:
    run_id: uuid.UUID
    attempt: int = 1
    terminated: FailureReason | None = None
    terminate_note: str = ""


def exited(code: int, oom: bool = False) -> ContainerInfo:
    return ContainerInfo("c1", "n", uuid.uuid4(), 1, "exited", code, oom)


def test_exit_0_succeeds_with_its_tail() -> None:
    event = final_event(Ended(uuid.uuid4()), "a", exited(0), ("done",))
    assert isinstance(event, RunSucceeded)
    assert event.output_tail == ("done",)


@pytest.mark.parametrize(
    ("ended", "info", "reason", "code"),
    [
        (Ended(uuid.uuid4()), exited(3), FailureReason.EXIT_CODE, 3),
        (Ended(uuid.uuid4()), exited(137, oom=True), FailureReason.OOM, 137),
        (Ended(uuid.uuid4()), None, FailureReason.UNEXPECTED_TERMINATION, None),
        (
            Ended(uuid.uuid4(), terminated=FailureReason.START_TIMEOUT, terminate_note="slow"),
            exited(143),
            FailureReason.START_TIMEOUT,
            143,
        ),
    ],
)
def test_failures_carry_their_reason_and_exit_code(
    ended: Ended, info: ContainerInfo | None, reason: FailureReason, code: int | None
) -> None:
    event = final_event(ended, "a", info, ())
    assert isinstance(event, RunFailed)
    assert (event.reason, event.exit_code, event.agent_id) == (reason, code, "a")
