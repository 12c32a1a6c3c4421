"""The web UI under ``/ui``: sign-in with an API token, then pages that read the API.

Each page is one HTML shell rendered here (its title, its CSRF token, what it shows) and a
little hand-written JavaScript (``static/app.js``) that reads ``/api/v1`` and follows
``/api/v1/events``; nothing is loaded from anywhere else, so it works offline.
"""

from __future__ import annotations

import hmac
import html
import secrets
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

from litestar import Request, Response, Router, get, post
from litestar.enums import RequestEncodingType
from litestar.params import Body
from litestar.response import Redirect
from litestar.static_files import create_static_files_router

from ..store import Database
from .auth import SESSION_COOKIE, SignInNeeded, csrf_of, token_of

STATIC = Path(__file__).parent / "static"
LOGIN_CSRF_COOKIE = "hd_login_csrf"
SESSION_HOURS = 12.0
PAGES = {
    "runs": "Runs",
    "agents": "Agents",
    "locations": "Locations",
    "alerts": "Alerts",
    "dead-letters": "Dead letters",
    "overview": "Overview",
}

_SHELL = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="{csrf}">
<title>{title} · hybrid-dispatcher</title>
<link rel="stylesheet" href="/ui/static/app.css">
</head><body data-page="{page}" data-subject="{subject}" data-scope="{scope}">
<header><a class="brand" href="/ui/runs">hybrid-dispatcher</a><nav>{nav}</nav>
<form method="post" action="/ui/logout" class="signout">
<input type="hidden" name="csrf" value="{csrf}">
<span class="who">{who} ({scope})</span> <button type="submit">Sign out</button></form>
</header>
<main id="main"><h1>{title}</h1><div id="content">Loading…</div></main>
<script src="/ui/static/app.js"></script>
</body></html>
"""

_LOGIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Sign in · hybrid-dispatcher</title>
<link rel="stylesheet" href="/ui/static/app.css">
</head><body class="login">
<main><h1>hybrid-dispatcher</h1>
<form method="post" action="/ui/login">
<label for="token">API token</label>
<input id="token" name="token" type="password" autocomplete="off" placeholder="hdw_..." required>
<input type="hidden" name="csrf" value="{csrf}">
<input type="hidden" name="next" value="{next}">
<p class="error" role="alert">{error}</p>
<button type="submit">Sign in</button>
<p class="hint">Make one with <code>dispatcher api-tokens add NAME --scope operate</code>.</p>
</form></main></body></html>
"""


def _secure(request: Request[Any, Any, Any]) -> bool:
    """Cookies are Secure unless the UI is reached over plain HTTP on this very host (a
    laptop's http://127.0.0.1:8080), where a browser would never send them back. A request
    a proxy forwarded (``Forwarded``, ``X-Forwarded-*``) is not one: a TLS proxy in front of
    a server on 127.0.0.1 often names that address as the host."""
    # From the Host header as it is: ``request.url`` fails on a port that is no number.
    host = request.headers.get("host", "")
    name = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]
    loopback = name in ("127.0.0.1", "localhost", "::1")
    forwarded = any(
        header == "forwarded" or header.startswith("x-forwarded-") for header in request.headers
    )
    return request.scope.get("scheme") == "https" or not loopback or forwarded


def _html(body: str, status: int = 200, **kwargs: Any) -> Response[str]:
    # Litestar adds the charset to a text type itself.
    return Response(body, media_type="text/html", status_code=status, **kwargs)


def _safe_next(target: str) -> str:
    """Only a path of the UI: a sign-in never sends the browser elsewhere."""
    return target if target.startswith("/ui/") and not target.startswith("//") else "/ui/runs"


def _login_page(
    request: Request[Any, Any, Any], next_: str, error: str, status: int
) -> Response[str]:
    csrf = secrets.token_urlsafe(24)
    response = _html(
        _LOGIN.format(csrf=csrf, next=html.escape(_safe_next(next_)), error=html.escape(error)),
        status,
    )
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        csrf,
        httponly=True,
        secure=_secure(request),
        samesite="strict",
        path="/ui/login",
    )
    return response


