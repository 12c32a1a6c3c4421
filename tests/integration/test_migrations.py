"""Migrations and the schema on a real PostgreSQL: replicas starting together, a database
newer than the code, a user who may not create, a table locked by a long transaction, a
schema name PostgreSQL would read otherwise, and a deadlock that is retried."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.parse

import asyncpg
import pytest

from dispatcher.errors import ConfigError, StoreUnavailable
from dispatcher.store import Database
from dispatcher.store import migrations as migrations_module
from dispatcher.store.migrations import MIGRATIONS

NEWEST = MIGRATIONS[-1][0]


async def db_upgrade(database_url: str, schema: str) -> subprocess.CompletedProcess[str]:
    """`dispatcher db upgrade` on ``schema``, as an operator runs it."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "dispatcher", "db", "upgrade"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"HD_DATABASE_URL": database_url, "HD_DATABASE_SCHEMA": schema, "PATH": ""},
    )


async def test_replicas_starting_together_on_a_fresh_schema_migrate_it_once(
    database_url: str, schema: str
) -> None:
    stores = [await Database.open(database_url, schema=schema, min_size=1) for _ in range(6)]
    try:
        applied = await asyncio.gather(*(s.upgrade() for s in stores))
    finally:
        for store in stores:
            await store.close()
    # Each version applied by exactly one of them; none failed on the schema's creation.
    assert sorted(v for versions in applied for v in versions) == [m[0] for m in MIGRATIONS]


async def test_a_database_newer_than_the_code_is_run_on_and_said(
    database_url: str, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """During a rolling upgrade, replicas not upgraded yet run on the new schema (its steps
    add to it): said, not refused."""
    store = await Database.open(database_url, schema=schema, min_size=1)
    try:
        await store.upgrade()
        async with store.connections.connection() as connection:
            await connection.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, 'from a later release')",
                NEWEST + 1,
            )
        assert await store.upgrade() == []
        assert await store.version() == NEWEST + 1
    finally:
        await store.close()
    assert f"at version {NEWEST + 1}, newer than this release knows" in caplog.text
    result = await db_upgrade(database_url, schema)
    assert result.returncode == 0, result.stderr
    assert f"warning: the database is at version {NEWEST + 1}, newer than" in result.stderr
    assert "up to date" not in result.stdout


async def test_a_user_who_may_not_create_starts_on_a_migrated_schema(
    database_url: str, schema: str, unique: str
) -> None:
    owner = await Database.open(database_url, schema=schema, min_size=1)
    await owner.upgrade()
    await owner.close()
    role = f"t_user_{unique}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
        await admin.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
        await admin.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}"
        )
        parts = urllib.parse.urlsplit(database_url)
        as_role = parts._replace(netloc=f"{role}:pw@{parts.hostname}:{parts.port}").geturl()
        # No CREATE on the database nor the schema: nothing is created when all exists.
        store = await Database.open(as_role, schema=schema, min_size=1)
        try:
            assert await store.upgrade() == []
        finally:
            await store.close()
        # On a schema not migrated yet, the same user is told what to do, in words.
        store = await Database.open(as_role, schema=f"{schema}_new", min_size=1)
        try:
            with pytest.raises(ConfigError, match="may not make what the control plane needs"):
                await store.upgrade()
        finally:
            await store.close()
    finally:
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


