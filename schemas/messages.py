"""Every message on the wire, as frozen msgspec structs in tagged unions.

The envelope is flat: each message carries its header fields (``message_id``, ``kind``,
``schema_version``, ``sent_at``; ``run_id`` and ``attempt`` on run messages) beside its body
fields, and ``kind`` is the union's tag. One JSON object, decoded in one pass by a typed
decoder, with no second field to keep in step with the tag.

Compatibility rules: a new field always has a default; unknown fields are ignored.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

#: Version of the wire contract written by this code. Additive changes keep it.
SCHEMA_VERSION = 1

NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
Attempt = Annotated[int, msgspec.Meta(ge=1)]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
ExitCode = Annotated[int, msgspec.Meta(ge=-1, le=255)]


def _now() -> datetime:
    return datetime.now(UTC)


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Header fields every message carries."""

    message_id: uuid.UUID = msgspec.field(default_factory=uuid.uuid4)
    schema_version: Annotated[int, msgspec.Meta(ge=1)] = SCHEMA_VERSION
    sent_at: AwareDatetime = msgspec.field(default_factory=_now)


class RunMessage(Message, frozen=True, kw_only=True):
    """A message about one run."""

    run_id: uuid.UUID


class AttemptMessage(RunMessage, frozen=True, kw_only=True):
    """A message about one attempt of a run; the attempt is part of every idempotency key."""

    attempt: Attempt


class FailureReason(enum.StrEnum):
    """Why an attempt failed."""

    EXIT_CODE = "EXIT_CODE"
    IMAGE_NOT_FOUND = "IMAGE_NOT_FOUND"
    LAUNCH_ERROR = "LAUNCH_ERROR"
    START_TIMEOUT = "START_TIMEOUT"
    AGENT_LOST = "AGENT_LOST"
    UNEXPECTED_TERMINATION = "UNEXPECTED_TERMINATION"
    OOM = "OOM"
    MAX_RUNTIME = "MAX_RUNTIME"
    CANCEL_TIMEOUT = "CANCEL_TIMEOUT"


# ----------------------------------------------------------------------------- requests


class SubmitRun(RunMessage, frozen=True, kw_only=True, tag="SubmitRun"):
    """Ask the control plane for a new run. The client chooses ``run_id``.

    ``idempotency_key`` makes repeated submissions one run; when absent, ``run_id`` is the key.
    A run is either an ``image`` (and ``command``), or a ``job`` of a code ``location`` with
    its ``config``; the latter is checked against the location's definitions and answered with
    RunAccepted or RunRejected.
    """

    image: str = ""
    location: str | None = None
    job: str | None = None
    config: dict[str, Any] = msgspec.field(default_factory=dict)
    command: tuple[str, ...] = ()
    env: dict[str, str] = msgspec.field(default_factory=dict)
    queue: NonEmpty = "default"
    idempotency_key: NonEmpty | None = None
    tags: dict[str, str] = msgspec.field(default_factory=dict)
    max_runtime_s: Seconds | None = None
    #: STARTING for longer than this fails the attempt (START_TIMEOUT); None: the default.
    start_timeout_s: Seconds | None = None
    #: Retries after a failure whose reason is in ``retry_on``; None: the default policy.
    max_retries: Annotated[int, msgspec.Meta(ge=0, le=100)] | None = None
    retry_on: tuple[FailureReason, ...] | None = None
    memory_limit_mb: Annotated[int, msgspec.Meta(ge=6)] | None = None
    #: A command run inside the container; the run is STARTED once it succeeds.
    ready_check: tuple[str, ...] = ()


class CancelRun(RunMessage, frozen=True, kw_only=True, tag="CancelRun"):
    """Ask the control plane to cancel a run."""

    reason: str = ""


# ------------------------------------------------------------------------- instructions


