"""An in-memory Docker engine (``FakeEngine``); ``runtime.FakeDockerRuntime`` is the agent's
runtime on it (a ``worker_agent.ports.ContainerRuntime``).

A model, not canned answers: containers have names (unique: a second create of one is a
conflict), labels, environment, states (created, running, exited) with exit codes, output,
health, and events; a container's process is its command, interpreted: ``sh -c`` scripts of
``echo``, ``exit``, ``true``, ``false`` and ``sleep``, or one of those alone; an executable the
image lacks fails the start, as with runc. The runtime carries out the adapter's rules on it
(adopt the container of an attempt that exists, fence older attempts, pull a missing image,
translate failures). ``tests/contracts/runtime_contract.py`` holds the two together to
``DockerRuntime`` on a real engine.

Time is not modelled: ``sleep`` runs until the container is stopped (or a test ends it), a
container that ignores SIGTERM is killed at once (137), a ready check runs when the test
calls ``check_health``. Things that happen by themselves on a real engine are the test's to
make happen: ``exit``, ``write``, ``set_health``, ``stop_answering``.
"""

from __future__ import annotations

import asyncio
import os
import queue
import shlex
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from transport.ports import Clock
from worker_agent.containers import ContainerInfo
from worker_agent.errors import DockerUnavailable, LaunchFailed

if TYPE_CHECKING:
    from .runtime import FakeDockerRuntime

#: The image the tests run (busybox in the real one).
RUN_IMAGE = "hybrid-dispatcher/run-tiny:latest"
#: What a command may run on the fake engine; anything else fails to start.
EXECUTABLES = frozenset({"sh", "echo", "sleep", "true", "false"})
#: The exit code of a killed process (128 + SIGKILL).
KILLED = 137


class NameConflict(LaunchFailed):
    """A container of that name exists: Docker's 409, the kind of error the adapter surfaces
    for it (``LaunchFailed``) when it does not adopt the container instead."""


class StartFailed(LaunchFailed):
    """The container's process could not be started (runc's "executable file not found")."""


@dataclass(frozen=True)
class FakeImage:
    name: str
    command: tuple[str, ...] = ("/bin/sh",)
    env: tuple[str, ...] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
    executables: frozenset[str] = EXECUTABLES


# ------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Program:
    """What a container's process does: writes ``output``, then exits with ``exit_code``, or
    runs until stopped (``exit_code`` None)."""

    output: str
    exit_code: int | None


def interpret(command: tuple[str, ...], image: FakeImage) -> Program:
    """The process a command starts; raises StartFailed when its executable is missing."""
    executable = os.path.basename(command[0])
    if executable not in image.executables:
        raise StartFailed(f'exec: "{command[0]}": executable file not found in $PATH: unknown')
    if executable == "sh":
        if len(command) >= 3 and command[1] == "-c":
            return _script(command[2])
        return Program("", 0)  # no script and no input: the shell ends at once
    return _statements([list(command)])


def _script(script: str) -> Program:
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";")
    lexer.whitespace_split = True
    statements: list[list[str]] = [[]]
    for token in lexer:
        if token == ";" or token == "\n":
            statements.append([])
        else:
            statements[-1].append(token)
    return _statements(statements)


def _statements(statements: list[list[str]]) -> Program:
    output: list[str] = []
    status = 0
    for words in statements:
        if not words:
            continue
        name, args = os.path.basename(words[0]), words[1:]
        if name == "echo":
            output.append(" ".join(args) + "\n")
            status = 0
        elif name == "exit":
            return Program("".join(output), int(args[0]) if args else status)
        elif name == "sleep":
            return Program("".join(output), None)
        elif name in ("true", "false"):
            status = int(name == "false")
        else:
            output.append(f"sh: {name}: not found\n")
            status = 127
    return Program("".join(output), status)


# --------------------------------------------------------------------------- streams

_END = object()


class FakeStream:
    """A blocking stream (``worker_agent.streams.Stream``): fed on the loop's thread,
    iterated on another, closed from any."""

    def __init__(self) -> None:
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = threading.Event()

    def put(self, item: Any) -> None:
        self._items.put(item)

    def end(self) -> None:
        self._items.put(_END)

    def fail(self, error: Exception) -> None:
        self._items.put(error)

    def __iter__(self) -> Iterator[Any]:
        while not self._closed.is_set():
            item = self._items.get()
            if item is _END or self._closed.is_set():
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def close(self) -> None:
        self._closed.set()
        self._items.put(_END)


# ------------------------------------------------------------------------- containers