async def test_a_step_waits_for_its_locks_without_holding_up_other_queries(
    database_url: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await Database.open(database_url, schema=schema, min_size=1)
    try:
        await store.upgrade()
        step = (NEWEST + 1, "a test step", "ALTER TABLE runs ADD COLUMN t_extra integer")
        monkeypatch.setattr(migrations_module, "MIGRATIONS", (*MIGRATIONS, step))
        monkeypatch.setattr(migrations_module, "LOCK_TIMEOUT", "100ms")
        monkeypatch.setattr(migrations_module, "LOCK_WAIT_S", 0.1)
        monkeypatch.setattr(migrations_module, "LOCK_ATTEMPTS", 3)
        # A long transaction that read runs (a relay waiting on the broker, say).
        async with store.connections.transaction() as long_one:
            await long_one.fetchval("SELECT count(*) FROM runs")
            with pytest.raises(StoreUnavailable, match="could not lock its tables in 3 attempts"):
                await store.upgrade()
            # The step let go: a query after it is not queued behind its ALTER TABLE.
            async with store.connections.connection() as other:
                assert await other.fetchval("SELECT count(*) FROM runs") == 0
        assert await store.upgrade() == [NEWEST + 1]
    finally:
        await store.close()


@pytest.mark.parametrize("name", ["t_a,public", "t_space ", 't_"quote', "t_\x07bell", "pg_x"])
async def test_a_schema_name_postgresql_would_take_for_another_is_refused(
    database_url: str, name: str
) -> None:
    with pytest.raises(ConfigError, match="cannot be used"):
        await Database.open(database_url, schema=name, min_size=1)
    result = await db_upgrade(database_url, name)
    assert result.returncode == 1, result.stderr
    assert "cannot be used" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_schema_name_is_used_as_written(database_url: str, unique: str) -> None:
    """Quoted everywhere: an uppercase letter is not folded (a schema made, then not found)
    and a name with a '-' works as it did."""
    name = f"T_Odd-{unique}"
    store = await Database.open(database_url, schema=name, min_size=1)
    try:
        assert await store.upgrade() == [m[0] for m in MIGRATIONS]
        async with store.connections.connection() as connection:
            where = await connection.fetchval(
                "SELECT schemaname FROM pg_tables WHERE tablename = 'runs'"
                " AND schemaname = current_schema()"
            )
        assert where == name
    finally:
        await store.close()
        admin = await asyncpg.connect(database_url)
        await admin.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await admin.close()


async def test_an_index_built_concurrently_waits_out_a_long_transaction_and_is_valid(
    database_url: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await Database.open(database_url, schema=schema, min_size=1)
    try:
        await store.upgrade()
        step = (NEWEST + 1, "a test index", "CREATE INDEX CONCURRENTLY t_exit ON runs (exit_code)")
        monkeypatch.setattr(migrations_module, "MIGRATIONS", (*MIGRATIONS, step))
        monkeypatch.setattr(migrations_module, "LOCK_TIMEOUT", "100ms")
        monkeypatch.setattr(migrations_module, "LOCK_WAIT_S", 0.1)
        monkeypatch.setattr(migrations_module, "LOCK_ATTEMPTS", 3)
        async with store.connections.transaction() as long_one:
            await long_one.fetchval("SELECT count(*) FROM runs")
            with pytest.raises(StoreUnavailable, match="could not lock its tables in 3 attempts"):
                await store.upgrade()
        # The build that gave up left an invalid index: dropped, and built again.
        assert await store.upgrade() == [NEWEST + 1]
        async with store.connections.connection() as connection:
            valid = await connection.fetchval(
                "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('t_exit')"
            )
        assert valid is True
    finally:
        await store.close()


async def test_a_deadlock_is_a_store_unavailable_its_caller_retries(store: Database) -> None:
    async with store.connections.connection() as connection:
        await connection.execute("CREATE TABLE t_rows (id integer PRIMARY KEY)")
        await connection.execute("INSERT INTO t_rows VALUES (1), (2)")
    first_locked = [asyncio.Event(), asyncio.Event()]

    async def lock_both(first: int) -> None:
        async with store.connections.transaction() as connection:
            await connection.execute("SELECT 1 FROM t_rows WHERE id = $1 FOR UPDATE", first)
            first_locked[first - 1].set()
            await asyncio.gather(*(e.wait() for e in first_locked))
            await connection.execute("SELECT 1 FROM t_rows WHERE id = $1 FOR UPDATE", 3 - first)

    outcomes = await asyncio.gather(lock_both(1), lock_both(2), return_exceptions=True)
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(failed) == 1, outcomes
    assert isinstance(failed[0], StoreUnavailable)
    assert "rolled a transaction back" in str(failed[0])
