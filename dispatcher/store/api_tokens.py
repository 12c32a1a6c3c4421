"""HTTP API tokens: a name, a scope, and the SHA-256 of a secret shown once.

Not to be confused with submitter tokens (``submitters.py``), which are broker users: an API
token signs in to ``dispatcher web`` only, and starts with ``hdw_``. A token is high-entropy
(256 random bits), so one round of SHA-256 is enough to keep it out of a leaked table.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from schemas import is_safe_name

from ..errors import ConfigError
from ..submitters import ANYWHERE, Limits
from . import audit
from .connections import Connections

TOKEN_PREFIX = "hdw_"
#: Each scope includes the ones before it.
SCOPES = ("read", "operate", "admin")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def allows(scope: str, needed: str) -> bool:
    """Whether a token of ``scope`` may do what needs ``needed``."""
    return SCOPES.index(scope) >= SCOPES.index(needed)


@dataclass(frozen=True)
class ApiToken:
    name: str
    scope: str
    created_at: datetime
    created_by: str
    last_used_at: datetime | None
    revoked_at: datetime | None
    #: Where it may submit and cancel runs (the submitter tokens' rules); empty: anywhere.
    limits: Limits = ANYWHERE


#: A token's columns, as ``_token`` reads them.
_COLUMNS = (
    "t.name, t.scope, t.created_at, t.created_by, t.last_used_at, t.revoked_at, t.queues,"
    " t.locations"
)


def _token(record: asyncpg.Record) -> ApiToken:
    fields = {k: record[k] for k in ("name", "scope", "created_at", "created_by")}
    return ApiToken(
        **fields,
        last_used_at=record["last_used_at"],
        revoked_at=record["revoked_at"],
        limits=Limits(tuple(record["queues"]), tuple(record["locations"])),
    )


class ApiTokens:
    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    async def add(self, name: str, scope: str, actor: str, limits: Limits = ANYWHERE) -> str:
        """Make a token; returns its secret (never stored, never shown again)."""
        if scope not in SCOPES:
            raise ConfigError(f"unknown scope {scope!r}; one of {', '.join(SCOPES)}")
        if not is_safe_name(name):
            raise ConfigError(
                f"a token's name is 1 to 64 letters, digits, '_' and '-', not {name!r}"
            )
        for queue in limits.queues:
            if not is_safe_name(queue):
                raise ConfigError(f"queue name {queue!r} is invalid: letters, digits, '_' and '-'")
        for location in limits.locations:
            if not is_safe_name(location):
                raise ConfigError(
                    f"location name {location!r} is invalid: letters, digits, '_' and '-'"
                )
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        async with self._connections.transaction() as connection:
            if await connection.fetchval(
                "SELECT 1 FROM api_tokens WHERE name = $1 AND revoked_at IS NULL", name
            ):
                raise ConfigError(f"an API token named {name!r} exists; revoke it or pick another")
            # A revoked token's name may be given again (its record goes with the new one).
            await connection.execute(
                """
                INSERT INTO api_tokens (name, scope, digest, created_by, queues, locations)
                VALUES ($1, $2, $3, $4, $5::text[], $6::text[])
                ON CONFLICT (name) DO UPDATE SET scope = excluded.scope, digest = excluded.digest,
                    created_by = excluded.created_by, created_at = now(), last_used_at = NULL,
                    revoked_at = NULL, queues = excluded.queues, locations = excluded.locations
                """,
                name,
                scope,
                digest(token),
                actor,
                list(limits.queues),
                list(limits.locations),
            )
            details = {
                "scope": scope,
                "queues": list(limits.queues),
                "locations": list(limits.locations),
            }
            await audit.record(connection, actor, "api-token.add", name, details)
        return token

    async def revoke(self, name: str, actor: str) -> bool:
        """Revoke a token at once (its row stays, as a record); False if there is none."""
        async with self._connections.transaction() as connection:
            status = await connection.execute(
                "UPDATE api_tokens SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL",
                name,
            )
            if status.endswith(" 0"):
                return False
            # Its browser sessions end with it (and never come back with a new token of
            # the same name).
            await connection.execute("DELETE FROM web_sessions WHERE token_name = $1", name)
            await audit.record(connection, actor, "api-token.revoke", name)
        return True

    async def list(self) -> list[ApiToken]:
        async with self._connections.connection() as connection:
            records = await connection.fetch(f"SELECT {_COLUMNS} FROM api_tokens t ORDER BY name")
        return [_token(r) for r in records]

    async def check(self, token: str) -> ApiToken | None:
        """The live token a secret belongs to, or None; notes when it was last used."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        async with self._connections.connection() as connection:
            record = await connection.fetchrow(
                f"SELECT {_COLUMNS} FROM api_tokens t WHERE digest = $1 AND revoked_at IS NULL",
                digest(token),
            )
            if record is None:
                return None
            used = record["last_used_at"]
            if used is None or (datetime.now(UTC) - used).total_seconds() > 60:
                # A write a minute at most per token: reads stay reads.
                await connection.execute(
                    "UPDATE api_tokens SET last_used_at = now() WHERE name = $1", record["name"]
                )
        return _token(record)

    async def open_session(self, token: str, hours: float) -> tuple[str, str, ApiToken] | None:
        """Sign a browser in with a token: (session secret, CSRF token, the token) or None."""
        found = await self.check(token)
        if found is None:
            return None
        session, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        async with self._connections.transaction() as connection:
            # The token's row is read again FOR SHARE: a revoke that commits meanwhile is
            # seen (the session is not made), one that comes later waits for this one and
            # deletes the session with the token's others.
            made = await connection.fetchval(
                """
                WITH live AS (
                    SELECT name FROM api_tokens
                    WHERE digest = $5 AND revoked_at IS NULL FOR SHARE
                )
                INSERT INTO web_sessions (digest, token_name, csrf, expires_at)
                SELECT $1, live.name, $3, now() + $4 * interval '1 hour' FROM live
                WHERE live.name = $2
                RETURNING 1
                """,
                digest(session),
                found.name,
                csrf,
                hours,
                digest(token),
            )
            if made is None:
                return None
            # Sessions past their time are of no use to anyone.
            await connection.execute("DELETE FROM web_sessions WHERE expires_at < now()")
        return session, csrf, found

    async def session(self, session: str) -> tuple[ApiToken, str] | None:
        """The live token and CSRF token of a browser session, or None (unknown, expired, or
        its token revoked)."""
        if len(session) > 200:
            return None
        async with self._connections.connection() as connection:
            record = await connection.fetchrow(
                f"""
                SELECT {_COLUMNS}, s.csrf
                FROM web_sessions s JOIN api_tokens t ON t.name = s.token_name
                WHERE s.digest = $1 AND s.expires_at > now() AND t.revoked_at IS NULL
                  -- A session of the token that had this name before never comes back
                  -- with a new token of the same name.
                  AND s.created_at >= t.created_at
                """,
                digest(session),
            )
        if record is None:
            return None
        return _token(record), record["csrf"]

    async def close_session(self, session: str) -> None:
        async with self._connections.connection() as connection:
            await connection.execute("DELETE FROM web_sessions WHERE digest = $1", digest(session))
