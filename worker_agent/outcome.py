"""How an attempt ended, as the event that reports it."""

from __future__ import annotations

import uuid
from typing import Protocol

from schemas import FailureReason, RunFailed, RunSucceeded

from . import limits
from .containers import ContainerInfo


class EndedAttempt(Protocol):
    run_id: uuid.UUID
    attempt: int
    #: Set when the attempt was stopped by a TerminateRun: the reason it is reported with.
    terminated: FailureReason | None
    terminate_note: str


def final_event(
    attempt: EndedAttempt, agent_id: str, info: ContainerInfo | None, tail: tuple[str, ...]
) -> RunSucceeded | RunFailed:
    """RunSucceeded for exit code 0; otherwise RunFailed with the reason, in this order:
    stopped on instruction, container gone, killed for memory, non-zero exit.

    What it carries stays within the contract's bounds whatever the engine or the instruction
    said: a message at its limit, an exit code outside -1..255 (an engine of another kind) only
    in words."""
    exit_code = info.exit_code if info else None
    if attempt.terminated is not None:
        reason = attempt.terminated
        message = f"terminated: {attempt.terminate_note or reason.value}"
    elif info is None:
        reason, message = FailureReason.UNEXPECTED_TERMINATION, "the container disappeared"
    elif info.oom_killed:
        reason, message = FailureReason.OOM, "killed for memory"
    elif exit_code == 0:
        return RunSucceeded(
            run_id=attempt.run_id, attempt=attempt.attempt, agent_id=agent_id, output_tail=tail
        )
    else:
        reason, message = FailureReason.EXIT_CODE, f"exited with code {exit_code}"
    return RunFailed(
        run_id=attempt.run_id,
        attempt=attempt.attempt,
        agent_id=agent_id,
        output_tail=tail,
        reason=reason,
        exit_code=exit_code if exit_code is None or -1 <= exit_code <= 255 else None,
        message=limits.clip(limits.clean(message), limits.MAX_PROGRESS_TEXT_BYTES),
    )
