"""Messages about runs: requests from scripts, instructions to agents, events back."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from .bounds import (
    INT32_MAX,
    MAX_CONFIG_BYTES,
    MAX_LOG_BATCH_BYTES,
    MAX_VALUES_BYTES,
    Argv,
    Attempt,
    AwareDatetime,
    Config,
    ContainerId,
    Cpus,
    Delay,
    Env,
    ExitCode,
    Gpus,
    ImageRef,
    ImageRefOrEmpty,
    LineNo,
    Lines,
    MemoryMb,
    Name,
    NonEmpty,
    Priority,
    ProgressValues,
    Seconds,
    ShortText,
    Tags,
    Text,
    check_json,
    check_text_budget,
)
from .envelope import AttemptMessage, FailureReason, RunMessage
from .errors import OutOfBounds

#: An idempotency key's most UTF-8 bytes.
MAX_KEY_BYTES = 1024

# ----------------------------------------------------------------------------- requests


class SubmitRun(RunMessage, frozen=True, kw_only=True, tag="SubmitRun"):
    """Ask the control plane for a new run. The client chooses ``run_id``.

    ``idempotency_key`` makes repeated submissions one run; when absent, ``run_id`` is the key.
    It is at most 1,024 characters and 1,024 bytes of UTF-8 (PostgreSQL's unique index takes
    no more than about 2,700 bytes of a value).
    A run is either an ``image`` (and ``command``), or a ``job`` of a code ``location`` with
    its ``config``; the latter is checked against the location's definitions and answered with
    RunAccepted or RunRejected.
    """

    image: ImageRefOrEmpty = ""
    location: Name | None = None
    job: Name | None = None
    config: Config = msgspec.field(default_factory=dict)
    command: Argv = ()
    env: Env = msgspec.field(default_factory=dict)
    queue: Name = "default"
    idempotency_key: NonEmpty | None = None
    tags: Tags = msgspec.field(default_factory=dict)
    max_runtime_s: Seconds | None = None
    #: QUEUED for longer than this (no agent took it) fails the run: QUEUE_TIMEOUT.
    queue_timeout_s: Seconds | None = None
    #: STARTING for longer than this fails the attempt (START_TIMEOUT); None: the default.
    start_timeout_s: Seconds | None = None
    #: Retries after a failure whose reason is in ``retry_on``; None: the default policy.
    max_retries: Annotated[int, msgspec.Meta(ge=0, le=100)] | None = None
    retry_on: Annotated[tuple[FailureReason, ...], msgspec.Meta(max_length=32)] | None = None
    memory_limit_mb: MemoryMb | None = None
    #: CPUs (Docker's nano-CPUs) and GPUs the container gets; an agent takes the run only
    #: while its declared capacity has room for them.
    cpus: Cpus | None = None
    gpus: Gpus = 0
    #: Among the runs a concurrency limit holds back, higher first (FIFO within a priority).
    #: It orders nothing else: a run under no limit goes to its queue at once.
    priority: Priority = 0
    #: Who submitted it through a front end of the control plane's own (the HTTP API puts
    #: its token's name here); from any other sender the control plane refuses it.
    submitted_by: Name | None = None
    #: A command run inside the container; the run is STARTED once it succeeds.
    ready_check: Argv = ()

    def __post_init__(self) -> None:
        check_json("config", self.config, MAX_CONFIG_BYTES)
        if self.idempotency_key is not None:
            check_text_budget("idempotency_key", (self.idempotency_key,), MAX_KEY_BYTES)


class CancelRun(RunMessage, frozen=True, kw_only=True, tag="CancelRun"):
    """Ask the control plane to cancel a run: a queued run never starts; a running one gets
    SIGTERM, then SIGKILL after ``grace_s``. Idempotent; a finished run stays as it is."""

    reason: Text = ""
    grace_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 30.0


class RunStateWanted(RunMessage, frozen=True, kw_only=True, tag="RunStateWanted"):
    """Ask the control plane to say again where a run is, for one who follows its events and
    may have missed some (a connection to the broker lost and regained): a run that has ended
    is announced again (``RunEnded``), one that has not is acknowledged again
    (``RunAccepted``); a run it does not know is not answered. Changes nothing."""


# ------------------------------------------------------------------------- instructions


class LaunchRun(AttemptMessage, frozen=True, kw_only=True, tag="LaunchRun"):
    """Tell an agent to start one attempt of a run in a container of its own.

    For a job of a code location, the agent asks the location's code server for the command.
    """

    image: ImageRef
    location: Name | None = None
    job: Name | None = None
    config: Config = msgspec.field(default_factory=dict)
    command: Argv = ()
    env: Env = msgspec.field(default_factory=dict)
    tags: Tags = msgspec.field(default_factory=dict)
    max_runtime_s: Seconds | None = None
    memory_limit_mb: MemoryMb | None = None
    cpus: Cpus | None = None
    gpus: Gpus = 0
    ready_check: Argv = ()

    def __post_init__(self) -> None:
        check_json("config", self.config, MAX_CONFIG_BYTES)


class TerminateRun(AttemptMessage, frozen=True, kw_only=True, tag="TerminateRun"):
    """Tell an agent to stop an attempt: SIGTERM, then SIGKILL after ``grace_s``.

    ``failure_reason`` is what the agent reports for the attempt once it stopped.
    """

    reason: Text = ""
    grace_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 30.0
    failure_reason: FailureReason | None = None


class LaunchGranted(AttemptMessage, frozen=True, kw_only=True, tag="LaunchGranted"):
    """The control plane's answer to the first ``RunClaimed`` of an attempt: this agent holds
    it and may start its container. Any later claimant is answered with a ``TerminateRun``."""

    agent_id: Name


# ------------------------------------------------------------------------------- events


class RunClaimed(AttemptMessage, frozen=True, kw_only=True, tag="RunClaimed"):
    """The agent asks to hold the attempt before it starts its container (sent while the
    container is being created): the first claim recorded wins, so an attempt never runs on
    two engines at once."""

    agent_id: Name


class RunLaunched(AttemptMessage, frozen=True, kw_only=True, tag="RunLaunched"):
    """The agent created (or adopted) the attempt's container."""

    agent_id: Name
    container_id: ContainerId
    container_name: NonEmpty


