"""The ASGI application: the API's routes under ``/api/v1``, its OpenAPI document, auth, and
the store and broker connections opened for the process's lifetime."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Annotated, Any

from litestar import Litestar, Request, Response, Router, get
from litestar.datastructures import MutableScopeHeaders, State
from litestar.di import Provide
from litestar.exceptions import (
    ClientException,
    NotFoundException,
    ServiceUnavailableException,
    ValidationException,
)
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.params import Parameter
from litestar.response import ServerSentEvent
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import Message, Scope

from schemas.bounds import INT64_MAX

from ..client import Client
from ..errors import DispatcherError, StoreUnavailable
from ..settings import WebSettings
from ..store import Database
from . import views
from .api_locations import LocationsController
from .api_ops import OpsController
from .api_runs import RunsController
from .auth import SESSION_COOKIE, require_token, still_allowed, token_of
from .broker import Broker
from .sse import EventStream, Wakeups
from .ui import ui_router

API = "/api/v1"

log = logging.getLogger(__name__)


def _store(state: State) -> Database:
    store: Database = state.store
    return store


def _broker(state: State) -> Broker:
    broker: Broker = state.broker
    return broker


def event_id_header(header: str) -> int:
    """The event id a ``Last-Event-ID`` header names; ValidationException (400) otherwise.

    ``isascii``: ``str.isdigit`` takes '²' (a latin-1 header byte), which ``int`` does not."""
    if not (header.isascii() and header.isdigit()) or int(header) > INT64_MAX:
        raise ValidationException(
            f"Last-Event-ID: an event id this stream sent (a number), not {header[:40]!r}"
        )
    return int(header)


@get("/events", tags=["events"])
async def events(
    request: Request,  # type: ignore[type-arg]
    store: Database,
    run_id: uuid.UUID | None = None,
    last_event_id: Annotated[
        int | None,
        Parameter(
            query="last_event_id",
            ge=0,
            le=INT64_MAX,
            description="Resume after this event (the Last-Event-ID header does the same)",
        ),
    ] = None,
) -> ServerSentEvent:
    """Run events as Server-Sent Events (``id`` is the event's sequence number), from now, or
    after ``Last-Event-ID``; ``run_id`` keeps one run's. The stream ends when the token is
    revoked or the session ends."""
    header = request.headers.get("last-event-id")
    if header is not None:
        last_event_id = event_id_header(header)
    # From now; or after Last-Event-ID, but never after the newest event (a stream waiting
    # for numbers that were never given would stay silent for good).
    newest = await store.runs.last_event_seq()
    after = newest if last_event_id is None else min(last_event_id, newest)
    wakeups: Wakeups = request.app.state.wakeups
    token = token_of(request)
    within = token.limits
    if run_id is not None and within.bounded and not await store.runs.in_reach({run_id}, within):
        raise NotFoundException(f"no run {run_id}")
    refusal = wakeups.refusal(token.name)
    if refusal is not None:
        raise ServiceUnavailableException(refusal)
    authorization = request.headers.get("authorization", "")
    cookie = request.cookies.get(SESSION_COOKIE)

    async def allowed() -> bool:
        return await still_allowed(store, authorization, cookie)

    return ServerSentEvent(
        wakeups.counted(
            EventStream(
                store,
                wakeups,
                after,
                run_id,
                allowed=allowed,
                within=token.limits,
                env=views.sees_env(token.scope),
            ).frames(),
            token.name,
        )
    )


def _unavailable(_: Request, exc: Exception) -> Response:  # type: ignore[type-arg]
    return Response({"status_code": 503, "detail": str(exc)}, status_code=503)


def _too_deep(_: Request, exc: Exception) -> Response:  # type: ignore[type-arg]
    return Response(
        {"status_code": 400, "detail": "the body is nested too deeply to read"}, status_code=400
    )


def _internal_error(request: Request, exc: Exception) -> Response:  # type: ignore[type-arg]
    """Logged with its traceback (outside debug mode Litestar logs none); the caller learns
    nothing of it. A static path the file system cannot take (a file taken for a directory,
    a name too long), which Litestar's static files answer as a 500, is no such file."""
    static = str(request.scope.get("path", "")).startswith("/ui/static/")
    if static and isinstance(exc.__cause__, OSError):
        return Response({"status_code": 404, "detail": "Not Found"}, status_code=404)
    log.error("%s %s failed", request.method, request.scope.get("path"), exc_info=exc)
    return Response({"status_code": 500, "detail": "Internal Server Error"}, status_code=500)


def _not_utf8(_: Request, exc: Exception) -> Response:  # type: ignore[type-arg]
    return Response({"status_code": 400, "detail": "the body is not valid UTF-8"}, status_code=400)


#: The largest body any route reads (a submission with its env, a location): more is 413.
MAX_BODY_BYTES = 1024 * 1024


#: On every answer: the pages load only their own script and style (data the API returns can
#: never run as script), are never framed by another site (a click on "cancel" cannot be
#: borrowed), and no answer is sniffed into another type.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    # Pages carry a CSRF token, answers a run's env and dead letters' bodies: kept nowhere.
    "Cache-Control": "no-store",
}


