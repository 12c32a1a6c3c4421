"""Closing a user's connections through the management API, when one closes by itself as it
is listed: an HTTP server in the test plays the API and its answers."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable, Iterator

import pytest

from dispatcher.broker_users import close_connections
from transport.errors import BrokerUnavailable
from transport.policies import ManagementApi

pytestmark = pytest.mark.unit


class Api:
    """Lists one connection of user ``ci``; answers DELETE and GET of it from scripts."""

    def __init__(self, deletes: list[int], gets: list[int]) -> None:
        self.deletes, self.gets = deletes, gets
        self.calls: list[str] = []


@pytest.fixture
def serve() -> Iterator[Callable[[Api], ManagementApi]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(api: Api) -> ManagementApi:
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def answer(self, code: int, body: object = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                api.calls.append(f"GET {self.path}")
                if self.path == "/api/connections":
                    self.answer(200, [{"name": "a -> b", "user": "ci"}, {"name": "x", "user": "o"}])
                else:
                    self.answer(api.gets.pop(0) if api.gets else 200, {})

            def do_DELETE(self) -> None:
                api.calls.append(f"DELETE {self.path}")
                self.answer(api.deletes.pop(0) if api.deletes else 204)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        return ManagementApi((base,), "admin", "pw", "/")

    yield start
    for server in servers:
        server.shutdown()


def test_a_connection_closed_at_once_counts(serve: Callable[[Api], ManagementApi]) -> None:
    api = Api(deletes=[204], gets=[])
    assert close_connections(serve(api), "ci", "revoked") == 1
    assert api.calls == ["GET /api/connections", "DELETE /api/connections/a%20-%3E%20b"]


def test_a_connection_half_gone_is_closed_on_a_second_try_or_found_gone(
    serve: Callable[[Api], ManagementApi],
) -> None:
    # HTTP 500 while it is closing by itself, then it is still listed, then closed.
    api = Api(deletes=[500, 204], gets=[200])
    assert close_connections(serve(api), "ci", "revoked") == 1
    # HTTP 500, then it is gone: nothing left to close, and no error.
    api = Api(deletes=[500], gets=[404])
    assert close_connections(serve(api), "ci", "revoked") == 0


def test_a_connection_that_cannot_be_closed_is_an_error_naming_the_answer(
    serve: Callable[[Api], ManagementApi], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("dispatcher.broker_users.CLOSE_WITHIN_S", 1.0)
    api = Api(deletes=[500] * 100, gets=[200] * 100)
    with pytest.raises(BrokerUnavailable, match="HTTP 500"):
        close_connections(serve(api), "ci", "revoked")