class RunStarted(AttemptMessage, frozen=True, kw_only=True, tag="RunStarted"):
    """The attempt's container is running."""

    agent_id: Name
    container_id: ContainerId
    started_at: AwareDatetime | None = None


class RunSucceeded(AttemptMessage, frozen=True, kw_only=True, tag="RunSucceeded"):
    """The attempt's container exited 0."""

    agent_id: Name
    exit_code: ExitCode = 0
    output_tail: Lines = ()
    finished_at: AwareDatetime | None = None


class RunFailed(AttemptMessage, frozen=True, kw_only=True, tag="RunFailed"):
    """The attempt failed; ``reason`` says how, ``exit_code`` is set when there was one."""

    reason: FailureReason
    agent_id: Name | None = None
    exit_code: ExitCode | None = None
    output_tail: Lines = ()
    message: Text = ""
    finished_at: AwareDatetime | None = None


class RunLog(AttemptMessage, frozen=True, kw_only=True, tag="RunLog"):
    """A batch of the attempt's output lines, numbered from 0 within the attempt.

    Numbering makes forwarding idempotent: a line sent twice (after an agent restart, say)
    is stored once. ``truncated`` says that the agent stopped forwarding at its per-run cap.
    Every line's number, and the next one's (``first_line + len(lines)``), fits a PostgreSQL
    integer.
    """

    agent_id: Name
    first_line: LineNo
    lines: Lines
    truncated: bool = False

    def __post_init__(self) -> None:
        if self.first_line + len(self.lines) > INT32_MAX:
            raise OutOfBounds(
                f"{len(self.lines)} line(s) from line {self.first_line} are numbered past "
                f"{INT32_MAX}",
                "first_line",
            )
        check_text_budget("lines", self.lines, MAX_LOG_BATCH_BYTES)


class ProgressItem(msgspec.Struct, frozen=True, kw_only=True):
    """One structured progress report a run wrote (the SDK's framed stdout lines)."""

    #: Number of the output line it came on: its identity within the attempt.
    line_no: LineNo
    event: Literal["step_started", "step_finished", "log", "metadata"]
    step: ShortText | None = None
    status: ShortText | None = None
    duration_s: Annotated[float, msgspec.Meta(ge=-1e9, le=1e9)] | None = None
    level: ShortText | None = None
    message: ShortText | None = None
    values: ProgressValues = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        check_json("values", self.values, MAX_VALUES_BYTES)


class RunProgress(AttemptMessage, frozen=True, kw_only=True, tag="RunProgress"):
    """Steps, log records and metadata a run reported, read by its agent from its output."""

    agent_id: Name
    items: Annotated[tuple[ProgressItem, ...], msgspec.Meta(max_length=1000)]


class RunAccepted(RunMessage, frozen=True, kw_only=True, tag="RunAccepted"):
    """A job submission passed its location's checks: the run exists."""


class RunRejected(RunMessage, frozen=True, kw_only=True, tag="RunRejected"):
    """A submission was refused, and no run exists; ``reason`` names the problem."""

    reason: Text


class RunRetrying(AttemptMessage, frozen=True, kw_only=True, tag="RunRetrying"):
    """The control plane scheduled another attempt after ``attempt`` failed."""

    next_attempt: Attempt
    reason: FailureReason
    delay_s: Delay
    message: Text = ""


class RunEnded(AttemptMessage, frozen=True, kw_only=True, tag="RunEnded"):
    """The control plane's verdict: the run reached its final state with ``attempt``."""

    state: Literal["SUCCESS", "FAILURE", "CANCELED"]
    exit_code: ExitCode | None = None
    reason: FailureReason | None = None
    message: Text = ""
    output_tail: Lines = ()
