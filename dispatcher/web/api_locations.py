"""``/api/v1/locations``: code locations with their definitions; adding, changing,
redeploying and removing one takes an ``admin`` token (audited under the token's name)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import msgspec
from litestar import Controller, Request, delete, get, post, put
from litestar.exceptions import ClientException, NotFoundException

from schemas import is_safe_name
from schemas.bounds import Argv, Env, ImageRef, Name

from ..errors import ConfigError, LocationNotFound
from ..store import Database, Location
from ..submissions import is_location_name
from . import views
from .auth import token_of

ADMIN = {"scope": "admin"}


class LocationBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A location's spec: its image, its code server's command, env (``secret:NAME`` values
    are references, resolved on the agents' hosts) and the queue whose agents keep it."""

    image: ImageRef
    command: Argv = ()
    env: Env = msgspec.field(default_factory=dict)
    queue: Name = "default"


def _actor(request: Request[Any, Any, Any]) -> str:
    return f"api:{token_of(request).name}"


def _known(name: str) -> str:
    if not is_safe_name(name):
        raise NotFoundException(f"no location {name[:60]!r}")
    return name


def _shown(request: Request[Any, Any, Any], location: Location) -> dict[str, Any]:
    """A location as this request's token may see it: its env's names only to a ``read``
    token, or to one limited to other locations or queues."""
    shown = asdict(location)
    token = token_of(request)
    within = token.limits
    mine = (not within.locations or location.name in within.locations) and (
        not within.queues or location.queue in within.queues
    )
    if not (views.sees_env(token.scope) and mine):
        shown["env"] = dict.fromkeys(shown["env"], views.HIDDEN)
    return shown


class LocationsController(Controller):
    path = "/locations"
    tags = ["locations"]

    @get("/")
    async def list_locations(
        self, request: Request[Any, Any, Any], store: Database
    ) -> list[dict[str, Any]]:
        """Code locations: state, generation, image, queue and jobs with their schemas (env
        values from ``operate`` up, as a run's)."""
        return [_shown(request, location) for location in await store.locations.all()]

    @get("/{name:str}")
    async def get_location(
        self, request: Request[Any, Any, Any], store: Database, name: str
    ) -> dict[str, Any]:
        try:
            return _shown(request, await store.locations.get(_known(name)))
        except LocationNotFound:
            raise NotFoundException(f"no location {name!r}") from None

    @post("/{name:str}", opt=ADMIN, status_code=201)
    async def add_location(
        self, request: Request[Any, Any, Any], store: Database, name: str, data: LocationBody
    ) -> dict[str, Any]:
        """Register a location; the agents of its queue start its code server."""
        if not is_location_name(name):
            # Checked before the store reads it: PostgreSQL refuses a NUL in text (a 500).
            raise ClientException(
                f"location name {name[:60]!r} is invalid: 1 to 63 lowercase letters, digits, "
                "'_' and '-'"
            )
        return await self._put(request, store, name, data, create=True)

    @put("/{name:str}", opt=ADMIN)
    async def update_location(
        self, request: Request[Any, Any, Any], store: Database, name: str, data: LocationBody
    ) -> dict[str, Any]:
        """Change a location: a new generation, its code servers replaced."""
        return await self._put(request, store, _known(name), data, create=False)

    @post("/{name:str}/redeploy", opt=ADMIN, status_code=202)
    async def redeploy_location(
        self, request: Request[Any, Any, Any], store: Database, name: str
    ) -> dict[str, Any]:
        """Fresh code servers for a location, as it is."""
        try:
            return asdict(await store.locations.redeploy(_known(name), _actor(request)))
        except LocationNotFound:
            raise NotFoundException(f"no location {name!r}") from None

    @delete("/{name:str}", opt=ADMIN, status_code=204)
    async def remove_location(
        self, request: Request[Any, Any, Any], store: Database, name: str
    ) -> None:
        """Remove a location; its code servers are stopped."""
        try:
            await store.locations.remove(_known(name), _actor(request))
        except LocationNotFound:
            raise NotFoundException(f"no location {name!r}") from None

    @staticmethod
    async def _put(
        request: Request[Any, Any, Any],
        store: Database,
        name: str,
        data: LocationBody,
        create: bool,
    ) -> dict[str, Any]:
        try:
            location = await store.locations.put(
                name,
                data.image,
                data.command,
                dict(data.env),
                data.queue,
                create=create,
                actor=_actor(request),
            )
        except LocationNotFound:
            raise NotFoundException(f"no location {name!r}") from None
        except ConfigError as exc:
            status = 409 if "exists already" in str(exc) else 400
            raise ClientException(str(exc), status_code=status) from None
        return asdict(location)
