"""Database migrations: an ordered list of SQL steps, applied once each, under a lock."""

from __future__ import annotations

import asyncio
import logging
import re

import asyncpg

from ..errors import StoreUnavailable
from .connections import quoted

log = logging.getLogger(__name__)

#: Never edit a step that has shipped; append a new one.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "runs, run events, outbox, agents",
        """
        CREATE TABLE runs (
            run_id          uuid PRIMARY KEY,
            idempotency_key text NOT NULL UNIQUE,
            queue           text NOT NULL,
            image           text NOT NULL,
            command         jsonb NOT NULL,
            env             jsonb NOT NULL,
            tags            jsonb NOT NULL,
            max_runtime_s   double precision,
            state           text NOT NULL,
            attempt         integer NOT NULL DEFAULT 1,
            agent_id        text,
            container_id    text,
            exit_code       integer,
            failure_reason  text,
            failure_message text,
            output_tail     jsonb NOT NULL DEFAULT '[]',
            created_at      timestamptz NOT NULL DEFAULT now(),
            updated_at      timestamptz NOT NULL DEFAULT now(),
            started_at      timestamptz,
            finished_at     timestamptz
        );
        CREATE INDEX runs_state_created ON runs (state, created_at DESC);
        CREATE INDEX runs_created ON runs (created_at DESC);

        -- Append-only: every transition (and every event received) is one row.
        CREATE TABLE run_events (
            seq         bigserial PRIMARY KEY,
            event_id    uuid NOT NULL UNIQUE,
            run_id      uuid NOT NULL REFERENCES runs (run_id),
            attempt     integer NOT NULL,
            kind        text NOT NULL,
            from_state  text,
            to_state    text,
            payload     jsonb NOT NULL,
            recorded_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX run_events_run ON run_events (run_id, seq);

        -- Transactional outbox: written with the run, published by the relay.
        CREATE TABLE outbox (
            id          bigserial PRIMARY KEY,
            message_id  uuid NOT NULL UNIQUE,
            run_id      uuid NOT NULL,
            attempt     integer NOT NULL,
            exchange    text NOT NULL,
            routing_key text NOT NULL,
            kind        text NOT NULL,
            payload     bytea NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            sent_at     timestamptz
        );
        CREATE INDEX outbox_unsent ON outbox (id) WHERE sent_at IS NULL;

        CREATE TABLE agents (
            agent_id          text PRIMARY KEY,
            queues            jsonb NOT NULL DEFAULT '[]',
            max_concurrent    integer NOT NULL DEFAULT 0,
            in_flight         jsonb NOT NULL DEFAULT '[]',
            last_sequence     bigint NOT NULL DEFAULT 0,
            first_seen_at     timestamptz NOT NULL DEFAULT now(),
            last_heartbeat_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        2,
        "retries, timeouts, agent liveness, alerts",
        """
        ALTER TABLE runs
            ADD COLUMN start_timeout_s  double precision,
            ADD COLUMN max_retries      integer,
            ADD COLUMN retry_on         jsonb,
            ADD COLUMN memory_limit_mb  integer,
            ADD COLUMN ready_check      jsonb NOT NULL DEFAULT '[]',
            ADD COLUMN state_changed_at timestamptz NOT NULL DEFAULT now();
        CREATE INDEX runs_active ON runs (state) WHERE state IN ('STARTING', 'STARTED');

        -- A retry's LaunchRun waits for its backoff.
        ALTER TABLE outbox ADD COLUMN not_before timestamptz;

        ALTER TABLE agents
            ADD COLUMN status     text NOT NULL DEFAULT 'ALIVE',
            ADD COLUMN lost_at    timestamptz,
            ADD COLUMN interval_s double precision NOT NULL DEFAULT 2;

        -- One row per incident: the dedupe key makes a second alert for it impossible.
        CREATE TABLE alerts (
            id          bigserial PRIMARY KEY,
            dedupe_key  text NOT NULL UNIQUE,
            kind        text NOT NULL,
            subject     text NOT NULL,
            message     text NOT NULL,
            payload     jsonb NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            logged_at   timestamptz
        );
        CREATE TABLE alert_deliveries (
            alert_id        bigint NOT NULL REFERENCES alerts (id),
            url             text NOT NULL,
            attempts        integer NOT NULL DEFAULT 0,
            delivered_at    timestamptz,
            last_error      text,
            next_attempt_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (alert_id, url)
        );
        """,
    ),
    (
        3,
        "forwarded output lines",
        """
        -- One row per line, numbered within the attempt: a line forwarded twice is kept once.
        CREATE TABLE run_logs (
            run_id  uuid NOT NULL REFERENCES runs (run_id),
            attempt integer NOT NULL,
            line_no integer NOT NULL,
            line    text NOT NULL,
            PRIMARY KEY (run_id, attempt, line_no)
        );
        ALTER TABLE runs ADD COLUMN log_truncated boolean NOT NULL DEFAULT false;
        """,
    ),
    (
        4,
        "structured progress",
        """
        CREATE TABLE run_progress (
            run_id      uuid NOT NULL REFERENCES runs (run_id),
            attempt     integer NOT NULL,
            item_no     integer NOT NULL,
            event       text NOT NULL,
            step        text,
            status      text,
            duration_s  double precision,
            level       text,
            message     text,
            details     jsonb NOT NULL DEFAULT '{}',
            recorded_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (run_id, attempt, item_no)
        );
        """,
    ),
    (
        5,
        "code locations",
        """
        CREATE TABLE code_locations (
            name       text PRIMARY KEY,
            image      text NOT NULL,
            command    jsonb NOT NULL DEFAULT '[]',
            env        jsonb NOT NULL DEFAULT '{}',
            queue      text NOT NULL,
            generation integer NOT NULL DEFAULT 1,
            status     text NOT NULL DEFAULT 'LOADING',
            jobs       jsonb NOT NULL DEFAULT '[]',
            loaded_at  timestamptz,
            error      text,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        -- Snapshots of locations go through the outbox too, and belong to no run.
        ALTER TABLE outbox ALTER COLUMN run_id DROP NOT NULL;
        """,
    ),
    (
        6,
        "runs of a location's jobs",
        """
        ALTER TABLE runs
            ADD COLUMN location text,
            ADD COLUMN job      text,
            ADD COLUMN config   jsonb NOT NULL DEFAULT '{}';
        """,
    ),
    (
        7,
        "poison isolation: refused outbox rows, dead-letter counts",
        """
        -- A row the broker refuses is set aside with its reason instead of blocking the rows
        -- behind it (sent_at is set too, so that the relay never takes it again).
        ALTER TABLE outbox ADD COLUMN error text;
        -- Every dead letter seen, by the queue it came from: the dead-letter queue itself is
        -- bounded, so what it dropped is the difference.
        CREATE TABLE dead_letter_counts (
            source_queue text PRIMARY KEY,
            total        bigint NOT NULL DEFAULT 0,
            last_reason  text NOT NULL DEFAULT '',
            last_at      timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        8,
        "audit log of operator actions",
        """
        CREATE TABLE audit_log (
            id      bigserial PRIMARY KEY,
            at      timestamptz NOT NULL DEFAULT now(),
            actor   text NOT NULL,
            action  text NOT NULL,
            subject text NOT NULL,
            details jsonb NOT NULL DEFAULT '{}'
        );
        """,
    ),
    (
        9,
        "submitter tokens and their limits",
        """
        -- Keyed by the token's broker user name (the AMQP user_id of its submissions); the
        -- token itself, and its secret, live on the broker. Empty arrays: no limit.
        CREATE TABLE submitters (
            name       text PRIMARY KEY,
            queues     text[] NOT NULL DEFAULT '{}',
            locations  text[] NOT NULL DEFAULT '{}',
            created_at timestamptz NOT NULL DEFAULT now(),
            created_by text NOT NULL
        );
        """,
    ),
    (
        10,
        "cancellation",
        """
        -- Set when a cancel is asked for: the grace the agent gives the container, and why.
        ALTER TABLE runs
            ADD COLUMN cancel_grace_s double precision,
            ADD COLUMN cancel_reason  text;
        """,
    ),
    (
        11,
        "queue timeouts",
        """
        ALTER TABLE runs ADD COLUMN queue_timeout_s double precision;
        -- The monitor's look at waiting runs reads only them.
        CREATE INDEX runs_queued ON runs (state_changed_at) WHERE state = 'QUEUED';
        """,
    ),
    (
        12,
        "concurrency limits, priorities, resources",
        """
        -- A limit on the runs holding a slot (admitted, not ended) that fall under it.
        -- scope 'global' (name and value empty), 'queue', 'location' (name), 'tag' (name
        -- and value).
        CREATE TABLE limits (
            key         text PRIMARY KEY,
            scope       text NOT NULL,
            name        text NOT NULL DEFAULT '',
            value       text NOT NULL DEFAULT '',
            max_running integer NOT NULL CHECK (max_running >= 0),
            updated_at  timestamptz NOT NULL DEFAULT now()
        );
        -- held: QUEUED with no LaunchRun written, until every limit it falls under has room;
        -- held_by names the limit that held it at the last look.
        ALTER TABLE runs
            ADD COLUMN priority integer NOT NULL DEFAULT 0,
            ADD COLUMN held     boolean NOT NULL DEFAULT false,
            ADD COLUMN held_by  text,
            ADD COLUMN cpus     double precision,
            ADD COLUMN gpus     integer NOT NULL DEFAULT 0;
        CREATE INDEX runs_held ON runs (priority DESC, created_at, run_id)
            WHERE held AND state = 'QUEUED';
        -- What holds a slot: the admitter counts these for every limit.
        CREATE INDEX runs_holding ON runs (queue)
            WHERE NOT held AND state NOT IN ('SUCCESS', 'FAILURE', 'CANCELED');
        -- A run that ends frees its slots: wake the admitter (only while limits exist).
        CREATE FUNCTION hd_slot_freed() RETURNS trigger LANGUAGE plpgsql AS $fn$
        BEGIN
            IF EXISTS (SELECT 1 FROM limits) THEN
                PERFORM pg_notify('hd_admit', '');
            END IF;
            RETURN NULL;
        END
        $fn$;
        CREATE TRIGGER runs_slot_freed AFTER UPDATE OF state ON runs FOR EACH ROW
            WHEN (NOT NEW.held AND OLD.state IS DISTINCT FROM NEW.state
                  AND NEW.state IN ('SUCCESS', 'FAILURE', 'CANCELED'))
            EXECUTE FUNCTION hd_slot_freed();
        ALTER TABLE agents
            ADD COLUMN cpus      double precision,
            ADD COLUMN memory_mb integer,
            ADD COLUMN gpus      integer NOT NULL DEFAULT 0;
        """,
    ),
    (
        13,
        "HTTP API tokens, who submitted a run, submission order",
        """
        -- Only a token's SHA-256 is kept; the token is shown once, when it is made.
        CREATE TABLE api_tokens (
            name         text PRIMARY KEY,
            scope        text NOT NULL CHECK (scope IN ('read', 'operate', 'admin')),
            digest       text NOT NULL UNIQUE,
            created_at   timestamptz NOT NULL DEFAULT now(),
            created_by   text NOT NULL,
            last_used_at timestamptz,
            revoked_at   timestamptz
        );
        -- Who submitted a run: the API token's name, or the submission's broker user.
        ALTER TABLE runs ADD COLUMN submitted_by text;
        -- The order runs were accepted in (runs of one intake batch share created_at): FIFO
        -- among held runs of one priority.
        CREATE SEQUENCE runs_submit_seq;
        ALTER TABLE runs ADD COLUMN submit_seq bigint;
        DROP INDEX runs_held;
        CREATE INDEX runs_held ON runs (priority DESC, submit_seq)
            WHERE held AND state = 'QUEUED';
        -- The HTTP API reads a refusal back by its run id.
        CREATE INDEX outbox_rejections ON outbox (run_id) WHERE kind = 'RunRejected';
        -- Browser sessions of the web UI, signed in with an API token; the cookie holds the
        -- session's secret, this table its SHA-256.
        CREATE TABLE web_sessions (
            digest     text PRIMARY KEY,
            token_name text NOT NULL REFERENCES api_tokens (name) ON DELETE CASCADE,
            csrf       text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            expires_at timestamptz NOT NULL
        );
        """,
    ),
    (
        14,
        "a NOTIFY when run events are stored",
        """
        -- Wakes the HTTP API's event streams at once (one notification per statement, and
        -- one per transaction at most: PostgreSQL folds equal ones).
        CREATE FUNCTION hd_run_events_stored() RETURNS trigger LANGUAGE plpgsql AS $fn$
        BEGIN
            PERFORM pg_notify('hd_run_events', '');
            RETURN NULL;
        END
        $fn$;
        CREATE TRIGGER run_events_stored AFTER INSERT ON run_events FOR EACH STATEMENT
            EXECUTE FUNCTION hd_run_events_stored();
        -- When the row was written, not when its transaction began: an event stream takes a
        -- gap before a row this old for good (see dispatcher/web/sse.py).
        ALTER TABLE run_events ALTER COLUMN recorded_at SET DEFAULT clock_timestamp();
        -- The slot trigger reads the limits of its own schema, whatever the session's path.
        ALTER FUNCTION hd_slot_freed() SET search_path FROM CURRENT;
        """,
    ),
    (
        15,
        "location snapshot revisions",
        """
        -- The last revision of each agent queue's location snapshot. Its row is the lock
        -- that writes a queue's snapshots one at a time (see dispatcher/store/locations.py).
        CREATE TABLE location_snapshot_revisions (
            queue    text PRIMARY KEY,
            revision bigint NOT NULL
        );
        """,
    ),
    (
        16,
        "API tokens' limits",
        """
        -- Where an API token may submit and cancel runs (empty: anywhere), as a submitter
        -- token's limits (dispatcher/submitters.py).
        ALTER TABLE api_tokens
            ADD COLUMN queues    text[] NOT NULL DEFAULT '{}',
            ADD COLUMN locations text[] NOT NULL DEFAULT '{}';
        """,
    ),
    (
        17,
        "the latest dead letters seen",
        """
        -- What the HTTP API lists: the web process reads no queue on the broker. Bounded
        -- (the newest DEAD_LETTERS_KEPT); each body cut to 4 KiB.
        CREATE TABLE dead_letters_seen (
            seq          bigserial PRIMARY KEY,
            seen_at      timestamptz NOT NULL DEFAULT now(),
            source_queue text NOT NULL,
            reason       text NOT NULL,
            message_id   text,
            body         bytea NOT NULL
        );
        """,
    ),
    (
        18,
        "a NOTIFY when outbox rows are written",
        """
        -- Wakes the relay at commit, whoever wrote the rows, with no statement of its own on
        -- the writer's path (one per transaction at most: PostgreSQL folds equal ones).
        CREATE FUNCTION hd_outbox_written() RETURNS trigger LANGUAGE plpgsql AS $fn$
        BEGIN
            IF EXISTS (SELECT 1 FROM written) THEN
                PERFORM pg_notify('hd_outbox', '');
            END IF;
            RETURN NULL;
        END
        $fn$;
        CREATE TRIGGER outbox_written AFTER INSERT ON outbox
            REFERENCING NEW TABLE AS written
            FOR EACH STATEMENT EXECUTE FUNCTION hd_outbox_written();
        """,
    ),
    (
        19,
        "a NOTIFY for run events only when some were stored",
        """
        -- The intake's one statement inserts first events even when every run of a
        -- redelivered batch exists already (no rows): that wakes no event stream.
        DROP TRIGGER run_events_stored ON run_events;
        CREATE OR REPLACE FUNCTION hd_run_events_stored() RETURNS trigger
        LANGUAGE plpgsql AS $fn$
        BEGIN
            IF EXISTS (SELECT 1 FROM stored) THEN
                PERFORM pg_notify('hd_run_events', '');
            END IF;
            RETURN NULL;
        END
        $fn$;
        CREATE TRIGGER run_events_stored AFTER INSERT ON run_events
            REFERENCING NEW TABLE AS stored
            FOR EACH STATEMENT EXECUTE FUNCTION hd_run_events_stored();
        """,
    ),
    (
        20,
        "a NOTIFY for outbox rows only when some are due",
        """
        -- Rows leased to the writer's own relay, or delayed (a retry's backoff), are not due:
        -- waking the relay for them would only have it find nothing.
        CREATE OR REPLACE FUNCTION hd_outbox_written() RETURNS trigger LANGUAGE plpgsql AS $fn$
        BEGIN
            IF EXISTS (
                SELECT 1 FROM written WHERE not_before IS NULL OR not_before <= now()
            ) THEN
                PERFORM pg_notify('hd_outbox', '');
            END IF;
            RETURN NULL;
        END
        $fn$;
        """,
    ),
    (
        21,
        "finished runs in the order retention goes through them",
        """
        CREATE INDEX CONCURRENTLY runs_finished ON runs (finished_at, run_id)
            WHERE state IN ('SUCCESS', 'FAILURE', 'CANCELED');
        """,
    ),
)

