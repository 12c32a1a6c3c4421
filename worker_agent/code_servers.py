"""Code-server containers on the agent's own Docker network (the Docker half of locations)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import threading
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
#: The most of a code server's answer that is read: launch specs are kilobytes, and
#: definitions rarely more than a few megabytes (150 jobs with 60 KB config schemas each, a
#: large location, make 9.6 MB); the contract's own bounds (a thousand jobs of 16 KiB
#: descriptions and 64 KiB schemas) would allow 80 MiB, which no location needs.
MAX_ANSWER_BYTES = 32 * 1024 * 1024
#: What a code server's answer may fail with, read as no answer: unreachable, refused, hung
#: up at the deadline (``OSError``), not HTTP or cut short (``http.client.HTTPException``),
#: too large or not JSON (``ValueError``), nested past what the parser follows
#: (``RecursionError``).
_NO_ANSWER = (http.client.HTTPException, OSError, ValueError, RecursionError)


@dataclass(frozen=True)
class CodeServer:
    id: str
    location: str
    generation: int
    running: bool
    address: str | None
    started_at: float | None
    port: int = CODE_SERVER_PORT


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
        return (await self.ask_why(server, path, timeout_s))[0]

    async def ask_why(
        self, server: CodeServer, path: str, timeout_s: float = 3.0
    ) -> tuple[Any, str]:
        """GET a code server's ``path`` as JSON: (the answer, "") or (None, why not)."""
        status, answer, why = await asyncio.to_thread(
            _exchange, server, "GET", path, None, timeout_s
        )
        if status == 200 and answer is not None:
            return answer, ""
        return None, why or f"HTTP {status}"

    async def post(
        self, server: CodeServer, path: str, body: Any, timeout_s: float = 10.0
    ) -> tuple[int, Any]:
        """POST JSON to a code server: (HTTP status, JSON answer or None); (0, None) when no
        status came back."""
        payload = json.dumps(body).encode()
        status, answer, _ = await asyncio.to_thread(
            _exchange, server, "POST", path, payload, timeout_s
        )
        return status, answer


def _exchange(
    server: CodeServer, method: str, path: str, body: bytes | None, timeout_s: float
) -> tuple[int, Any, str]:
    """One request, all of it within ``timeout_s`` (and the connect's own): (status, the
    answer's JSON or None, why there is none); status 0 when no status came back. The
    socket's timeout bounds each read, not the whole (a server sending a byte at a time never
    trips it): at the deadline, the socket is shut down, which ends whatever read is waiting.
    The socket itself is held for that, not the connection's: the connection lets go of it
    once an answer says it closes after it (HTTP/1.0, as the SDK's server answers), while its
    body is still read."""
    if server.address is None:
        return 0, None, "the code server has no address"
    connection = http.client.HTTPConnection(server.address, server.port, timeout=timeout_s)
    status = 0
    deadline: threading.Timer | None = None
    try:
        connection.connect()
        deadline = threading.Timer(timeout_s, _hang_up, (connection.sock,))
        deadline.daemon = True
        deadline.start()
        headers = {} if body is None else {"Content-Type": "application/json"}
        connection.request(method, path, body=body, headers=headers)
        reply = connection.getresponse()
        status = reply.status
        return status, _json(reply), ""
    except _NO_ANSWER as exc:
        said = f"HTTP {status}: " if status else ""
        return status, None, f"{path}: {said}{_no_answer(exc, timeout_s)}"
    finally:
        if deadline is not None:
            deadline.cancel()
        connection.close()


def _no_answer(exc: BaseException, timeout_s: float) -> str:
    """Why an exchange gave no answer, in a few words."""
    if isinstance(exc, RecursionError):
        return "an answer nested too deep"
    if isinstance(exc, json.JSONDecodeError):
        return "an answer that is not JSON"
    if isinstance(exc, ValueError):
        return str(exc)[:200]
    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError | TimeoutError):
        # The deadline's shutdown of the socket ends a read with an OSError of its own.
        return f"no answer within {timeout_s:g} s ({type(exc).__name__})"
    return f"no answer ({type(exc).__name__}: {str(exc)[:200]})"


def _hang_up(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _json(reply: http.client.HTTPResponse) -> Any:
    """An answer's body as JSON, read by the chunk as it comes, up to ``MAX_ANSWER_BYTES``."""
    body = bytearray()
    while chunk := reply.read1(65536):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise ValueError(f"an answer over {MAX_ANSWER_BYTES} bytes")
    if reply.length:  # what its Content-Length announced and never came
        raise ValueError(f"an answer cut short ({len(body)} bytes, {reply.length} missing)")
    return json.loads(body)


def _generation(label: str) -> int:
    try:
        return int(label)
    except ValueError:
        return -1