@dataclass
class FakeContainer:
    id: str
    name: str
    image: FakeImage
    command: tuple[str, ...]
    env: dict[str, str]
    labels: dict[str, str]
    healthcheck: tuple[str, ...] | None = None
    mem_limit_mb: int | None = None
    #: The Docker options it was created with (``containers.run_options``): nano_cpus,
    #: device_requests... as the real runtime passes them to ``containers.create``.
    options: dict[str, Any] = field(default_factory=dict)
    status: str = "created"
    exit_code: int = 0
    error: str = ""
    oom_killed: bool = False
    #: Killed for memory, but the engine records it only after its exit was first inspected
    #: (Docker handles the kernel's word and the exit separately, in either order).
    oom_recorded_late: bool = False
    inspected: int = 0
    health: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    output: list[bytes] = field(default_factory=list)
    #: The exit code when SIGTERM ends it; None: the process ignores SIGTERM (killed).
    term_exit_code: int | None = None
    followers: list[FakeStream] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status in ("exited", "dead")

    def attrs(self) -> dict[str, Any]:
        """The engine's inspection of it, in Docker's shape (read by ContainerInfo)."""
        state: dict[str, Any] = {
            "Status": self.status,
            "Running": self.status == "running",
            "ExitCode": self.exit_code,
            "OOMKilled": self.oom_killed,
            "Error": self.error,
            "StartedAt": _rfc3339(self.started_at),
            "FinishedAt": _rfc3339(self.finished_at),
        }
        if self.health is not None:
            state["Health"] = {"Status": self.health}
        return {
            "Id": self.id,
            "Name": f"/{self.name}",
            "Config": {
                "Image": self.image.name,
                "Cmd": list(self.command),
                "Env": [*self.image.env, *(f"{k}={v}" for k, v in self.env.items())],
                "Labels": dict(self.labels),
            },
            "State": state,
            "HostConfig": {
                "NanoCpus": self.options.get("nano_cpus", 0),
                "Memory": (self.mem_limit_mb or 0) * 1024 * 1024,
                "DeviceRequests": [dict(r) for r in self.options.get("device_requests", ())]
                or None,
            },
        }

    def gpus(self) -> int:
        """GPUs its device requests ask for."""
        return sum(int(r["Count"]) for r in self.options.get("device_requests", ()))

    def info(self) -> ContainerInfo:
        return ContainerInfo.from_attrs(self.attrs())


