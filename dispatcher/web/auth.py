"""Who may call what.

A request is let in by an API token (``Authorization: Bearer hdw_...``) or by the web UI's
session cookie (signed in with a token). Every route needs a scope (the one it names, else
``read`` to look and ``operate`` to change); only routes marked ``public`` (health, the
sign-in page) need none.
A request carried by the cookie that changes something must also send the session's CSRF
token in ``X-CSRF-Token`` (the UI's pages have it): another site can make a browser send the
cookie, never the header.
"""

from __future__ import annotations

import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler

from ..store import Database
from ..store.api_tokens import ApiToken, allows

SESSION_COOKIE = "hd_session"
CSRF_HEADER = "x-csrf-token"
#: Where what let a request in is kept, for the handlers (who submitted; the page's CSRF).
TOKEN_KEY = "hd_api_token"
CSRF_KEY = "hd_csrf"
_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})


class SignInNeeded(NotAuthorizedException):
    """No token, no session: the API answers 401, a page sends the browser to sign in."""


async def require_token(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    if handler.opt.get("public"):
        return
    # A route that says nothing needs ``read`` to look and ``operate`` to change anything:
    # a route added without a scope is never open to viewers.
    method = connection.scope.get("method", "GET")
    needed = handler.opt.get("scope") or ("read" if method in _SAFE else "operate")
    store: Database = connection.app.state.store
    found, csrf = await credentials(
        store, connection.headers.get("authorization", ""), connection.cookies.get(SESSION_COOKIE)
    )
    if csrf is not None:
        connection.scope[CSRF_KEY] = csrf  # type: ignore[literal-required]
        sent = connection.headers.get(CSRF_HEADER, "")
        if method not in _SAFE and not hmac.compare_digest(sent.encode(), csrf.encode()):
            raise PermissionDeniedException(
                "a change made with the session cookie needs its CSRF token (X-CSRF-Token)"
            )
    if not allows(found.scope, needed):
        raise PermissionDeniedException(
            f"the token {found.name!r} has scope {found.scope!r}; this needs {needed!r}"
        )
    connection.scope[TOKEN_KEY] = found  # type: ignore[literal-required]


async def credentials(
    store: Database, header: str, cookie: str | None
) -> tuple[ApiToken, str | None]:
    """The live token a request carries (a bearer token, or the session cookie's) and, for a
    session, its CSRF token; NotAuthorizedException when there is none."""
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise NotAuthorizedException("Authorization: Bearer hdw_... (an API token)")
        found = await store.api_tokens.check(token.strip())
        if found is None:
            raise NotAuthorizedException("the API token is unknown or revoked")
        return found, None
    if cookie:
        session = await store.api_tokens.session(cookie)
        if session is None:
            raise SignInNeeded("the session has ended; sign in again")
        return session
    raise SignInNeeded(
        "an API token is needed: Authorization: Bearer hdw_... (dispatcher api-tokens add)"
    )


async def still_allowed(store: Database, header: str, cookie: str | None) -> bool:
    """Whether what let a request in still stands (a long stream asks now and then)."""
    try:
        await credentials(store, header, cookie)
    except NotAuthorizedException:
        return False
    return True


def token_of(connection: ASGIConnection[Any, Any, Any, Any]) -> ApiToken:
    token: ApiToken = connection.scope[TOKEN_KEY]  # type: ignore[literal-required]
    return token


def csrf_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    return str(connection.scope.get(CSRF_KEY, ""))
