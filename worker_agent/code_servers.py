"""Code-server containers on the agent's own Docker network (the Docker half of locations)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors

from schemas import LocationSpec

from .containers import LABEL_AGENT, LABEL_MANAGED_BY, MANAGED_BY, timestamp
from .errors import LaunchFailed
from .runtime import DockerRuntime

LABEL_LOCATION = "hybrid-dispatcher.location"
LABEL_GENERATION = "hybrid-dispatcher.location-generation"
#: The port a code server listens on (the SDK's default).
CODE_SERVER_PORT = 8080


@dataclass(frozen=True)
class CodeServer:
    id: str
    location: str
    generation: int
    running: bool
    address: str | None
    started_at: float | None

    @property
    def url(self) -> str | None:
        return f"http://{self.address}:{CODE_SERVER_PORT}" if self.address else None


class CodeServers:
    """Starts, lists and removes this agent's code servers; asks them over HTTP."""

    def __init__(
        self, runtime: DockerRuntime, network: str = "hybrid-dispatcher-locations"
    ) -> None:
        self.runtime = runtime
        #: One network per host, shared by its agents: a network per agent would soon use up
        #: Docker's address pools.
        self.network = network
        self._network_ready = False

    async def ensure_network(self) -> None:
        if self._network_ready:
            return

        def ensure(client: docker.DockerClient) -> None:
            if not client.networks.list(names=[self.network]):
                try:
                    client.networks.create(
                        self.network, driver="bridge", labels={LABEL_MANAGED_BY: MANAGED_BY}
                    )
                except docker.errors.APIError as exc:
                    if exc.status_code != 409:  # 409: another agent made it meanwhile
                        raise

        await self.runtime.call(ensure)
        self._network_ready = True

    async def list(self) -> list[CodeServer]:
        def listing(client: docker.DockerClient) -> list[CodeServer]:
            filters = {"label": [LABEL_LOCATION, f"{LABEL_AGENT}={self.runtime.agent_id}"]}
            found = []
            for summary in client.api.containers(all=True, filters=filters):
                try:
                    attrs = client.api.inspect_container(summary["Id"])
                except docker.errors.NotFound:
                    continue
                found.append(self._describe(attrs))
            return found

        return await self.runtime.call(listing)  # type: ignore[no-any-return]

    def _describe(self, attrs: dict[str, Any]) -> CodeServer:
        labels = attrs["Config"]["Labels"] or {}
        networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
        address = (networks.get(self.network) or {}).get("IPAddress") or None
        state = attrs["State"]
        return CodeServer(
            id=attrs["Id"],
            location=labels[LABEL_LOCATION],
            # A generation that does not read as one (a label set by hand) is older than any.
            generation=_generation(labels.get(LABEL_GENERATION, "0")),
            running=state.get("Status") == "running",
            address=address,
            started_at=timestamp(state.get("StartedAt")),
        )

    async def start(self, spec: LocationSpec, env: dict[str, str]) -> CodeServer:
        """A new code server for ``spec``, on the agent's network."""

        def start(client: docker.DockerClient) -> CodeServer:
            self.runtime.ensure_image(client, spec.image)
            name = f"hd-loc-{spec.name}-{spec.generation}-{uuid.uuid4().hex[:6]}"
            try:
                container = client.containers.run(
                    spec.image,
                    list(spec.command) or None,
                    name=name,
                    detach=True,
                    environment=env,
                    network=self.network,
                    labels={
                        LABEL_MANAGED_BY: MANAGED_BY,
                        LABEL_AGENT: self.runtime.agent_id,
                        LABEL_LOCATION: spec.name,
                        LABEL_GENERATION: str(spec.generation),
                    },
                    **self.runtime.policy.container_options(),
                )
            except docker.errors.APIError as exc:
                raise LaunchFailed(f"cannot start the code server: {exc.explanation}") from exc
            return self._describe(client.api.inspect_container(container.id))

        return await self.runtime.call(start)  # type: ignore[no-any-return]

    async def ask(self, server: CodeServer, path: str, timeout_s: float = 3.0) -> Any:
        """GET a code server's ``path`` as JSON; None when it does not answer 200."""
        if server.url is None:
            return None

        def get() -> Any:
            try:
                with urllib.request.urlopen(f"{server.url}{path}", timeout=timeout_s) as reply:
                    return json.loads(reply.read()) if reply.status == 200 else None
            except (urllib.error.URLError, OSError, ValueError):
                return None

        return await asyncio.to_thread(get)

    async def post(
        self, server: CodeServer, path: str, body: Any, timeout_s: float = 10.0
    ) -> tuple[int, Any]:
        """POST JSON to a code server: (HTTP status, JSON answer); (0, None) if unreachable."""
        if server.url is None:
            return 0, None

        def post() -> tuple[int, Any]:
            request = urllib.request.Request(
                f"{server.url}{path}",
                data=json.dumps(body).encode(),
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=timeout_s) as reply:
                    return reply.status, json.loads(reply.read())
            except urllib.error.HTTPError as exc:
                try:
                    return exc.code, json.loads(exc.read())
                except ValueError:
                    return exc.code, None
            except (urllib.error.URLError, OSError, ValueError):
                return 0, None

        return await asyncio.to_thread(post)


def _generation(label: str) -> int:
    try:
        return int(label)
    except ValueError:
        return -1