async def _secure_headers(message: Message, scope: Scope) -> None:
    """``SECURITY_HEADERS`` on every answer: pages, static files, errors and streams alike."""
    if message["type"] == "http.response.start":
        headers = MutableScopeHeaders.from_message(message)
        for name, value in SECURITY_HEADERS.items():
            headers[name] = value


@asynccontextmanager
async def opened(settings: WebSettings) -> AsyncIterator[tuple[Database, Client]]:
    """The store (migrated) and the broker client the application serves with."""
    store = await Database.open(settings.database_url, schema=settings.database_schema)
    try:
        await store.upgrade()
        async with Client(settings.amqp_url) as client:
            yield store, client
    finally:
        await store.close()


#: The API's query parameters that are lists: each use adds one (``GET /runs?tag=...``).
REPEATABLE = frozenset({"tag"})


def _each_once(request: Request[Any, Any, Any]) -> None:
    """Refuse a query parameter given twice that is not a list: which of its values would
    count is a guess the caller should not have to make (a filter silently dropped)."""
    query = request.query_params
    for key in query:
        if key not in REPEATABLE and len(query.getall(key)) > 1:
            raise ClientException(f"query parameter {key!r} given more than once")


def create_app(settings: WebSettings, connected: tuple[Database, Client] | None = None) -> Litestar:
    """The application; with ``connected`` (``opened``'s), on those, which its caller owns,
    so that a store or broker that cannot be reached is the caller's error to tell, before
    anything is served. Without, it opens its own for its lifetime."""

    @asynccontextmanager
    async def connections(app: Litestar) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            store, client = (
                connected
                if connected is not None
                else await stack.enter_async_context(opened(settings))
            )
            app.state.store = store
            app.state.broker = Broker(client)
            app.state.wakeups = wakeups = Wakeups()
            listening = asyncio.create_task(wakeups.run(store), name="event-wakeups")
            try:
                yield
            finally:
                listening.cancel()
                await asyncio.gather(listening, return_exceptions=True)

    api = Router(
        path=API,
        route_handlers=[RunsController, LocationsController, OpsController, events],
        before_request=_each_once,
    )
    return Litestar(
        route_handlers=[api, ui_router()],
        lifespan=[connections],
        before_send=[_secure_headers],
        dependencies={
            "store": Provide(_store, sync_to_thread=False),
            "broker": Provide(_broker, sync_to_thread=False),
        },
        # Every route, the OpenAPI document's too, needs a token; health is marked public.
        guards=[require_token],
        openapi_config=OpenAPIConfig(
            title="hybrid-dispatcher",
            version="1",
            path=API,
            render_plugins=[JsonRenderPlugin()],
            use_handler_docstrings=True,
            security=[{"BearerToken": []}],
            components=Components(
                security_schemes={
                    "BearerToken": SecurityScheme(
                        type="http", scheme="bearer", description="an API token, hdw_..."
                    )
                }
            ),
        ),
        exception_handlers={
            StoreUnavailable: _unavailable,
            DispatcherError: _unavailable,
            RecursionError: _too_deep,
            UnicodeDecodeError: _not_utf8,
            HTTP_500_INTERNAL_SERVER_ERROR: _internal_error,
        },
        request_max_body_size=MAX_BODY_BYTES,
    )