class LaunchRun(AttemptMessage, frozen=True, kw_only=True, tag="LaunchRun"):
    """Tell an agent to start one attempt of a run in a container of its own.

    For a job of a code location, the agent asks the location's code server for the command.
    """

    image: NonEmpty
    location: str | None = None
    job: str | None = None
    config: dict[str, Any] = msgspec.field(default_factory=dict)
    command: tuple[str, ...] = ()
    env: dict[str, str] = msgspec.field(default_factory=dict)
    tags: dict[str, str] = msgspec.field(default_factory=dict)
    max_runtime_s: Seconds | None = None
    memory_limit_mb: Annotated[int, msgspec.Meta(ge=6)] | None = None
    ready_check: tuple[str, ...] = ()


class TerminateRun(AttemptMessage, frozen=True, kw_only=True, tag="TerminateRun"):
    """Tell an agent to stop an attempt: SIGTERM, then SIGKILL after ``grace_s``.

    ``failure_reason`` is what the agent reports for the attempt once it stopped.
    """

    reason: str = ""
    grace_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    failure_reason: FailureReason | None = None


Instruction = LaunchRun | TerminateRun

# ------------------------------------------------------------------------------- events


class RunLaunched(AttemptMessage, frozen=True, kw_only=True, tag="RunLaunched"):
    """The agent created (or adopted) the attempt's container."""

    agent_id: NonEmpty
    container_id: NonEmpty
    container_name: NonEmpty


class RunStarted(AttemptMessage, frozen=True, kw_only=True, tag="RunStarted"):
    """The attempt's container is running."""

    agent_id: NonEmpty
    container_id: NonEmpty
    started_at: AwareDatetime | None = None


class RunSucceeded(AttemptMessage, frozen=True, kw_only=True, tag="RunSucceeded"):
    """The attempt's container exited 0."""

    agent_id: NonEmpty
    exit_code: ExitCode = 0
    output_tail: tuple[str, ...] = ()
    finished_at: AwareDatetime | None = None


class RunFailed(AttemptMessage, frozen=True, kw_only=True, tag="RunFailed"):
    """The attempt failed; ``reason`` says how, ``exit_code`` is set when there was one."""

    reason: FailureReason
    agent_id: str | None = None
    exit_code: ExitCode | None = None
    output_tail: tuple[str, ...] = ()
    message: str = ""
    finished_at: AwareDatetime | None = None


class RunLog(AttemptMessage, frozen=True, kw_only=True, tag="RunLog"):
    """A batch of the attempt's output lines, numbered from 0 within the attempt.

    Numbering makes forwarding idempotent: a line sent twice (after an agent restart, say)
    is stored once. ``truncated`` says that the agent stopped forwarding at its per-run cap.
    """

    agent_id: NonEmpty
    first_line: Annotated[int, msgspec.Meta(ge=0)]
    lines: tuple[str, ...]
    truncated: bool = False


class ProgressItem(msgspec.Struct, frozen=True, kw_only=True):
    """One structured progress report a run wrote (the SDK's framed stdout lines)."""

    #: Number of the output line it came on: its identity within the attempt.
    line_no: Annotated[int, msgspec.Meta(ge=0)]
    event: Literal["step_started", "step_finished", "log", "metadata"]
    step: str | None = None
    status: str | None = None
    duration_s: float | None = None
    level: str | None = None
    message: str | None = None
    values: dict[str, Any] = msgspec.field(default_factory=dict)


class RunProgress(AttemptMessage, frozen=True, kw_only=True, tag="RunProgress"):
    """Steps, log records and metadata a run reported, read by its agent from its output."""

    agent_id: NonEmpty
    items: tuple[ProgressItem, ...]


class RunAccepted(RunMessage, frozen=True, kw_only=True, tag="RunAccepted"):
    """A job submission passed its location's checks: the run exists."""


class RunRejected(RunMessage, frozen=True, kw_only=True, tag="RunRejected"):
    """A submission was refused, and no run exists; ``reason`` names the problem."""

    reason: str


class ContainerState(msgspec.Struct, frozen=True, kw_only=True):
    """One in-flight attempt as its agent sees it, in a heartbeat."""

    run_id: uuid.UUID
    attempt: Attempt
    container_id: str | None = None
    state: NonEmpty
    exit_code: ExitCode | None = None


