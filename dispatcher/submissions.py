"""What a submission may carry beyond the wire contract's bounds.

The client checks these rules before it sends and the control plane again when it accepts,
so that the two refuse the same submissions, with the same words.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from schemas import SubmitRun, is_safe_name

#: An env value ``secret:NAME`` is a reference, resolved on the agent's host; only the
#: reference ever reaches the control plane.
SECRET_PREFIX = "secret:"

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
