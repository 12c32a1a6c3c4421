"""Code locations: the registry, and the snapshots agents reconcile to.

Every change writes, in its transaction, a LocationSnapshot of each agent queue it touches to
the outbox; agents keep exactly the code servers of their queues' latest snapshot. Only
references to secrets are stored (``secret:NAME``); agents resolve them on their hosts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from hd_sdk.config import problems
from schemas import (
    InvalidMessage,
    LocationFailed,
    LocationLoaded,
    LocationSnapshot,
    LocationSpec,
    SchemaError,
    SubmitRun,
    encode,
    is_safe_name,
)
from schemas.codec import Decoder
from schemas.topology import LOCATIONS_EXCHANGE

from .. import submissions
from ..errors import ConfigError, LocationNotFound
from . import audit, outbox
from .connections import Connections

#: What agents decode a queue's snapshot with: a location it refuses would take every
#: location of its queue down with it.
_SNAPSHOTS: Decoder[LocationSnapshot] = Decoder(LocationSnapshot)


@dataclass(frozen=True)
class Location:
    name: str
    image: str
    command: list[str]
    env: dict[str, str]
    queue: str
    generation: int
    status: str
    jobs: list[dict[str, Any]]
    loaded_at: datetime | None
    error: str | None

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> Location:
        return cls(
            r["name"],
            r["image"],
            json.loads(r["command"]),
            json.loads(r["env"]),
            r["queue"],
            r["generation"],
            r["status"],
            json.loads(r["jobs"]),
            r["loaded_at"],
            r["error"],
        )


def check_location(
    name: str,
    image: str,
    queue: str,
    env: dict[str, str] | None = None,
    command: Sequence[str] = (),
) -> None:
    """Refuse (ConfigError, in words) a location its agents could not take: it is checked as
    part of its queue's snapshot, with the agents' own decoder."""
    if not submissions.is_location_name(name):
        raise ConfigError(
            f"location name {name!r} is invalid: 1 to 63 lowercase letters, digits, '_' and '-'"
        )
    if not image.strip():
        raise ConfigError("a location needs an image")
    if not queue.strip():
        raise ConfigError("a location needs an agent queue")
    if not is_safe_name(queue):
        raise ConfigError(f"agent queue name {queue!r} is invalid: letters, digits, '_' and '-'")
    if reason := submissions.secret_reference_problem(env or {}):
        raise ConfigError(reason)
    try:
        spec = LocationSpec(name=name, image=image, command=tuple(command), env=dict(env or {}))
        _SNAPSHOTS.decode(encode(LocationSnapshot(queue=queue, locations=(spec,))))
    except InvalidMessage as exc:
        where = (exc.field or "").removeprefix("locations[0].")
        detail = exc.detail
        if "matching regex" in detail:
            detail = f"{image!r} is not an image reference" if where == "image" else "not valid"
        raise ConfigError(f"invalid location: {where + ': ' if where else ''}{detail}") from None
    except SchemaError as exc:
        raise ConfigError(f"invalid location: {exc}") from None
    except UnicodeEncodeError:  # a lone surrogate: an argument that was not UTF-8
        raise ConfigError(
            "invalid location: its image, command or env holds text that is not UTF-8"
        ) from None


class Locations:
    """The code-location registry; every change writes the snapshots of the queues it touches."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    async def put(
        self,
        name: str,
        image: str | None,
        command: Sequence[str] | None = (),
        env: dict[str, str] | None = None,
        queue: str | None = "default",
        create: bool = True,
        actor: str = "unknown",
    ) -> Location:
        """Add (``create``) or update a location; either bumps nothing else's generation.

        An update keeps what is given as None (image, command, env, queue) as it is."""
        async with self._connections.transaction() as connection:
            before = await connection.fetchrow(
                "SELECT * FROM code_locations WHERE name = $1 FOR UPDATE", name
            )
            if create and before is not None:
                raise ConfigError(f"location {name!r} exists already; use `locations update`")
            if not create and before is None:
                raise LocationNotFound(f"no location {name!r}")
            if not create:
                kept = Location.from_record(before)
                image = kept.image if image is None else image
                command = kept.command if command is None else command
                env = kept.env if env is None else env
                queue = kept.queue if queue is None else queue
            image = image or ""
            command = command or ()
            queue = "default" if queue is None else queue
            check_location(name, image, queue, env, command)
            record = await connection.fetchrow(
                """
                INSERT INTO code_locations (name, image, command, env, queue)
                VALUES ($1, $2, $3::jsonb, $4::jsonb, $5)
                ON CONFLICT (name) DO UPDATE SET
                    image = EXCLUDED.image, command = EXCLUDED.command, env = EXCLUDED.env,
                    queue = EXCLUDED.queue, generation = code_locations.generation + 1,
                    status = 'LOADING', error = NULL, updated_at = now()
                RETURNING *
                """,
                name,
                image,
                json.dumps(list(command)),
                json.dumps(env or {}),
                queue,
            )
            queues = {queue} | ({before["queue"]} if before is not None else set())
            await snapshot(connection, queues, checked=queue)
            details = {"image": image, "queue": queue, "generation": record["generation"]}
            await audit.record(
                connection, actor, "location.add" if create else "location.update", name, details
            )
            return Location.from_record(record)

    async def redeploy(self, name: str, actor: str = "unknown") -> Location:
        """A new generation of the same spec: every agent starts a fresh code server."""
        async with self._connections.transaction() as connection:
            record = await connection.fetchrow(
                """
                UPDATE code_locations SET generation = generation + 1, status = 'LOADING',
                    error = NULL, updated_at = now()
                WHERE name = $1 RETURNING *
                """,
                name,
            )
            if record is None:
                raise LocationNotFound(f"no location {name!r}")
            await snapshot(connection, {record["queue"]})
            details = {"generation": record["generation"]}
            await audit.record(connection, actor, "location.redeploy", name, details)
            return Location.from_record(record)

    async def remove(self, name: str, actor: str = "unknown") -> None:
        async with self._connections.transaction() as connection:
            queue = await connection.fetchval(
                "DELETE FROM code_locations WHERE name = $1 RETURNING queue", name
            )
            if queue is None:
                raise LocationNotFound(f"no location {name!r}")
            await snapshot(connection, {queue})
            await audit.record(connection, actor, "location.remove", name)

    async def wanted(self, queues: Sequence[str]) -> None:
        """An agent asked: the snapshots of its queues go out again; of those that have
        locations, had some, or are an agent's (its heartbeats say). Any agent may ask, for
        any names: each new one was a row of snapshot revisions kept for good."""
        async with self._connections.transaction() as connection:
            known = await connection.fetch(
                """
                SELECT asked.queue_name FROM unnest($1::text[]) AS asked(queue_name)
                WHERE EXISTS (SELECT 1 FROM code_locations l WHERE l.queue = asked.queue_name)
                   OR EXISTS (SELECT 1 FROM location_snapshot_revisions r
                              WHERE r.queue = asked.queue_name)
                   OR EXISTS (SELECT 1 FROM agents a, jsonb_array_elements_text(a.queues) q
                              WHERE q = asked.queue_name)
                """,
                sorted(set(queues)),
            )
            await snapshot(connection, {record["queue_name"] for record in known})

    async def all(self) -> list[Location]:
        async with self._connections.connection() as connection:
            records = await connection.fetch("SELECT * FROM code_locations ORDER BY name")
        return [Location.from_record(r) for r in records]

    async def get(self, name: str) -> Location:
        async with self._connections.connection() as connection:
            record = await connection.fetchrow("SELECT * FROM code_locations WHERE name = $1", name)
        if record is None:
            raise LocationNotFound(f"no location {name!r}")
        return Location.from_record(record)


