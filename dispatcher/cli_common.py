"""What the ``dispatcher`` subcommands share: connection options, errors, the store."""

from __future__ import annotations

import asyncio
import getpass
import re
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from transport.errors import TransportError

from .errors import DispatcherError

if TYPE_CHECKING:
    from .client import RunOutcome
    from .store import Database
    from .submitters import Limits

T = TypeVar("T")

#: What a command reports in one line with an exit status: the control plane's errors and
#: the transport's (the broker's).
KNOWN_ERRORS = (DispatcherError, TransportError)

AmqpUrl = Annotated[
    str,
    typer.Option(
        envvar="HD_AMQP_URL",
        help="Broker URL, amqp://user:pass@host:5672/ (amqps://...:5671/?cafile=CA.pem for TLS); "
        "a cluster's nodes separated by commas.",
    ),
]
DatabaseUrl = Annotated[
    str,
    typer.Option(envvar="HD_DATABASE_URL", help="PostgreSQL URL, postgresql://user:pass@host/db ."),
]
DatabaseSchema = Annotated[
    str | None,
    typer.Option(envvar="HD_DATABASE_SCHEMA", help="Schema holding the tables (default: public)."),
]
#: A token's limits (submitter tokens and API tokens alike; ``dispatcher.submitters``).
LimitQueues = Annotated[
    list[str] | None,
    typer.Option("--queue", "-q", help="Agent queue it may submit to; repeatable (any)."),
]
LimitLocations = Annotated[
    list[str] | None,
    typer.Option(
        "--location",
        "-l",
        help="Code location whose jobs it may submit; repeatable. Given, the token submits "
        "only those jobs (no run of an image of its own).",
    ),
]


def limits_of(queues: list[str] | None, locations: list[str] | None) -> Limits:
    """The limits the options give, each name once, in order."""
    from .submitters import Limits

    return Limits(tuple(dict.fromkeys(queues or ())), tuple(dict.fromkeys(locations or ())))


#: C0 and C1 control characters (DEL included), but for the tab.
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` for one line of a terminal: what others wrote (a code server's description,
    say) cannot move the cursor, rewrite what is shown or set the window's title."""
    return _CONTROLS.sub("\ufffd", text)


def _fail(message: str, code: int = 2) -> typer.Exit:
    """Print an error the way every subcommand does, and the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def broker_silent(amqp_url: str, seconds: float) -> typer.Exit:
    """The error for a broker that did not let a command connect (and set up what it
    listens on) within its ``--timeout``: nothing was sent, which a timed-out wait would not
    say."""
    from transport.urls import broker_urls, where_of

    nodes = ", ".join(where_of(url) for url in broker_urls(amqp_url))
    return _fail(f"the broker did not answer within {seconds:g} s ({nodes}); nothing was sent", 1)


def with_store(
    database_url: str,
    database_schema: str | None,
    action: Callable[[Database], Awaitable[T]],
    upgrade: bool = False,
) -> T:
    """Open the database, run ``action`` on it, close it; errors end the command with a message."""
    if not database_url:
        raise _fail("no database: pass --database-url or set HD_DATABASE_URL")
    database = open_database()

    async def go() -> T:
        store = await database.open(database_url, schema=database_schema, min_size=1, max_size=2)
        try:
            if upgrade:
                await store.upgrade()
            return await action(store)
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except KNOWN_ERRORS as exc:
        raise _fail(str(exc), 1) from None
    except Exception as exc:
        from .store import refused_in_words

        if (problem := refused_in_words(exc, database_schema)) is None:
            raise
        raise _fail(problem, 1) from None


def parse_env(
    pairs: list[str] | None, form: str = "KEY=VALUE", option: str = "--env"
) -> dict[str, str]:
    """``--env`` (or ``option``) values as a mapping; a pair without ``=`` ends the command."""
    env: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _fail(f"{option} takes {form}, got {pair!r}")
        env[key] = value
    return env


def open_database() -> type[Database]:
    """The store's ``Database``; without the control plane's extra installed, a clear error."""
    try:
        from .store import Database
    except ModuleNotFoundError as exc:
        raise _fail(
            f"this command reads the control plane's database and needs {exc.name!r}: "
            "pip install 'hybrid-dispatcher[control-plane]'"
        ) from None
    return Database


def operator() -> str:
    """Who runs this command, as the audit log names them: the OS user at this host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def show_progress(event: object) -> None:
    """One line per step of a run on its way to the end, each attempt's outcome included."""
    from schemas import RunFailed, RunLaunched, RunRetrying, RunStarted, RunSucceeded

    if isinstance(event, RunLaunched):
        line = f"attempt {event.attempt}: launched on agent {event.agent_id}"
    elif isinstance(event, RunStarted):
        line = f"attempt {event.attempt}: started"
    elif isinstance(event, RunSucceeded):
        line = f"attempt {event.attempt}: succeeded"
    elif isinstance(event, RunFailed):
        code = "" if event.exit_code is None else f", exit code {event.exit_code}"
        note = f": {event.message}" if event.message else ""
        line = f"attempt {event.attempt}: failed ({event.reason.value}{code}){note}"
    elif isinstance(event, RunRetrying):
        line = f"retrying as attempt {event.next_attempt} in {event.delay_s:.1f} s"
    else:
        return
    typer.echo(f"run {event.run_id}: {line}", err=True)


def report_outcome(outcome: RunOutcome) -> int:
    """Print how a waited-for run ended (its last output lines, then its verdict); the exit
    code a command that waited for it ends with."""
    for line in outcome.output_tail:
        typer.echo(f"  | {line}", err=True)
    verdict = (
        "SUCCESS"
        if outcome.succeeded
        else "CANCELED"
        if outcome.canceled
        else f"FAILURE ({outcome.reason})"
    )
    code = "" if outcome.exit_code is None else f", exit code {outcome.exit_code}"
    tries = f" on attempt {outcome.attempt}" if outcome.attempt > 1 else ""
    typer.echo(f"run {outcome.run_id}: {verdict}{code}{tries}", err=True)
    return outcome.process_exit_code
