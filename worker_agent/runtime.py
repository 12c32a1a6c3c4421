"""The container runtime: the Docker SDK behind async methods that never block the loop.

Every short SDK call runs on the runtime's own thread pool, sized from the agent's slots, and
never on asyncio's default executor; long-lived streams are read elsewhere (``streams``), so
that no call waits behind one. docker-py and requests exceptions are translated here into
``DockerUnavailable``, ``ImageMissing`` and ``LaunchFailed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import docker
import docker.errors
import docker.utils
from docker.models.containers import RUN_CREATE_KWARGS

from schemas import LaunchRun
from schemas.resources import Resources

from . import limits
from .containers import (
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
from .errors import DockerUnavailable, ImageMissing, LaunchFailed
from .policy import LaunchPolicy
from .streams import UNAVAILABLE, EventStream

log = logging.getLogger(__name__)


class DockerRuntime:
    """Creates, inspects and removes the agent's containers on the local engine."""

    def __init__(
        self,
        agent_id: str,
        pull_timeout_s: float = 30.0,
        threads: int = 8,
        policy: LaunchPolicy | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.policy = policy or LaunchPolicy()
        self._pull_timeout_s = pull_timeout_s
        #: Threads for short calls, and as many HTTP connections: with fewer connections
        #: than threads, calls would wait for one.
        self.threads = threads
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="docker")
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ plumbing

    def _docker(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                try:
                    self._client = docker.from_env(timeout=60, max_pool_size=self.threads)
                except (docker.errors.DockerException, ValueError) as exc:
                    # A DOCKER_HOST that is no URL (its port no number) is a ValueError.
                    raise DockerUnavailable(f"no Docker engine answers: {exc}") from exc
            return self._client

    async def call(self, fn: Callable[[docker.DockerClient], Any]) -> Any:
        """Run a short Docker call (given the client) on the runtime's pool, its errors
        translated into the agent's (``DockerUnavailable``, ``LaunchFailed``)."""
        return await self.run_blocking(lambda: fn(self._docker()))

    async def run_blocking(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (which talks to Docker) on the runtime's pool, its errors translated."""

        def guarded() -> Any:
            try:
                return fn()
            except UNAVAILABLE as exc:
                raise DockerUnavailable(f"the Docker engine does not answer: {exc}") from exc
            except docker.errors.APIError as exc:
                if exc.is_server_error():
                    raise DockerUnavailable(f"the Docker engine failed: {_explain(exc)}") from exc
                raise LaunchFailed(f"the Docker engine refused: {_explain(exc)}") from exc
            except docker.errors.DockerException as exc:
                raise DockerUnavailable(f"the Docker engine does not answer: {exc}") from exc

        if self._closed:
            raise DockerUnavailable("the container runtime is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, guarded)

    def labels_for(self, launch: LaunchRun, secret_keys: Sequence[str] = ()) -> dict[str, str]:
        return container_labels(self.agent_id, launch, secret_keys)

    # ------------------------------------------------------------------- actions

    def probe(self, timeout_s: float) -> Callable[[], object]:
        """A blocking ping on a client of its own with a short timeout, for ``EngineHealth``:
        the pool's calls wait up to a minute for a frozen engine."""
        clients: list[Any] = []

        def ping() -> object:
            if not clients:
                clients.append(docker.from_env(timeout=timeout_s).api)
            return clients[0].ping()

        return ping

    async def ping(self) -> str:
        """The engine's version; raises DockerUnavailable when it does not answer."""
        return str(await self.call(lambda client: client.version().get("Version", "?")))

    async def launch(
        self, launch: LaunchRun, secret_keys: Sequence[str] = ()
    ) -> tuple[ContainerInfo, bool]:
        """Start the attempt's container, or adopt the one that exists; (info, adopted).

        ``secret_keys``: the env keys whose values are secrets, labelled for redaction.
        """
        info, adopted = await self.create(launch, secret_keys)
        return await self.start(info), adopted

    async def create(
        self, launch: LaunchRun, secret_keys: Sequence[str] = ()
    ) -> tuple[ContainerInfo, bool]:
        """Create the attempt's container without starting it, or find the one that exists
        (in whatever state); (info, adopted)."""
        return await self.call(lambda client: self._create(client, launch, secret_keys))  # type: ignore[no-any-return]

    async def start(self, info: ContainerInfo) -> ContainerInfo:
        """Start a container that was created and never started: running, as far as the
        start tells (its exit, however soon, comes from the events)."""

        def start(client: docker.DockerClient) -> ContainerInfo:
            if info.status != "created":
                return info
            try:
                client.api.start(info.id)
            except docker.errors.APIError as exc:
                raise LaunchFailed(f"cannot start the container: {_explain(exc)}") from exc
            # No inspect: the exit of a container over this soon comes from the events.
            return dataclasses.replace(
                info, status="running", health="starting" if info.ready_check else None
            )

        return await self.call(start)  # type: ignore[no-any-return]

    def _create(
        self, client: docker.DockerClient, launch: LaunchRun, secret_keys: Sequence[str]
    ) -> tuple[ContainerInfo, bool]:
        """The create is sent first, without looking for the name or the image: on the
        launch path every round trip to the engine counts. A 409 means the attempt's
        container exists (adopted); a missing image is pulled as the policy says, once."""
        name = container_name(launch.run_id, launch.attempt)
        self._fence_older_attempts(client, launch)
        if self.policy.pull == "always":
            self.ensure_image(client, launch.image)
        pulled = self.policy.pull == "always"
        while True:
            try:
                return self._create_container(client, launch, name, secret_keys), False
            except docker.errors.ImageNotFound:
                if pulled:
                    raise ImageMissing(f"image {launch.image!r} is not on this host") from None
                self.ensure_image(client, launch.image)
                pulled = True
            except docker.errors.APIError as exc:
                if exc.status_code == 400 and "reference format" in _explain(exc):
                    raise ImageMissing(
                        f"image {launch.image!r} is invalid: {_explain(exc)}"
                    ) from exc
                if exc.status_code != 409:  # 409: the name exists (adopted, or a racing create)
                    raise LaunchFailed(f"cannot create the container: {_explain(exc)}") from exc
                try:
                    return ContainerInfo.from_attrs(client.api.inspect_container(name)), True
                except docker.errors.NotFound as gone:
                    # The name is taken by a create still on its way (or a container removed
                    # meanwhile): the launcher tries again shortly.
                    raise DockerUnavailable(f"container {name} is being made or removed") from gone

    def _create_container(
        self,
        client: docker.DockerClient,
        launch: LaunchRun,
        name: str,
        secret_keys: Sequence[str],
    ) -> ContainerInfo:
        """One POST: the container's state is known from what was asked, so no inspect
        follows (docker-py's ``containers.create`` makes one)."""
        options = {**run_options(launch), **self.policy.container_options()}
        create = {key: options.pop(key) for key in list(options) if key in RUN_CREATE_KWARGS}
        env = dict(launch.env)
        made = client.api.create_container(
            launch.image,
            list(launch.command) or None,
            name=name,
            labels=self.labels_for(launch, secret_keys),
            environment=env,
            detach=True,
            host_config=client.api.create_host_config(**options),
            **create,
        )
        return ContainerInfo(
            ready_check=bool(launch.ready_check),
            id=made["Id"],
            name=name,
            run_id=launch.run_id,
            attempt=launch.attempt,
            status="created",
            exit_code=None,
            oom_killed=False,
            secrets=tuple(env[key] for key in sorted(set(secret_keys)) if key in env),
            resources=Resources.asked(launch.cpus, launch.memory_limit_mb, launch.gpus),
            agent_id=self.agent_id,
        )

    def _fence_older_attempts(self, client: docker.DockerClient, launch: LaunchRun) -> None:
        """Kill and remove this engine's containers of the run's earlier attempts.

        Attempt N + 1 exists only because attempt N was failed over, so whatever agent still
        holds an older container (lost, frozen, or gone for good), it must not run beside the
        new one: at most one attempt of a run is alive on an engine. An older container that
        exited 0 is left in place: its work is done, and its agent may not have reported it
        yet; removing it would lose the proof of that success.
        """
        if launch.attempt == 1:
            return
        found = client.api.containers(all=True, filters={"label": f"{LABEL_RUN}={launch.run_id}"})
        for summary in found:
            label = str((summary.get("Labels") or {}).get(LABEL_ATTEMPT, "0"))
            # A label that is no attempt number is no later attempt either: fenced as older.
            older = int(label) if label.isdecimal() and len(label) < 10 else 0
            if older >= launch.attempt:
                continue
            short = summary["Id"][:12]
            try:
                state = client.api.inspect_container(summary["Id"]).get("State") or {}
            except docker.errors.NotFound:
                continue
            status = state.get("Status", "unknown")
            exit_code = state.get("ExitCode") if status in ("exited", "dead") else None
            if exit_code == 0:
                log.warning(
                    "run %s attempt %d: superseded attempt %d exited 0; its container %s is "
                    "left in place",
                    launch.run_id,
                    launch.attempt,
                    older,
                    short,
                )
                continue
            log.warning(
                "run %s attempt %d: removing the container of superseded attempt %d (%s, %s)",
                launch.run_id,
                launch.attempt,
                older,
                short,
                status if exit_code is None else f"exited {exit_code}",
            )
            with contextlib.suppress(docker.errors.NotFound):
                client.api.remove_container(summary["Id"], force=True, v=True)

    def ensure_image(self, client: docker.DockerClient, image: str) -> None:
        """Have ``image`` on the engine as the pull policy says (blocking: call it inside
        ``call``): pull it always, only when missing, or never."""
        pull = self.policy.pull
        if pull != "always":
            try:
                client.images.get(image)
                return
            except docker.errors.ImageNotFound:
                pass
            except docker.errors.APIError as exc:
                raise ImageMissing(f"image {image!r} is invalid: {_explain(exc)}") from exc
            if pull == "never":
                raise ImageMissing(
                    f"image {image!r} is not on this host, and this agent never pulls "
                    "(--pull never): load it on the host first"
                )
            log.info("image %s is not on this host; trying to pull it", image)
        # A tag or a digest (``repo@sha256:...``), as the engine's pull takes it.
        repository, tag = docker.utils.parse_repository_tag(image)
        try:
            # Credentials for the image's registry come from this host's Docker config.
            puller = docker.from_env(timeout=int(self._pull_timeout_s)).api
            try:
                puller.pull(repository, tag=tag or "latest")
            finally:
                puller.close()
            client.images.get(image)
        except (docker.errors.APIError, docker.errors.ImageNotFound, *UNAVAILABLE) as exc:
            detail = _explain(exc) if isinstance(exc, docker.errors.APIError) else repr(exc)
            where = "is not on this host and" if pull != "always" else "(--pull always)"
            raise ImageMissing(f"image {image!r} {where} cannot be pulled: {detail}") from exc

    async def inspect(self, container_id: str) -> ContainerInfo | None:
        """The container's current state, or None when it no longer exists."""

        def get(client: docker.DockerClient) -> ContainerInfo | None:
            try:
                return ContainerInfo.from_attrs(client.api.inspect_container(container_id))
            except docker.errors.NotFound:
                return None

        return await self.call(get)  # type: ignore[no-any-return]

    async def output_tail(
        self, container_id: str, lines: int, redact: Callable[[str], str] | None = None
    ) -> tuple[str, ...]:
        """The last ``lines`` lines of the container's output (stdout and stderr), each
        ``redact``-ed before it is cut (a cut secret could no longer be recognised)."""

        def tail(client: docker.DockerClient) -> tuple[str, ...]:
            try:
                raw = client.api.logs(container_id, stdout=True, stderr=True, tail=lines)
            except docker.errors.NotFound:
                return ()
            except docker.errors.APIError as exc:
                if exc.status_code != 501:
                    raise
                # The engine's log driver does not read back (``none``, say): no tail, for
                # good. Retried, the run's final event would never go out.
                log.warning(
                    "the output of container %s cannot be read: %s",
                    container_id[:12],
                    _explain(exc),
                )
                return ()
            found = raw.decode("utf-8", errors="replace").splitlines()
            return limits.tail(map(redact, found) if redact else found, lines)

        return await self.call(tail)  # type: ignore[no-any-return]

    async def remove(self, container_id: str) -> None:
        def remove(client: docker.DockerClient) -> None:
            try:
                client.api.remove_container(container_id, force=True, v=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                log.warning("could not remove container %s: %s", container_id[:12], _explain(exc))

        await self.call(remove)

    async def stop(self, container_id: str, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``."""

        def stop(client: docker.DockerClient) -> None:
            with contextlib.suppress(docker.errors.NotFound):
                client.api.stop(container_id, timeout=math.ceil(max(grace_s, 0)))

        await self.call(stop)

    async def list_managed(self) -> list[ContainerInfo]:
        """Every container this agent labelled, whatever its state."""

        def listing(client: docker.DockerClient) -> list[ContainerInfo]:
            filters = {
                "label": [
                    f"{LABEL_MANAGED_BY}={MANAGED_BY}",
                    f"{LABEL_AGENT}={self.agent_id}",
                    LABEL_RUN,  # runs only, not code servers
                ]
            }
            found = []
            for summary in client.api.containers(all=True, filters=filters):
                try:
                    found.append(client.api.inspect_container(summary["Id"]))
                except docker.errors.NotFound:
                    continue
            return managed(found)

        return await self.call(listing)  # type: ignore[no-any-return]

    async def open_events(self, since: int | None) -> EventStream:
        """This agent's container events, as a blocking stream (see ``streams``)."""
        filters = {
            "type": "container",
            "label": [f"{LABEL_AGENT}={self.agent_id}"],
            "event": ["start", "die", "oom", "health_status"],
        }
        return await self._open_stream(
            "Docker events", lambda api: api.events(since=since, filters=filters, decode=True)
        )

    async def open_log_stream(self, container_id: str) -> EventStream:
        """The container's output from its start, following it until it ends (blocking)."""
        return await self._open_stream(
            f"the output of {container_id[:12]}",
            lambda api: api.logs(container_id, stdout=True, stderr=True, stream=True, follow=True),
        )

    async def _open_stream(self, what: str, request: Callable[[Any], Any]) -> EventStream:
        def open_stream() -> EventStream:
            # A client of its own: the stream holds its connection for as long as it lasts.
            # On the API version the pool's client found: no version request per stream.
            client = docker.from_env(timeout=None, version=self._docker().api.api_version)
            try:
                return EventStream(client, request(client.api))
            except BaseException:
                client.close()
                raise

        try:
            return await self.run_blocking(open_stream)  # type: ignore[no-any-return]
        except (DockerUnavailable, LaunchFailed) as exc:
            raise DockerUnavailable(f"cannot follow {what}: {exc}") from exc

    def close(self) -> None:
        """Close the client and the pool; safe more than once. Calls in progress finish.

        Never waits for the lock: a pool thread holds it while it makes the client, which
        waits up to a minute on an engine that accepts and never answers, and the event loop
        (and with it every signal) waited with it."""
        self._closed = True
        if self._lock.acquire(blocking=False):
            try:
                if self._client is not None:
                    self._client.close()
                    self._client = None
            finally:
                self._lock.release()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _explain(exc: docker.errors.APIError) -> str:
    return str(exc.explanation or exc)