_LOCK_KEY = 0x68642D6D6967  # "hd-mig": one migrator at a time

#: How long a step waits for a table's lock before it lets go and tries again: an
#: ``ALTER TABLE`` waiting behind a long transaction would hold up every query after it.
LOCK_TIMEOUT = "5s"
#: Attempts of a step whose locks were taken (by a long transaction), LOCK_WAIT_S apart.
LOCK_ATTEMPTS = 24
LOCK_WAIT_S = 5.0
#: How often a migrator looks whether another one is done.
LOCK_POLL_S = 0.5
_CONCURRENT_INDEX = re.compile(r"\s*CREATE INDEX CONCURRENTLY (\w+)")


async def _drop_if_invalid(connection: asyncpg.Connection, index: str) -> None:
    """Drop ``index`` when a build that failed (or was cut off) left it invalid."""
    valid = await connection.fetchval(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", index
    )
    if valid is False:
        await connection.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {index}")


async def upgrade(connection: asyncpg.Connection, schema: str | None = None) -> list[int]:
    """Apply every migration not yet applied; returns the versions applied now.

    ``schema``: the schema the connection's ``search_path`` names (a plain name: see
    ``connections.check_schema``), created if missing. Nothing is created when it all exists,
    so that a user without CREATE privilege starts on a database migrated before; and the
    schema is created under the migrators' lock, where two replicas starting together raced.
    """
    applied_now: list[int] = []
    # Waited for here rather than in the server: a session waiting in pg_advisory_lock has a
    # snapshot, which a CREATE INDEX CONCURRENTLY of the migrator holding the lock waits
    # for in turn (a deadlock, one of the two failed).
    while not await connection.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):  # noqa: ASYNC110 - the server's lock, no event here to wait on
        await asyncio.sleep(LOCK_POLL_S)
    try:
        if schema and not await connection.fetchval(
            "SELECT 1 FROM pg_namespace WHERE nspname = $1", schema
        ):
            await connection.execute(f"CREATE SCHEMA {quoted(schema)}")
        if await connection.fetchval("SELECT to_regclass('schema_migrations')") is None:
            await connection.execute(
                """
                CREATE TABLE schema_migrations (
                    version    integer PRIMARY KEY,
                    name       text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )
                """
            )
        done = {
            row["version"]
            for row in await connection.fetch("SELECT version FROM schema_migrations")
        }
        newest = MIGRATIONS[-1][0]
        if done and max(done) > newest:
            # Said, not refused: during a rolling upgrade the replicas not yet upgraded run on
            # the new schema (its steps add to it), and a rollback does too.
            log.warning(
                "%s: this process runs on it as it is, and should be upgraded",
                newer_words(max(done)),
            )
        for version, name, sql in MIGRATIONS:
            if version not in done:
                await _apply(connection, version, name, sql)
                applied_now.append(version)
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now


