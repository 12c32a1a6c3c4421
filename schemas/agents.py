"""What agents report about themselves, and the code locations they keep."""

from __future__ import annotations

import uuid
from typing import Annotated

import msgspec

from .bounds import (
    INT64_MAX,
    MAX_CONFIG_BYTES,
    MAX_IN_FLIGHT,
    MAX_LOCATION_JOBS,
    Argv,
    Attempt,
    Config,
    ContainerId,
    ContainerStatus,
    Cpus,
    Env,
    ExitCode,
    Generation,
    Gpus,
    ImageRef,
    Lines,
    MemoryMb,
    Name,
    Text,
    check_json,
)
from .envelope import Message


class ContainerState(msgspec.Struct, frozen=True, kw_only=True):
    """One in-flight attempt as its agent sees it, in a heartbeat."""

    run_id: uuid.UUID
    attempt: Attempt
    container_id: ContainerId | None = None
    state: ContainerStatus
    exit_code: ExitCode | None = None


class AgentHeartbeat(Message, frozen=True, kw_only=True, tag="AgentHeartbeat"):
    """An agent is alive; sent every heartbeat interval with what it is running."""

    agent_id: Name
    sequence: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
    queues: Annotated[tuple[Name, ...], msgspec.Meta(max_length=64)] = ()
    max_concurrent: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 0
    interval_s: Annotated[float, msgspec.Meta(ge=0.05, le=300)] = 2.0
    #: At most MAX_IN_FLIGHT: the attempts holding a slot first, then those just reported.
    in_flight: Annotated[tuple[ContainerState, ...], msgspec.Meta(max_length=MAX_IN_FLIGHT)] = ()
    draining: bool = False
    #: ``in_flight`` is complete: the agent has listed (adopted) its containers since it
    #: started. Until then a run missing from it proves nothing.
    synced: bool = True
    #: The capacity the agent declares; None: not counted (the host's own limit applies).
    cpus: Cpus | None = None
    memory_mb: MemoryMb | None = None
    gpus: Gpus = 0
    #: False while the agent's Docker engine does not answer its ping: past the monitor's
    #: loss threshold, the agent counts as lost (its runs fail over) though it still beats.
    engine_ok: bool = True
    engine_error: Text = ""


# ----------------------------------------------------------------------- code locations


class LocationSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A code location as agents keep it: one long-standing code server per agent.

    ``env`` values of the form ``secret:NAME`` are references: the agent resolves them from
    its own environment (``HD_SECRET_NAME``) on its host; the value never travels.
    """

    name: Name
    image: ImageRef
    command: Argv = ()
    env: Env = msgspec.field(default_factory=dict)
    generation: Generation = 1


class LocationSnapshot(Message, frozen=True, kw_only=True, tag="LocationSnapshot"):
    """Every location of one agent queue, as the control plane holds them now."""

    queue: Name
    locations: Annotated[tuple[LocationSpec, ...], msgspec.Meta(max_length=1000)] = ()
    #: Increases with every snapshot of the queue the control plane writes: an agent keeps
    #: the highest, so one sent late (or by another relay) does not undo a newer one. 0: not
    #: numbered (always taken).
    revision: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)] = 0


class LocationsWanted(Message, frozen=True, kw_only=True, tag="LocationsWanted"):
    """An agent (starting) asks for the snapshots of its queues."""

    agent_id: Name
    queues: Annotated[tuple[Name, ...], msgspec.Meta(max_length=64)]


class JobDefinition(msgspec.Struct, frozen=True, kw_only=True):
    """One job of a code location, as its code server describes it."""

    name: Name
    description: Text = ""
    config_schema: Config = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        check_json("config_schema", self.config_schema, MAX_CONFIG_BYTES)


class LocationLoaded(Message, frozen=True, kw_only=True, tag="LocationLoaded"):
    """A location's code server is healthy; these are its definitions."""

    location: Name
    generation: Generation
    agent_id: Name
    container_id: ContainerId
    jobs: Annotated[tuple[JobDefinition, ...], msgspec.Meta(max_length=MAX_LOCATION_JOBS)] = ()


class LocationFailed(Message, frozen=True, kw_only=True, tag="LocationFailed"):
    """A location's code server did not become healthy in time; its output says why."""

    location: Name
    generation: Generation
    agent_id: Name
    message: Text = ""
    output_tail: Lines = ()
