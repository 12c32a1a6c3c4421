"""What a submission may carry beyond the wire contract's bounds.

The client checks these rules before it sends and the control plane again when it accepts,
so that the two refuse the same submissions, with the same words. One rule only the control
plane can check: what a run asks for (CPUs, memory, GPUs) against what the live agents of its
queue declare (``capacity_problem``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from schemas import SubmitRun, is_safe_name
from schemas.resources import FIELDS, Capacity, Resources, amount

#: An env value ``secret:NAME`` is a reference, resolved on the agent's host; only the
#: reference ever reaches the control plane.
SECRET_PREFIX = "secret:"

#: Live agents named at most in a refusal that no one of them offers all a run asks for.
LISTED_AGENTS = 3

#: What a job run takes from its location alone: nothing user-supplied runs next to the
#: location's resolved secrets.
LOCATION_FIELDS = ("image", "command", "env", "ready_check")


@dataclass(frozen=True)
class Problem:
    """Why a submission is refused, and the field to blame."""

    field: str
    reason: str


def problem(submission: SubmitRun) -> Problem | None:
    """The first rule ``submission`` breaks, or None."""
    if submission.location is not None or submission.job is not None:
        overrides = [name for name in LOCATION_FIELDS if getattr(submission, name)]
        if overrides:
            return Problem(
                overrides[0],
                "a job run takes its image, command and environment from its location; "
                f"this submission also sets {', '.join(overrides)} "
                "(send only the location, the job and its config)",
            )
    reason = secret_reference_problem(submission.env)
    return Problem("env", reason) if reason else None


def secret_reference_problem(env: Mapping[str, str]) -> str | None:
    """Why an env value ``secret:NAME`` is unusable, or None: NAME becomes part of a variable
    name (``HD_SECRET_NAME``) and a file name on the agent's host, so it is a safe name."""
    for key, value in env.items():
        if value.startswith(SECRET_PREFIX) and not is_safe_name(value.removeprefix(SECRET_PREFIX)):
            return (
                f"the secret reference of {key!r} (secret:NAME) needs a NAME of 1 to 64 "
                "letters, digits, '_' and '-', starting with a letter or digit"
            )
    return None


def resources_of(submission: SubmitRun) -> Resources:
    """What the run asks of an agent: its CPUs, memory limit and GPUs."""
    return Resources.asked(submission.cpus, submission.memory_limit_mb, submission.gpus)


def capacity_problem(submission: SubmitRun, offers: Mapping[str, Capacity]) -> Problem | None:
    """Why no live agent of the submission's queue could ever take its run, or None.

    ``offers``: the capacity each live agent of the queue declares (agent id → capacity).
    With none alive nothing is refused: an agent may be on its way, and the queue-unserved
    alert says so if none comes. A run that asks for nothing fits any agent.
    """
    need = resources_of(submission)
    if not need or not offers or any(o.lacks(need) is None for o in offers.values()):
        return None
    queue = submission.queue
    for field, asked in zip(FIELDS, need.amounts(), strict=True):
        offered = [o.offered(field) for o in offers.values()]
        counted = [value for value in offered if value is not None]
        if asked and len(counted) == len(offered) and asked > max(counted):
            return Problem(
                field,
                f"the run asks for {amount(field, asked)}; the largest live agent of queue "
                f"{queue} offers {amount(field, max(counted))}",
            )
    # Each alone is offered somewhere, but not all of it by one agent.
    listed = "; ".join(
        f"{agent_id}: {offer.words()}" for agent_id, offer in sorted(offers.items())[:LISTED_AGENTS]
    )
    more = len(offers) - LISTED_AGENTS
    return Problem(
        next(f for f, asked in zip(FIELDS, need.amounts(), strict=True) if asked),
        f"the run asks for {need.words()}; no live agent of queue {queue} offers all of it "
        f"({listed}{f'; and {more} more' if more > 0 else ''})",
    )


#: The longest reason a refusal carries: well inside the contract's text (``MAX_TEXT``
#: characters), which every reader of ``RunRejected`` holds it to. A config's problems or a
#: location's jobs could make a reason of any length; one past the bound was an answer no
#: reader would take, so that its submitter waited in vain.
MAX_REASON = 4000


def in_a_reason(why: str) -> str:
    """``why``, cut to ``MAX_REASON`` characters, saying so."""
    if len(why) <= MAX_REASON:
        return why
    return why[: MAX_REASON - 20] + " ... (cut short)"


_LOCATION_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def is_location_name(name: str) -> bool:
    """1 to 63 lowercase letters, digits, '_' and '-', starting with a letter or digit."""
    return _LOCATION_NAME.fullmatch(name) is not None