class AgentHeartbeat(Message, frozen=True, kw_only=True, tag="AgentHeartbeat"):
    """An agent is alive; sent every heartbeat interval with what it is running."""

    agent_id: NonEmpty
    sequence: Annotated[int, msgspec.Meta(ge=0)]
    queues: tuple[str, ...] = ()
    max_concurrent: Annotated[int, msgspec.Meta(ge=0)] = 0
    interval_s: Seconds = 2.0
    in_flight: tuple[ContainerState, ...] = ()
    draining: bool = False


# ----------------------------------------------------------------------- code locations


class LocationSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A code location as agents keep it: one long-standing code server per agent.

    ``env`` values of the form ``secret:NAME`` are references: the agent resolves them from
    its own environment (``HD_SECRET_NAME``) on its host; the value never travels.
    """

    name: NonEmpty
    image: NonEmpty
    command: tuple[str, ...] = ()
    env: dict[str, str] = msgspec.field(default_factory=dict)
    generation: Annotated[int, msgspec.Meta(ge=1)] = 1


class LocationSnapshot(Message, frozen=True, kw_only=True, tag="LocationSnapshot"):
    """Every location of one agent queue, as the control plane holds them now."""

    queue: NonEmpty
    locations: tuple[LocationSpec, ...] = ()


class LocationsWanted(Message, frozen=True, kw_only=True, tag="LocationsWanted"):
    """An agent (starting) asks for the snapshots of its queues."""

    agent_id: NonEmpty
    queues: tuple[str, ...]


class JobDefinition(msgspec.Struct, frozen=True, kw_only=True):
    name: NonEmpty
    description: str = ""
    config_schema: dict[str, Any] = msgspec.field(default_factory=dict)


class LocationLoaded(Message, frozen=True, kw_only=True, tag="LocationLoaded"):
    """A location's code server is healthy; these are its definitions."""

    location: NonEmpty
    generation: Annotated[int, msgspec.Meta(ge=1)]
    agent_id: NonEmpty
    container_id: NonEmpty
    jobs: tuple[JobDefinition, ...] = ()


class LocationFailed(Message, frozen=True, kw_only=True, tag="LocationFailed"):
    """A location's code server did not become healthy in time; its output says why."""

    location: NonEmpty
    generation: Annotated[int, msgspec.Meta(ge=1)]
    agent_id: NonEmpty
    message: str = ""
    output_tail: tuple[str, ...] = ()


Request = SubmitRun | CancelRun | LocationsWanted
RunEvent = RunLaunched | RunStarted | RunSucceeded | RunFailed
Event = (
    RunLaunched
    | RunStarted
    | RunSucceeded
    | RunFailed
    | RunLog
    | RunProgress
    | AgentHeartbeat
    | LocationLoaded
    | LocationFailed
    | RunAccepted
    | RunRejected
)
AnyMessage = (
    SubmitRun
    | CancelRun
    | LaunchRun
    | TerminateRun
    | RunLaunched
    | RunStarted
    | RunSucceeded
    | RunFailed
    | RunLog
    | RunProgress
    | AgentHeartbeat
    | LocationSnapshot
    | LocationsWanted
    | LocationLoaded
    | LocationFailed
    | RunAccepted
    | RunRejected
)

ALL_MESSAGES: tuple[type[Message], ...] = (
    SubmitRun,
    CancelRun,
    LaunchRun,
    TerminateRun,
    RunLaunched,
    RunStarted,
    RunSucceeded,
    RunFailed,
    RunLog,
    RunProgress,
    AgentHeartbeat,
    LocationSnapshot,
    LocationsWanted,
    LocationLoaded,
    LocationFailed,
    RunAccepted,
    RunRejected,
)


def kind_of(message: Message) -> str:
    """The ``kind`` tag a message is sent with."""
    return str(type(message).__struct_config__.tag)