def _rfc3339(at: float | None) -> str:
    if at is None:
        return "0001-01-01T00:00:00Z"
    whole = datetime.fromtimestamp(int(at), UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{whole}.{round((at - int(at)) * 1e9):09d}Z"


class FakeEngine:
    """One Docker engine: images, containers, output, events; shared by its runtimes."""

    def __init__(self, clock: Clock = time.time, images: Iterable[str] = (RUN_IMAGE,)) -> None:
        self.clock = clock
        #: Output streams opened; of them, on a running container (followed live).
        self.follows = 0
        self.live_follows = 0
        self.images: dict[str, FakeImage] = {name: FakeImage(name) for name in images}
        #: Images a pull would find (none: the registry is out of reach).
        self.registry: dict[str, FakeImage] = {}
        self.containers: dict[str, FakeContainer] = {}
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.answering = True
        #: GPUs the engine's GPU runtime has (none, as on the hosts the tests run on).
        self.gpus = 0
        self._watchers: list[tuple[FakeStream, Callable[[dict[str, Any]], bool]]] = []

    def runtime(self, agent_id: str, pull: str = "if-missing") -> FakeDockerRuntime:
        from .runtime import FakeDockerRuntime

        return FakeDockerRuntime(self, agent_id, pull)

    # --------------------------------------------------- what a test makes happen

    def exit(
        self, container_id: str, code: int, oom_killed: bool = False, recorded_late: bool = False
    ) -> None:
        """The container's process ends by itself with ``code``; ``recorded_late``: killed
        for memory, which the engine says only from the second inspection on."""
        container = self.get(container_id)
        container.oom_recorded_late = oom_killed and recorded_late
        self._finish(container, code, oom_killed=oom_killed and not recorded_late)

    def write(self, container_id: str, text: str) -> None:
        """The container's process writes ``text`` (stdout and stderr are one stream)."""
        self._write(self.get(container_id), text.encode())

    def set_health(self, container_id: str, status: str) -> None:
        container = self.get(container_id)
        if container.health != status:
            container.health = status
            self._emit(container, f"health_status: {status}")

    def check_health(self) -> None:
        """Run every running container's ready check once (an interval passed)."""
        for container in list(self.containers.values()):
            if container.status != "running" or container.healthcheck is None:
                continue
            try:
                program = interpret(container.healthcheck, container.image)
            except StartFailed:
                program = Program("", 127)
            self.set_health(container.id, "healthy" if program.exit_code == 0 else "unhealthy")

    def handles_sigterm(self, container_id: str, exit_code: int) -> None:
        """The container's process exits with ``exit_code`` on SIGTERM (else it is killed)."""
        self.get(container_id).term_exit_code = exit_code

    def stop_answering(self) -> None:
        """The engine is out of reach: calls fail, open streams break."""
        self.answering = False
        streams = [stream for stream, _ in self._watchers]
        streams += [s for c in self.containers.values() for s in c.followers]
        self._watchers.clear()
        for container in self.containers.values():
            container.followers.clear()
        for stream in streams:
            stream.fail(DockerUnavailable("a Docker stream broke: the engine went away"))

    def answer_again(self) -> None:
        self.answering = True

    def get(self, ref: str) -> FakeContainer:
        found = self.find(ref)
        if found is None:
            raise KeyError(f"no container {ref}")
        return found

    def find(self, ref: str) -> FakeContainer | None:
        """A container by id or name, as Docker resolves references."""
        if ref in self.containers:
            return self.containers[ref]
        return next((c for c in self.containers.values() if c.name == ref), None)

    def labelled(self, **labels: str) -> list[FakeContainer]:
        return [
            c
            for c in self.containers.values()
            if all(c.labels.get(k) == v for k, v in labels.items())
        ]

    # -------------------------------------------------------------- the engine's API

    def create(
        self,
        image: str,
        command: tuple[str, ...],
        name: str,
        labels: dict[str, str],
        env: dict[str, str],
        healthcheck: tuple[str, ...] | None = None,
        mem_limit_mb: int | None = None,
        options: dict[str, Any] | None = None,
    ) -> FakeContainer:
        existing = self.find(name)
        if existing is not None:
            raise NameConflict(
                f'Conflict. The container name "/{name}" is already in use by container '
                f'"{existing.id}". You have to remove (or rename) that container to be able to '
                "reuse that name."
            )
        spec = self.images[image]
        container = FakeContainer(
            id=uuid.uuid4().hex + uuid.uuid4().hex,
            name=name,
            image=spec,
            command=command or spec.command,
            env=dict(env),
            labels=dict(labels),
            healthcheck=healthcheck,
            mem_limit_mb=mem_limit_mb,
            options=dict(options or {}),
        )
        self.containers[container.id] = container
        self._emit(container, "create")
        return container

    def start(self, container: FakeContainer) -> None:
        if container.status == "running":
            return
        try:
            if container.gpus() > self.gpus:
                # What the real engine says with no GPU runtime (no NVIDIA toolkit).
                raise StartFailed('could not select device driver "" with capabilities: [[gpu]]')
            program = interpret(container.command, container.image)
        except StartFailed as exc:
            container.exit_code = 127
            container.error = f"OCI runtime create failed: {exc}"
            raise
        container.status = "running"
        container.exit_code = 0
        container.started_at = self.clock()
        container.health = "starting" if container.healthcheck else None
        self._emit(container, "start")
        # The process runs once the start has returned, as it does on a real engine.
        asyncio.get_running_loop().call_soon(self._run, container.id, program)

    def _run(self, container_id: str, program: Program) -> None:
        container = self.containers.get(container_id)
        if container is None or container.status != "running":
            return
        if program.output:
            self._write(container, program.output.encode())
        if program.exit_code is not None:
            self._finish(container, program.exit_code)

    def stop(self, container: FakeContainer) -> None:
        if container.status != "running":
            return
        if container.term_exit_code is not None:
            self._finish(container, container.term_exit_code)
        else:
            self._emit(container, "kill", signal="9")
            self._finish(container, KILLED)

    def remove(self, container: FakeContainer) -> None:
        if container.status == "running":
            self._emit(container, "kill", signal="9")
            self._finish(container, KILLED)
        self.containers.pop(container.id, None)
        for stream in container.followers:
            stream.end()
        container.followers.clear()
        self._emit(container, "destroy")

    def follow(self, container: FakeContainer) -> FakeStream:
        stream = FakeStream()
        self.follows += 1
        for chunk in container.output:
            stream.put(chunk)
        if container.status == "running":
            self.live_follows += 1
            container.followers.append(stream)
        else:
            stream.end()
        return stream

    def watch(self, since: int | None, wanted: Callable[[dict[str, Any]], bool]) -> FakeStream:
        stream = FakeStream()
        if since is not None:
            for at, event in self.events:
                if at >= since and wanted(event):
                    stream.put(event)
        self._watchers.append((stream, wanted))
        return stream

    def _write(self, container: FakeContainer, chunk: bytes) -> None:
        container.output.append(chunk)
        for stream in container.followers:
            stream.put(chunk)

    def _finish(self, container: FakeContainer, code: int, oom_killed: bool = False) -> None:
        if container.status != "running":
            return
        container.status = "exited"
        container.exit_code = code
        container.oom_killed = oom_killed
        container.finished_at = self.clock()
        if oom_killed:
            self._emit(container, "oom")
        self._emit(container, "die", exitCode=str(code))
        for stream in container.followers:
            stream.end()
        container.followers.clear()

    def _emit(self, container: FakeContainer, action: str, **attributes: str) -> None:
        at = self.clock()
        event = {
            "Type": "container",
            "Action": action,
            "status": action,
            "id": container.id,
            "from": container.image.name,
            "Actor": {
                "ID": container.id,
                "Attributes": {
                    **container.labels,
                    "image": container.image.name,
                    "name": container.name,
                    **attributes,
                },
            },
            "scope": "local",
            "time": int(at),
            "timeNano": int(at * 1e9),
        }
        self.events.append((at, event))
        for stream, wanted in list(self._watchers):
            if wanted(event):
                stream.put(event)
