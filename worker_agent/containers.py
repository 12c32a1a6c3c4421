"""An agent's containers as Docker shows them: names, labels, what the agent reads of them."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import docker.types

from schemas import LaunchRun
from schemas.resources import Resources, nano_cpus

log = logging.getLogger(__name__)

LABEL_MANAGED_BY = "hybrid-dispatcher.managed-by"
LABEL_AGENT = "hybrid-dispatcher.agent-id"
LABEL_RUN = "hybrid-dispatcher.run-id"
LABEL_ATTEMPT = "hybrid-dispatcher.attempt"
#: The env keys whose values are secrets (resolved on this host): the values are redacted
#: from the container's output, also by an agent that adopts it after a restart.
LABEL_SECRET_ENV = "hybrid-dispatcher.secret-env"
MANAGED_BY = "worker-agent"
#: Bytes in a MB, as Docker reads a memory limit of "<n>m".
MB = 1024 * 1024


def container_name(run_id: uuid.UUID, attempt: int) -> str:
    """The one name an attempt's container can have: a second create of it fails."""
    return f"hd-run-{run_id}-{attempt}"


@dataclass(frozen=True)
class ContainerInfo:
    """What the agent needs to know of one of its containers."""

    id: str
    name: str
    run_id: uuid.UUID
    attempt: int
    status: str  # created, running, paused, restarting, removing, exited, dead
    exit_code: int | None
    oom_killed: bool
    #: "starting", "healthy" or "unhealthy" for a container with a ready check, else None.
    health: str | None = None
    #: When the container exited (UNIX time), for a finished container.
    finished_at: float | None = None
    #: The values of its secret env variables (to redact from its output); never sent.
    secrets: tuple[str, ...] = ()
    #: What it was created with: CPUs, memory limit and GPUs (held by an adopted attempt).
    resources: Resources = field(default_factory=Resources)
    #: The agent that created it (its label).
    agent_id: str = ""
    #: It was created with a ready check (a Docker health check).
    ready_check: bool = False

    @property
    def ready(self) -> bool:
        """Running, and past its ready check if it has one."""
        return self.status != "created" and self.health in (None, "healthy")

    @property
    def finished(self) -> bool:
        return self.status in ("exited", "dead")

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> ContainerInfo:
        labels = attrs["Config"]["Labels"] or {}
        state = attrs["State"]
        secret_keys = _secret_keys(labels.get(LABEL_SECRET_ENV))
        env = dict(item.partition("=")[::2] for item in attrs["Config"].get("Env") or ())
        status = state.get("Status", "unknown")
        return cls(
            id=attrs["Id"],
            name=attrs["Name"].lstrip("/"),
            run_id=uuid.UUID(labels[LABEL_RUN]),
            attempt=int(labels[LABEL_ATTEMPT]),
            status=status,
            exit_code=state.get("ExitCode") if status in ("exited", "dead") else None,
            oom_killed=bool(state.get("OOMKilled")),
            health=(state.get("Health") or {}).get("Status"),
            finished_at=timestamp(state.get("FinishedAt"))
            if status in ("exited", "dead")
            else None,
            secrets=tuple(env[k] for k in sorted(secret_keys) if k in env),
            resources=_resources(attrs.get("HostConfig") or {}),
            agent_id=labels.get(LABEL_AGENT, ""),
            ready_check=bool((attrs["Config"].get("Healthcheck") or {}).get("Test")),
        )


def managed(found: Sequence[dict[str, Any]]) -> list[ContainerInfo]:
    """The containers of ``found`` (inspections) as this agent's runs; one whose labels do not
    read as a run's (made by hand with the agent's labels, say) is left alone, with a warning:
    it must not stop the agent from starting or watching the others."""
    infos = []
    for attrs in found:
        try:
            infos.append(ContainerInfo.from_attrs(attrs))
        except (KeyError, ValueError, TypeError) as exc:
            log.warning(
                "container %s has this agent's labels but not a run's (%r); left alone",
                str(attrs.get("Id", "?"))[:12],
                exc,
            )
    return infos


def _resources(host: dict[str, Any]) -> Resources:
    """What a container's HostConfig gives it, as its run asked (``run_options``)."""
    gpus = sum(
        max(0, int(request.get("Count") or 0))
        for request in host.get("DeviceRequests") or ()
        if ["gpu"] in (request.get("Capabilities") or ())
    )
    return Resources(
        nano_cpus=int(host.get("NanoCpus") or 0),
        memory_mb=int(host.get("Memory") or 0) // MB,
        gpus=gpus,
    )


def container_labels(
    agent_id: str, launch: LaunchRun, secret_keys: Sequence[str] = ()
) -> dict[str, str]:
    """The labels of an attempt's container: whose it is, and which env keys hold secrets
    (as a JSON list: a key may hold ",")."""
    labels = {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_AGENT: agent_id,
        LABEL_RUN: str(launch.run_id),
        LABEL_ATTEMPT: str(launch.attempt),
    }
    if secret_keys:
        labels[LABEL_SECRET_ENV] = json.dumps(list(secret_keys))
    return labels


def _secret_keys(label: str | None) -> set[str]:
    """The env keys a container's label names as secrets (a JSON list; keys may hold ",")."""
    try:
        keys = json.loads(label) if label else []
    except ValueError:
        return set()
    return {k for k in keys if isinstance(k, str)} if isinstance(keys, list) else set()


def timestamp(value: str | None) -> float | None:
    """Docker's RFC 3339 time with nanoseconds, as UNIX time."""
    if not value or value.startswith("0001-"):
        return None
    head, _, fraction = value.rstrip("Z").partition(".")
    try:
        whole = datetime.fromisoformat(head).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None
    digits = "".join(ch for ch in fraction if ch.isdigit())
    return whole + (float(f"0.{digits}") if digits else 0.0)


def run_options(launch: LaunchRun) -> dict[str, Any]:
    """Docker options for the run's resources (memory limit, CPUs, GPUs) and ready check."""
    options: dict[str, Any] = {}
    if launch.memory_limit_mb is not None:
        # Swap counts against the same limit, so that the limit is the limit.
        options["mem_limit"] = f"{launch.memory_limit_mb}m"
        options["memswap_limit"] = f"{launch.memory_limit_mb}m"
    if launch.cpus is not None:
        options["nano_cpus"] = nano_cpus(launch.cpus)
    if launch.gpus > 0:
        # As `docker run --gpus N`: any N GPUs of the host, through its GPU runtime.
        options["device_requests"] = [
            docker.types.DeviceRequest(count=launch.gpus, capabilities=[["gpu"]])
        ]
    if launch.ready_check:
        options["healthcheck"] = {
            "test": ["CMD", *launch.ready_check],
            "interval": 250_000_000,  # ns
            "timeout": 5_000_000_000,
            "retries": 1,
        }
    return options
