"""The code server: a location's definitions and launch specs over HTTP.

GET  /health        200 once the location's module is loaded
GET  /definitions   {"location_version": ..., "jobs": [{name, description, config_schema}]}
POST /launch-spec   {"job": NAME, "config": {...}}  →  {"command": [...], "env": {...}}
                    400 {"error": ...} naming the problem for an unknown job or bad config
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .config import ConfigError, validate_config
from .jobs import Registry


def launch_spec(registry: Registry, module: str, job_name: str, config: Any) -> dict[str, Any]:
    """The command that runs ``job_name`` with ``config`` in a new container of this image."""
    job_ = registry.get(job_name)
    validate_config(job_.config_schema, config)
    return {
        "command": [
            "python3",
            # The config below is UTF-8 as it is: read so whatever the image's locale.
            "-X",
            "utf8",
            "-m",
            "hd_sdk",
            "run",
            "--module",
            module,
            "--job",
            job_name,
            "--config",
            # As short as JSON goes: one argument of a launch spec is at most 64 KiB, and
            # escapes (ensure_ascii) tripled a config of accented text.
            json.dumps(config, ensure_ascii=False, separators=(",", ":")),
        ],
        "env": {},
    }


#: The largest launch-spec request read (a job's name and config: kilobytes).
MAX_REQUEST_BYTES = 1024 * 1024
#: Seconds a connection may go without sending anything before it is closed.
REQUEST_TIMEOUT_S = 30.0


def make_server(
    registry: Registry, module: str, port: int, host: str = "0.0.0.0"
) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        #: A peer that sends nothing more is let go of (a thread each, otherwise).
        timeout = REQUEST_TIMEOUT_S

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._reply(200, {"status": "ok", "jobs": len(registry.jobs)})
            elif self.path == "/definitions":
                self._reply(200, {"module": module, "jobs": registry.definitions()})
            else:
                self._reply(404, {"error": f"no such path {self.path}"})

        def do_POST(self) -> None:
            if self.path != "/launch-spec":
                self._reply(404, {"error": f"no such path {self.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_REQUEST_BYTES:
                self._reply(413, {"error": f"a body of 0 to {MAX_REQUEST_BYTES} bytes"})
                return
            try:
                request = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(request, dict) or not isinstance(request.get("job"), str):
                    raise ValueError('the body is {"job": NAME, "config": {...}}')
                spec = launch_spec(registry, module, request["job"], request.get("config", {}))
            except (KeyError, ConfigError, ValueError, RecursionError) as exc:
                message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
                self._reply(400, {"error": str(message)[:2000]})
                return
            except Exception as exc:  # the server's own failure: said, not a dropped connection
                self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})
                return
            self._reply(200, spec)

        def log_message(self, format: str, *args: Any) -> None:
            sys.stderr.write("code server: " + (format % args) + "\n")

    return ThreadingHTTPServer((host, port), Handler)
