"""Who may submit, and where: the intake's rules for the sender of a SubmitRun.

The broker checks a message's AMQP ``user_id`` against the user of the connection it came on
(a mismatch is refused), so the intake knows who published a submission that carries one.
A submission is accepted from:

- a registered submitter token, within its limits (``Limits``): its agent queues (a job
  run's queue is its location's) and its code locations (a token limited to locations
  submits only their jobs, never a plain run of any image);
- a trusted identity (the control plane's own user and ``HD_TRUSTED_BROKER_USERS``: the
  operators'), without limits;
- a message without ``user_id``, only while no submitter token is registered: clients that
  do not set it keep working until tokens are in use, and from then on a token cannot shed
  its limits by leaving its name out.

Anything else (an agent's identity, a role's) is refused with the reason, and no run exists.
The client and the control plane's CLI stamp the ``user_id`` of their connection.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from schemas import SubmitRun


@dataclass(frozen=True)
class Limits:
    """Where a submitter token may send runs; empty means anywhere."""

    queues: tuple[str, ...] = ()
    locations: tuple[str, ...] = ()

    @property
    def bounded(self) -> bool:
        """Whether it limits anything (a token without limits goes anywhere)."""
        return bool(self.queues or self.locations)

    def describe(self) -> str:
        queues = ", ".join(self.queues) or "any"
        locations = ", ".join(self.locations) or "any (and plain runs)"
        return f"queues: {queues}; locations: {locations}"


#: No limits: every queue and location.
ANYWHERE = Limits()


@dataclass(frozen=True)
class Registry:
    """The registered submitters a batch's senders are looked up in."""

    #: Some submitter token is registered: a submission must then name its sender.
    in_use: bool = False
    limits: Mapping[str, Limits] = field(default_factory=dict)


def sender_problem(user_id: str | None, trusted: Collection[str], registry: Registry) -> str | None:
    """Why this sender may not submit at all, or None."""
    if user_id is None:
        if registry.in_use:
            return (
                "a submission must carry its sender's AMQP user_id once submitter tokens are "
                "in use (the Python client sets it; set user_id to the connection's user)"
            )
        return None
    if user_id in registry.limits or user_id in trusted:
        return None
    return (
        f"broker user {user_id!r} may not submit runs: it is neither a submitter token nor a "
        "trusted identity"
    )


def limits_problem(
    name: str, limits: Limits, submission: SubmitRun, queue: str | None
) -> str | None:
    """Why submitter ``name`` may not make this submission, or None.

    ``queue`` is the agent queue the run would go to (a job's is its location's; None when
    the location is unknown: it is refused for that reason anyway)."""
    if limits.locations:
        allowed = ", ".join(limits.locations)
        if submission.location is None:
            return (
                f"submitter {name!r} may submit only jobs of its locations (allowed: {allowed}), "
                "not a run of an image"
            )
        if submission.location not in limits.locations:
            return (
                f"submitter {name!r} may not submit to location {submission.location!r} "
                f"(allowed: {allowed})"
            )
    if limits.queues and queue is not None and queue not in limits.queues:
        return (
            f"submitter {name!r} may not submit to queue {queue!r} "
            f"(allowed: {', '.join(limits.queues)})"
        )
    return None


def reach_problem(
    name: str, limits: Limits, queue: str, location: str | None, doing: str = "cancel"
) -> str | None:
    """Why ``name``, within ``limits``, may not ``doing`` a run on ``queue`` (a job of
    ``location``, or a run of an image when None), or None: it reaches what it may submit."""
    if limits.locations and location not in limits.locations:
        return (
            f"{name!r} may {doing} only jobs of its locations "
            f"(allowed: {', '.join(limits.locations)})"
        )
    if limits.queues and queue not in limits.queues:
        return f"{name!r} may {doing} only runs on its queues (allowed: {', '.join(limits.queues)})"
    return None


def submitted_by_problem(
    submission: SubmitRun, sender: str | None, trusted: Collection[str]
) -> str | None:
    """Why ``submitted_by`` may not stand, or None: it names who submitted through the
    control plane's own front end (the HTTP API), so only a trusted identity may set it."""
    if submission.submitted_by is None or (sender is not None and sender in trusted):
        return None
    return (
        "submitted_by is set only by the control plane's own front ends (the HTTP API); "
        "leave it out: the control plane records the sender itself"
    )