async def resolve_job(
    connection: asyncpg.Connection, submission: SubmitRun
) -> tuple[str | None, SubmitRun | None]:
    """(problem, None) or (None, the submission as its location's image on its queue).

    The location alone gives the run its image, command and environment (its secrets among
    them): a submission that brings its own is refused.
    """
    if not submission.location or not submission.job:
        return "a job run needs both a location and a job", None
    if brought := submissions.problem(submission):
        return brought.reason, None
    record = await connection.fetchrow(
        "SELECT * FROM code_locations WHERE name = $1", submission.location
    )
    if record is None:
        return f"no location {submission.location!r}", None
    location = Location.from_record(record)
    if location.status != "LOADED" and not location.jobs:
        return f"location {location.name!r} has no loaded definitions yet ({location.status})", None
    job = next((j for j in location.jobs if j["name"] == submission.job), None)
    if job is None:
        known = _listed(sorted(j["name"] for j in location.jobs), ", ") or "none"
        return f"no job {submission.job!r} in location {location.name!r} (jobs: {known})", None
    try:
        # One past the most named: a refusal says there are more, and the check stops
        # there (a 10,000-item array against a long enum took seconds and a gigabyte).
        found = problems(job.get("config_schema") or {}, submission.config, limit=21)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        # The schema came from the location's code server, unchecked beyond its size: one
        # it cannot be read by refuses the job's submissions in words, never fails the batch.
        return (
            f"job {submission.job!r} of location {location.name!r} has a config schema that "
            f"cannot be applied ({exc!r}): fix the job's definition",
            None,
        )
    if found:
        named = "; ".join(found[:20]) + ("; and more" if len(found) > 20 else "")
        return f"invalid config for job {submission.job!r}: {named}", None
    return None, msgspec.structs.replace(submission, image=location.image, queue=location.queue)