@get("/login", opt={"public": True}, include_in_schema=False)
async def login_form(request: Request[Any, Any, Any], next: str = "/ui/runs") -> Response[str]:
    return _login_page(request, next, "", 200)


@post("/login", opt={"public": True}, include_in_schema=False)
async def login(
    request: Request[Any, Any, Any],
    store: Database,
    data: dict[str, str] = Body(media_type=RequestEncodingType.URL_ENCODED),  # noqa: B008
) -> Response[Any]:
    next_ = data.get("next", "/ui/runs")
    expected = request.cookies.get(LOGIN_CSRF_COOKIE)
    if not expected or not hmac.compare_digest(data.get("csrf", "").encode(), expected.encode()):
        return _login_page(request, next_, "The form had expired; try again.", 403)
    opened = await store.api_tokens.open_session(data.get("token", "").strip(), SESSION_HOURS)
    if opened is None:
        return _login_page(request, next_, "That token is unknown or revoked.", 401)
    session, _, _ = opened
    response: Response[Any] = Redirect(_safe_next(next_), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        session,
        httponly=True,
        secure=_secure(request),
        samesite="strict",
        path="/",
        max_age=int(SESSION_HOURS * 3600),
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/ui/login")
    return response


@post("/logout", opt={"public": True}, include_in_schema=False)
async def logout(
    request: Request[Any, Any, Any],
    store: Database,
    data: dict[str, str] = Body(media_type=RequestEncodingType.URL_ENCODED),  # noqa: B008
) -> Response[Any]:
    """Sign out: the form carries the session's CSRF token (another site cannot)."""
    cookie = request.cookies.get(SESSION_COOKIE)
    session = await store.api_tokens.session(cookie) if cookie else None
    if cookie and session is not None:
        if not hmac.compare_digest(data.get("csrf", "").encode(), session[1].encode()):
            return _html("<h1>Sign-out refused: the form is not this session's.</h1>", 403)
        await store.api_tokens.close_session(cookie)
    response: Response[Any] = Redirect("/ui/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def _page(request: Request[Any, Any, Any], page: str, subject: str = "") -> Response[str]:
    token = token_of(request)
    nav = " ".join(
        f'<a href="/ui/{name}"{" aria-current=page" if name == page else ""}>{title}</a>'
        for name, title in PAGES.items()
    )
    title = PAGES.get(page, "Run")
    return _html(
        _SHELL.format(
            csrf=html.escape(csrf_of(request)),
            title=html.escape(title if page != "run" else f"Run {subject[:8]}"),
            page=page,
            subject=html.escape(subject),
            scope=html.escape(token.scope),
            who=html.escape(token.name),
            nav=nav,
        )
    )


@get("/", include_in_schema=False)
async def home() -> Redirect:
    return Redirect("/ui/runs")


@get([f"/{name}" for name in PAGES], include_in_schema=False)
async def page(request: Request[Any, Any, Any]) -> Response[str]:
    return _page(request, str(request.scope["path"]).rstrip("/").rsplit("/", 1)[-1])


@get("/runs/{run_id:uuid}", include_in_schema=False)
async def run_page(request: Request[Any, Any, Any], run_id: uuid.UUID) -> Response[str]:
    return _page(request, "run", str(run_id))


def _to_login(request: Request[Any, Any, Any], _: Exception) -> Response[Any]:
    return Redirect(f"/ui/login?next={quote(str(request.scope['path']))}", status_code=303)


def _no_such_file(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """A static path the file system cannot take (a NUL in it): no such file."""
    return Response({"status_code": 404, "detail": "Not Found"}, status_code=404)


def ui_router() -> Router:
    return Router(
        path="/ui",
        route_handlers=[
            login_form,
            login,
            logout,
            home,
            page,
            run_page,
            create_static_files_router(
                path="/static",
                directories=[STATIC],
                opt={"public": True},
                include_in_schema=False,
                exception_handlers={ValueError: _no_such_file},
            ),
        ],
        exception_handlers={SignInNeeded: _to_login},
    )
