"""Helpers for integration tests: real processes, waiting for conditions, broker admin."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]], timeout: float = 60.0, interval: float = 0.1, what: str = ""
) -> T:
    """Poll ``probe`` until it returns a truthy value; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"not within {timeout} s: {what or probe} (last: {last!r})")


def management_request(base: str, method: str, path: str, body: Any = None) -> Any:
    """Call RabbitMQ's management API (``base`` is http://user:pass@host:port)."""
    parts = urllib.parse.urlsplit(base)
    url = f"{parts.scheme}://{parts.hostname}:{parts.port}{path}"
    token = base64.b64encode(f"{parts.username}:{parts.password}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Basic {token}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


class Proc:
    """A real process of the project (``python -m MODULE ARGS``), its output in a file."""

    def __init__(self, module: str, args: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.module = module
        self.args = args
        self.log_path = log_path
        self._env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    def start(self) -> Proc:
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self._env,
        )
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def wait_for_output(self, pattern: str, timeout: float = 60.0, after: int = 0) -> None:
        regex = re.compile(pattern)

        async def seen() -> bool:
            # Exited is read before the output: a line printed just before a quick exit counts.
            exited = self.process is not None and self.process.poll() is not None
            if regex.search(self.output()[after:]):
                return True
            if exited:
                assert self.process is not None
                raise AssertionError(
                    f"{self.module} exited ({self.process.returncode}):\n{self.output()[-3000:]}"
                )
            return False

        await eventually(seen, timeout, what=f"{self.module} printing {pattern!r}")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL and reap."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait; SIGKILL if it does not exit. Returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return int(self.process.returncode)


class DockerSocketProxy:
    """A Unix-socket proxy to the Docker engine that a test can cut and restore.

    An agent started with ``DOCKER_HOST=unix://<path>`` sees the engine vanish while the proxy
    is down: open streams break and new connections are refused, as when dockerd stops.
    """

    def __init__(self, path: Path, target: str = "/var/run/docker.sock") -> None:
        self.path = path
        self.target = target
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def docker_host(self) -> str:
        return f"unix://{self.path}"

    async def up(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            engine_reader, engine_writer = await asyncio.open_unix_connection(self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, engine_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while chunk := await source.read(65536):
                    sink.write(chunk)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()
                self._writers.discard(sink)

        await asyncio.gather(pipe(reader, engine_writer), pipe(engine_reader, writer))


class WebhookReceiver:
    """A local HTTP server that records every JSON POST it receives."""

    def __init__(self) -> None:
        import http.server
        import threading

        received: list[dict[str, Any]] = []
        self.received = received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/alerts"

    def incidents(self) -> list[str]:
        return [alert["incident"] for alert in self.received]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