def _listed(items: list[str], separator: str, most: int = 20) -> str:
    """The first ``most`` of ``items``, and how many more: a refusal names a few problems,
    not each of a config's thousands."""
    more = len(items) - most
    return separator.join(items[:most]) + (f"{separator}and {more} more" if more > 0 else "")


#: The reporting agent ($4) consumes the location's queue.
_OF_ITS_QUEUE = (
    "EXISTS (SELECT 1 FROM agents a WHERE a.agent_id = $4 AND a.queues ? code_locations.queue)"
)


async def record_event(
    connection: asyncpg.Connection, event: LocationLoaded | LocationFailed
) -> None:
    """A code server's news, applied only to the location's current generation, and only
    from an agent of its queue (as its heartbeats say): any agent may publish such news, and
    a forged ``LocationLoaded`` without jobs would refuse the location's every submission."""
    if isinstance(event, LocationLoaded):
        jobs = [
            {"name": j.name, "description": j.description, "config_schema": j.config_schema}
            for j in event.jobs
        ]
        await connection.execute(
            f"""
            UPDATE code_locations SET status = 'LOADED', jobs = $3::jsonb, loaded_at = now(),
                error = NULL, updated_at = now()
            WHERE name = $1 AND generation = $2 AND {_OF_ITS_QUEUE}
            """,
            event.location,
            event.generation,
            json.dumps(jobs),
            event.agent_id,
        )
    else:
        detail = "\n".join([event.message, *event.output_tail[-20:]])
        await connection.execute(
            f"""
            UPDATE code_locations SET status = 'ERROR', error = $3, updated_at = now()
            WHERE name = $1 AND generation = $2 AND status <> 'LOADED' AND {_OF_ITS_QUEUE}
            """,
            event.location,
            event.generation,
            detail[:8000],
            event.agent_id,
        )


async def snapshot(
    connection: asyncpg.Connection, queues: set[str], checked: str | None = None
) -> None:
    """Write the snapshots of ``queues`` to the outbox, each under its queue's lock.

    The lock (the queue's row of ``location_snapshot_revisions``, held to the end of the
    transaction, taken in queue order) makes snapshots of a queue one at a time: one that
    waited reads, as a new statement, what the one before it committed. Without it, an agent
    asking while a location is added could have a snapshot read before the addition committed
    sent after the addition's own, and keep no server. The revision, taken under the lock,
    lets agents drop a snapshot that arrives late: the clock in microseconds, and always above
    the queue's last one (a clock set back, a database restored from a backup, do not make
    agents ignore what comes next).

    The snapshot of ``checked`` (the queue a location was put on) is refused (ConfigError)
    unless the agents' decoder takes it whole: each location may pass alone, and their sum
    be past the message's size or the snapshot's count of locations, which the agents would
    refuse, losing every location of the queue.
    """
    for queue in sorted(queues):
        revision = await connection.fetchval(
            """
            INSERT INTO location_snapshot_revisions AS r (queue, revision)
            VALUES ($1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)
            ON CONFLICT (queue) DO UPDATE
                SET revision = greatest(EXCLUDED.revision, r.revision + 1)
            RETURNING revision
            """,
            queue,
        )
        records = await connection.fetch(
            "SELECT * FROM code_locations WHERE queue = $1 ORDER BY name", queue
        )
        message = LocationSnapshot(
            queue=queue,
            revision=revision,
            locations=tuple(
                LocationSpec(
                    name=r["name"],
                    image=r["image"],
                    command=tuple(json.loads(r["command"])),
                    env=json.loads(r["env"]),
                    generation=r["generation"],
                )
                for r in records
            ),
        )
        if queue == checked:
            try:
                _SNAPSHOTS.decode(encode(message))
            except SchemaError as exc:
                raise ConfigError(
                    f"queue {queue}'s locations would not reach its agents together ({exc}): "
                    "remove a location of the queue, or put this one on another"
                ) from None
        await outbox.insert(connection, [outbox.OutboxItem(message, LOCATIONS_EXCHANGE, queue)])