def newer_words(version: int) -> str:
    return (
        f"the database is at version {version}, newer than this release knows "
        f"(up to {MIGRATIONS[-1][0]})"
    )


async def version(connection: asyncpg.Connection) -> int:
    """The newest migration applied to the database (0: none)."""
    if await connection.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return 0
    return int(await connection.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))


async def _apply(connection: asyncpg.Connection, version: int, name: str, sql: str) -> None:
    """One step and its row, in one transaction; tried again while its locks are taken.

    A ``CREATE INDEX CONCURRENTLY`` step runs alone, outside a transaction (as it must):
    it builds its index without holding writes to the table back for the build's length
    (a plain build of a million runs held them 4.4 s); an index a failed build left invalid
    is dropped before the next try."""
    index = _CONCURRENT_INDEX.match(sql)
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        try:
            if index is not None:
                await connection.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
                try:
                    await _drop_if_invalid(connection, index.group(1))
                    await connection.execute(sql)
                finally:
                    await connection.execute("RESET lock_timeout")
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
                return
            async with connection.transaction():
                await connection.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                await connection.execute(sql)
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            return
        except (asyncpg.exceptions.LockNotAvailableError, asyncpg.exceptions.DeadlockDetectedError):
            if attempt == LOCK_ATTEMPTS:
                raise StoreUnavailable(
                    f"migration {version} ({name}) could not lock its tables in "
                    f"{LOCK_ATTEMPTS} attempts: a long transaction holds them"
                ) from None
            log.warning(
                "migration %d waits: its tables are locked by another transaction "
                "(attempt %d of %d, again in %.0f s)",
                version,
                attempt,
                LOCK_ATTEMPTS,
                LOCK_WAIT_S,
            )
            await asyncio.sleep(LOCK_WAIT_S)
