"""The container runtime as the agent uses it: a Protocol.

``runtime.DockerRuntime`` (docker-py) satisfies it, and so does the tests' runtime on an
in-memory engine (``tests/fakes/runtime.py``, ``tests/fakes/engine.py``); the same contract
tests (``tests/contracts/runtime_contract.py``) hold both to one behaviour. The broker's
ports are the transport's (``transport.ports``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from schemas import LaunchRun

from .containers import ContainerInfo
from .streams import Stream


class ContainerRuntime(Protocol):
    """Runs, inspects, stops and removes this agent's run containers, and follows them.

    Calls raise ``DockerUnavailable`` when the engine does not answer; ``launch`` raises
    ``ImageMissing`` or ``LaunchFailed`` too. Streams are blocking (read them with
    ``streams.read_on_thread``) and end, or raise ``DockerUnavailable``, when the engine goes.
    """

    async def launch(
        self, launch: LaunchRun, secret_keys: Sequence[str] = ()
    ) -> tuple[ContainerInfo, bool]:
        """Start the attempt's container, or adopt the one of the same name; (info, adopted).

        Attempts of the same run older than ``launch.attempt`` are removed first, unless they
        exited 0. ``secret_keys`` name the env variables holding secrets: their values come
        back in ``ContainerInfo.secrets`` (for redaction), also after a restart."""
        ...

    async def create(
        self, launch: LaunchRun, secret_keys: Sequence[str] = ()
    ) -> tuple[ContainerInfo, bool]:
        """``launch`` without the start: the container created (older attempts removed first,
        as there), or the one of the same name found in whatever state; (info, adopted)."""
        ...

    async def start(self, info: ContainerInfo) -> ContainerInfo:
        """Start a container ``create`` made (one already started is left as it is); its
        state after, as far as the start tells: "running" even when it exited at once (that
        exit comes from the events). Raises ``LaunchFailed`` when the engine refuses it."""
        ...

    async def inspect(self, container_id: str) -> ContainerInfo | None:
        """The container's state now; None when it no longer exists."""
        ...

    async def output_tail(
        self, container_id: str, lines: int, redact: Callable[[str], str] | None = None
    ) -> tuple[str, ...]:
        """The last ``lines`` lines of its output, each ``redact``-ed before it is cut to the
        contract's limits; () when it no longer exists."""
        ...

    async def stop(self, container_id: str, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; nothing for a container that is gone."""
        ...

    async def remove(self, container_id: str) -> None:
        """Remove it, running or not; nothing for a container that is gone."""
        ...

    async def list_managed(self) -> list[ContainerInfo]:
        """Every run container this agent labelled, whatever its state."""
        ...

    async def open_events(self, since: int | None) -> Stream:
        """Start, die and health events of this agent's containers, from ``since`` (UNIX
        seconds) on, following; raw Docker event dicts."""
        ...

    async def open_log_stream(self, container_id: str) -> Stream:
        """The container's output (chunks of bytes) from its start, until it ends."""
        ...
