"""``/api/v1``: agents, locations, alerts and limits (reads PostgreSQL), and health."""

from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Annotated, Any

from litestar import Controller, Request, get
from litestar.exceptions import PermissionDeniedException
from litestar.params import Parameter
from litestar.response import Response

from ..errors import DispatcherError
from ..store import Database
from ..store.alerts import webhook_site
from ..submitters import Limits
from .auth import token_of

log = logging.getLogger(__name__)


#: The alerts about one run: their dedupe keys start so, the run's id next.
_RUN_ALERTS = ("run-failed:", "run-long:")


async def _alerts_in_reach(
    store: Database, found: list[dict[str, Any]], within: Limits
) -> list[dict[str, Any]]:
    """``found`` without the alerts about runs out of ``within``'s reach."""
    about: dict[int, uuid.UUID] = {}
    for alert in found:
        key = str(alert["dedupe_key"])
        for prefix in _RUN_ALERTS:
            if key.startswith(prefix):
                with contextlib.suppress(ValueError):
                    about[alert["id"]] = uuid.UUID(key.removeprefix(prefix)[:36])
    mine = await store.runs.in_reach(set(about.values()), within)
    return [a for a in found if a["id"] not in about or about[a["id"]] in mine]


class OpsController(Controller):
    path = "/"

    @get("/health", opt={"public": True}, tags=["health"])
    async def health(self, store: Database) -> Response[dict[str, str]]:
        """Whether the web process reaches PostgreSQL (no token needed)."""
        try:
            await store.runs.last_event_seq()
        except DispatcherError as exc:
            # Anyone may ask: what failed (an address, a user, a certificate) goes to the log.
            log.warning("health: the store does not answer: %s", exc)
            return Response(
                {"status": "unavailable", "detail": "the database does not answer"},
                status_code=503,
            )
        return Response({"status": "ok"})

    @get("/agents", tags=["agents"])
    async def agents(
        self, request: Request[Any, Any, Any], store: Database
    ) -> list[dict[str, Any]]:
        """Every agent heard of: status, silence, queues, capacity, runs in flight (to a token
        limited to queues or locations, only its runs)."""
        found = await store.agents.all()
        within = token_of(request).limits
        if within.bounded:
            listed = {uuid.UUID(str(r["run_id"])) for a in found for r in a["in_flight"]}
            mine = {str(r) for r in await store.runs.in_reach(listed, within)}
            for agent in found:
                agent["in_flight"] = [r for r in agent["in_flight"] if r["run_id"] in mine]
        return found

    @get("/alerts", tags=["alerts"])
    async def alerts(
        self,
        request: Request[Any, Any, Any],
        store: Database,
        limit: Annotated[int, Parameter(ge=1, le=1000)] = 50,
    ) -> list[dict[str, Any]]:
        """Alerts, newest first, each with its webhook deliveries (a webhook's whole URL to
        an admin token only: another sees its scheme and host)."""
        found = await store.alerts.recent(limit)
        token = token_of(request)
        if token.limits.bounded:
            found = await _alerts_in_reach(store, found, token.limits)
        if token.scope != "admin":
            for alert in found:
                for delivery in alert["deliveries"]:
                    delivery["url"] = webhook_site(delivery["url"])
        return found

    @get("/overview", tags=["overview"])
    async def overview(
        self, store: Database, hours: Annotated[float, Parameter(ge=1 / 60, le=24 * 7)] = 6
    ) -> dict[str, Any]:
        """Runs created in the last ``hours`` by state (24 intervals), failure reasons, and
        launch latency percentiles (created to STARTED, from the stored events)."""
        return await store.overview.recent(hours)

    @get("/dead-letters", tags=["dead letters"], opt={"scope": "operate"})
    async def dead_letters(
        self,
        request: Request[Any, Any, Any],
        store: Database,
        limit: Annotated[int, Parameter(ge=1, le=500)] = 50,
    ) -> list[dict[str, Any]]:
        """The latest messages a consumer could not take, oldest first, with the queue each
        came from and why, as the control plane saw them arrive in the dead-letter queue (the
        latest 1,000 are kept, each body's first 4 KiB). Not to a token limited to queues or
        locations: a dead letter may be any run's submission, env and all."""
        within = token_of(request).limits
        if within.bounded:
            raise PermissionDeniedException(
                f"the token {token_of(request).name!r} is limited to queues or locations; dead "
                "letters may be any run's"
            )
        return [
            {
                "seen_at": letter.seen_at,
                "source_queue": letter.source_queue,
                "reason": letter.reason,
                "message_id": letter.message_id,
                "body": letter.body.decode("utf-8", errors="replace"),
            }
            for letter in await store.dead_letters.latest(limit)
        ]

    @get("/limits", tags=["limits"])
    async def limits(self, store: Database) -> list[dict[str, Any]]:
        """Concurrency limits with the runs holding their slots and the runs they hold back."""
        return [
            {
                "key": u.limit.key,
                "max_running": u.limit.max_running,
                "running": u.running,
                "waiting": u.waiting,
            }
            for u in await store.limits.usage()
        ]
