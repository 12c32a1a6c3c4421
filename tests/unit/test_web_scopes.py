"""The web's guard (a route that names no scope is open to ``read`` tokens only to look) and
when its cookies are Secure."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from litestar import Litestar, Request, get, post
from litestar.testing import TestClient

from dispatcher.store.api_tokens import ApiToken
from dispatcher.web.auth import require_token
from dispatcher.web.ui import _secure

SECRETS = {"hdw_viewer": "read", "hdw_operator": "operate"}


class Tokens:
    """The tokens of the test, by secret (what ``store.api_tokens.check`` answers)."""

    async def check(self, secret: str) -> ApiToken | None:
        scope = SECRETS.get(secret)
        if scope is None:
            return None
        return ApiToken(secret, scope, datetime.now(UTC), "test", None, None)


@get("/look")
async def look() -> str:
    return "looked"


@post("/change", status_code=200)
async def change() -> str:
    return "changed"


def client() -> TestClient[Litestar]:
    app = Litestar([look, change], guards=[require_token])
    app.state.store = SimpleNamespace(api_tokens=Tokens())
    return TestClient(app)


def test_a_route_without_a_scope_lets_read_tokens_look_and_only_operate_change() -> None:
    with client() as http:
        viewer = {"Authorization": "Bearer hdw_viewer"}
        operator = {"Authorization": "Bearer hdw_operator"}
        assert http.get("/look", headers=viewer).text == "looked"
        refused = http.post("/change", headers=viewer)
        assert refused.status_code == 403 and "this needs 'operate'" in refused.text
        assert http.post("/change", headers=operator).text == "changed"
        assert http.post("/change").status_code == 401


@get("/secure", opt={"public": True})
async def secure(request: Request[Any, Any, Any]) -> str:
    return str(_secure(request))


def test_cookies_are_secure_but_on_plain_http_to_this_very_host_unforwarded() -> None:
    with TestClient(Litestar([secure], guards=[require_token])) as http:
        assert http.get("/secure", headers={"Host": "127.0.0.1:8080"}).text == "False"
        assert http.get("/secure", headers={"Host": "localhost"}).text == "False"
        assert http.get("/secure", headers={"Host": "dispatch.example.com"}).text == "True"
        # A TLS proxy in front of a server on 127.0.0.1 that names that address as the host.
        proxied = {"Host": "127.0.0.1:8080", "X-Forwarded-Proto": "https"}
        assert http.get("/secure", headers=proxied).text == "True"
        proxied = {"Host": "127.0.0.1:8080", "Forwarded": "for=10.0.0.5;proto=https"}
        assert http.get("/secure", headers=proxied).text == "True"
