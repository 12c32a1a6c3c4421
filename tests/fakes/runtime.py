"""``FakeDockerRuntime``: ``worker_agent.ports.ContainerRuntime`` on a ``FakeEngine``.

It carries out the adapter's rules on the engine (adopt the container of an attempt that
exists, fence older attempts, pull a missing image, translate failures into
``DockerUnavailable``, ``ImageMissing`` and ``LaunchFailed``). A container keeps the Docker
options its launch asked for (``FakeContainer.options``: ``nano_cpus``, ``device_requests``...,
as ``DockerRuntime`` passes them to ``containers.create``) and shows them in its HostConfig.
Held to ``DockerRuntime`` on a real engine by ``tests/contracts/runtime_contract.py``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from schemas import LaunchRun
from schemas.bounds import IMAGE_REF_PATTERN
from worker_agent import limits
from worker_agent.containers import (
    LABEL_AGENT,
    LABEL_ATTEMPT,
    LABEL_MANAGED_BY,
    LABEL_RUN,
    MANAGED_BY,
    ContainerInfo,
    container_labels,
    container_name,
    managed,
    run_options,
)
from worker_agent.errors import DockerUnavailable, ImageMissing, LaunchFailed
from worker_agent.ports import ContainerRuntime

from .engine import RUN_IMAGE, FakeContainer, FakeEngine, FakeStream, NameConflict, StartFailed

__all__ = ["RUN_IMAGE", "FakeContainer", "FakeDockerRuntime", "FakeEngine"]


_EVENTS = ("start", "die", "oom", "health_status")


class FakeDockerRuntime:
    """``worker_agent.ports.ContainerRuntime`` on a ``FakeEngine``, for agent ``agent_id``."""

    def __init__(self, engine: FakeEngine, agent_id: str, pull: str = "if-missing") -> None:
        self.engine = engine
        self.agent_id = agent_id
        self.pull = pull
        self._closed = False
        #: Times a container's output tail was read from the engine.
        self.tail_reads = 0
        #: Every stop asked for (container, grace), and, when set, what a stop waits for
        #: before it acts: a container taking its grace to go.
        self.stops: list[tuple[str, float]] = []
        self.stop_gate: asyncio.Event | None = None

    async def _call(self) -> None:
        """A call to the engine: it yields to the loop (the real one hops to a thread)."""
        if self._closed:
            raise DockerUnavailable("the container runtime is closed")
        await asyncio.sleep(0)
        if not self.engine.answering:
            raise DockerUnavailable("the Docker engine does not answer: connection refused")

    def labels_for(self, launch: LaunchRun, secret_keys: Sequence[str] = ()) -> dict[str, str]:
        return container_labels(self.agent_id, launch, secret_keys)

    async def launch(
        self, launch: LaunchRun, secret_keys: Sequence[str] = ()
    ) -> tuple[ContainerInfo, bool]:
        info, adopted = await self.create(launch, secret_keys)
        return await self.start(info), adopted

    async def start(self, info: ContainerInfo) -> ContainerInfo:
        await self._call()
        container = self.engine.find(info.name)
        if container is None or container.id != info.id:
            raise LaunchFailed(f"cannot start the container: No such container: {info.id}")
        if container.status == "created":
            try:
                self.engine.start(container)
            except StartFailed as exc:
                raise LaunchFailed(f"cannot start the container: {exc}") from exc
        return container.info()

    async def create(
        self, launch: LaunchRun, secret_keys: Sequence[str] = ()
    ) -> tuple[ContainerInfo, bool]:
        await self._call()
        engine = self.engine
        name = container_name(launch.run_id, launch.attempt)
        container = engine.find(name)
        adopted = True
        if container is None:
            adopted = False
            self._fence_older_attempts(launch)
            self._ensure_image(launch.image)
            # Another launch of the attempt may create it meanwhile, as on a real engine.
            await self._call()
            try:
                container = engine.create(
                    launch.image,
                    tuple(launch.command),
                    name,
                    self.labels_for(launch, secret_keys),
                    dict(launch.env),
                    tuple(launch.ready_check) or None,
                    launch.memory_limit_mb,
                    run_options(launch),
                )
            except NameConflict:
                adopted = True
                container = engine.find(name)
                if container is None:
                    raise LaunchFailed(
                        f"the Docker engine refused: No such container: {name}"
                    ) from None
        return container.info(), adopted

    def _fence_older_attempts(self, launch: LaunchRun) -> None:
        if launch.attempt == 1:
            return
        for container in self.engine.labelled(**{LABEL_RUN: str(launch.run_id)}):
            if int(container.labels.get(LABEL_ATTEMPT, "0")) >= launch.attempt:
                continue
            if container.finished and container.exit_code == 0:
                continue  # its work is done: the proof of that success stays
            self.engine.remove(container)

    def _ensure_image(self, image: str) -> None:
        if self.pull != "always" and image in self.engine.images:
            return
        if re.match(IMAGE_REF_PATTERN, image) is None:
            raise ImageMissing(f"image {image!r} is invalid: invalid reference format")
        if self.pull == "never":
            raise ImageMissing(
                f"image {image!r} is not on this host, and this agent never pulls "
                "(--pull never): load it on the host first"
            )
        pulled = self.engine.registry.get(image)
        if pulled is None:
            where = "(--pull always)" if self.pull == "always" else "is not on this host and"
            raise ImageMissing(f"image {image!r} {where} cannot be pulled: pull access denied")
        self.engine.images[image] = pulled

    async def inspect(self, container_id: str) -> ContainerInfo | None:
        await self._call()
        container = self.engine.find(container_id)
        if container is None:
            return None
        if container.oom_recorded_late and container.inspected:
            container.oom_killed = True
        container.inspected += 1
        return container.info()

    async def output_tail(
        self, container_id: str, lines: int, redact: Callable[[str], str] | None = None
    ) -> tuple[str, ...]:
        await self._call()
        self.tail_reads += 1
        container = self.engine.find(container_id)
        if container is None:
            return ()
        found = b"".join(container.output).decode("utf-8", errors="replace").splitlines()
        return limits.tail(map(redact, found) if redact else found, lines)

    async def stop(self, container_id: str, grace_s: float) -> None:
        await self._call()
        self.stops.append((container_id, grace_s))
        if self.stop_gate is not None:
            await self.stop_gate.wait()
        container = self.engine.find(container_id)
        if container is not None:
            self.engine.stop(container)

    async def remove(self, container_id: str) -> None:
        await self._call()
        container = self.engine.find(container_id)
        if container is not None:
            self.engine.remove(container)

    async def list_managed(self) -> list[ContainerInfo]:
        await self._call()
        mine = self.engine.labelled(**{LABEL_MANAGED_BY: MANAGED_BY, LABEL_AGENT: self.agent_id})
        return managed([c.attrs() for c in mine if LABEL_RUN in c.labels])

    async def open_events(self, since: int | None) -> FakeStream:
        try:
            await self._call()
        except DockerUnavailable as exc:
            raise DockerUnavailable(f"cannot follow Docker events: {exc}") from exc

        def wanted(event: dict[str, Any]) -> bool:
            labels = event["Actor"]["Attributes"]
            action = str(event["Action"])
            return (
                event["Type"] == "container"
                and labels.get(LABEL_AGENT) == self.agent_id
                and action.split(":")[0] in _EVENTS
            )

        return self.engine.watch(since, wanted)

    async def open_log_stream(self, container_id: str) -> FakeStream:
        what = f"the output of {container_id[:12]}"
        try:
            await self._call()
        except DockerUnavailable as exc:
            raise DockerUnavailable(f"cannot follow {what}: {exc}") from exc
        container = self.engine.find(container_id)
        if container is None:
            raise DockerUnavailable(
                f"cannot follow {what}: the Docker engine refused: No such container: "
                f"{container_id}"
            )
        return self.engine.follow(container)

    def close(self) -> None:
        self._closed = True


if TYPE_CHECKING:

    def _a_port(fake: FakeDockerRuntime) -> ContainerRuntime:
        return fake  # mypy: the fake is a ContainerRuntime
