"""The ``dispatcher`` command: control plane, failure monitor, submission and inspection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shlex
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from transport.metrics import serve_metrics
from transport.process import LogLevel, version_option

from . import cli_identities  # noqa: F401  (registers agents add|rotate|revoke)
from .cli_common import (
    KNOWN_ERRORS,
    AmqpUrl,
    DatabaseSchema,
    DatabaseUrl,
    _fail,
    broker_silent,
    open_database,
    parse_env,
    report_outcome,
    show_progress,
    with_store,
)
from .cli_limits import limits_app
from .cli_locations import locations_app
from .cli_ops import agents_app, alerts_app, audit_app, dead_letters_app
from .cli_roles import identities_app
from .cli_runs import runs_app
from .cli_tokens import tokens_app
from .cli_web import api_tokens_app, web
from .errors import InvalidSubmission

if TYPE_CHECKING:
    from .store import Database

app = typer.Typer(
    name="dispatcher",
    help=(
        "Control plane of the hybrid work dispatcher: it keeps run metadata in PostgreSQL, "
        "sends launch instructions to agents over RabbitMQ, and follows their status events."
    ),
    no_args_is_help=True,
    add_completion=False,
)
schemas_app = typer.Typer(
    help="The wire contract: every message agents, scripts and the control plane exchange.",
    no_args_is_help=True,
)
app.add_typer(schemas_app, name="schemas")
db_app = typer.Typer(help="The control plane's PostgreSQL database.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(runs_app, name="runs")

app.add_typer(agents_app, name="agents")
app.add_typer(alerts_app, name="alerts")
app.add_typer(audit_app, name="audit")
app.add_typer(dead_letters_app, name="dead-letters")
app.add_typer(locations_app, name="locations")
app.add_typer(identities_app, name="identities")
app.add_typer(tokens_app, name="tokens")
app.add_typer(limits_app, name="limits")
app.add_typer(api_tokens_app, name="api-tokens")
app.command()(web)


@app.callback()
def _root(
    version: Annotated[bool, version_option("dispatcher")] = False,
) -> None:
    """Hybrid work dispatcher: control plane."""


@schemas_app.command("export")
def schemas_export(
    into: Annotated[
        str,
        typer.Argument(metavar="DIRECTORY", help="Directory to write into; created when missing."),
    ],
) -> None:
    """Write one JSON Schema file per message kind (and one per union) into DIRECTORY."""
    from schemas.export import export

    if not into.strip():
        raise _fail("give a directory to write into (an empty path is none)")
    directory = Path(into)
    if directory.exists() and not directory.is_dir():
        raise _fail(f"{directory} exists and is not a directory")
    try:
        written = export(directory)
    except OSError as exc:
        raise _fail(f"cannot write into {directory}: {exc.strerror or exc}", 1) from None
    for path in written:
        typer.echo(str(path))
    typer.echo(f"{len(written)} schema files written to {directory}", err=True)


@app.command()
def serve(
    amqp_url: AmqpUrl = "",
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
    components: Annotated[
        str,
        typer.Option(
            envvar="HD_COMPONENTS",
            help="Comma-separated components to run: intake, relay, status (the default), and "
            "web (the HTTP API, on HD_WEB_HOST:HD_WEB_PORT, 127.0.0.1:8080 by default).",
        ),
    ] = "intake,relay,status",
    metrics_port: Annotated[
        int, typer.Option(envvar="HD_METRICS_PORT", help="Serve /metrics here; 0: no metrics.")
    ] = 9464,
    management_url: Annotated[
        str,
        typer.Option(
            envvar="HD_AMQP_MANAGEMENT_URL",
            help="RabbitMQ management API, http://user:pass@host:15672 (default: the broker's "
            "host on 15672, or https on 15671 for amqps, with the AMQP credentials); used to "
            "set the broker policies.",
        ),
    ] = "",
    broker_policies: Annotated[
        bool,
        typer.Option(
            envvar="HD_BROKER_POLICIES",
            help="Set the delivery-limit and dead-letter policies at start-up.",
        ),
    ] = True,
    delivery_limit: Annotated[
        int | None,
        typer.Option(help="Deliveries of one message before the broker dead-letters it (20)."),
    ] = None,
    log_level: Annotated[
        LogLevel, typer.Option(case_sensitive=False, help="What to log, from DEBUG up.")
    ] = LogLevel.INFO,
) -> None:
    """Run the control plane: take submissions, dispatch runs, record their events.

    At start-up it sets RabbitMQ policies through the management API: a delivery limit on
    every consumed queue (a message that keeps coming back is dead-lettered by the broker)
    and a bound on the dead-letter queues. Poison messages are dead-lettered with a reason,
    counted, alerted on, and never stop the other messages.
    """
    from transport.process import run_until_signalled, setup_logging

    open_database()  # a clear error without the control plane's extra
    from .service import serve as serve_forever
    from .settings import ControlPlaneSettings

    try:
        settings = ControlPlaneSettings.from_env(
            amqp_url=amqp_url or None,
            database_url=database_url or None,
            database_schema=database_schema,
            components=tuple(c.strip() for c in components.split(",") if c.strip()),
            management_url=management_url or None,
            broker_policies=broker_policies,
            delivery_limit=delivery_limit,
        )
        if "web" in settings.components:
            # Checked before anything is connected: a bad port was said only after the
            # database and the broker (and never, when one of them did not answer).
            from .settings import WebSettings

            WebSettings.from_env(
                amqp_url=settings.amqp_url,
                database_url=settings.database_url,
                database_schema=settings.database_schema,
            )
        setup_logging(log_level)
        serve_metrics(metrics_port)
    except KNOWN_ERRORS as exc:
        raise _fail(str(exc)) from None
    try:
        run_until_signalled(lambda stop: serve_forever(settings, stop))
    except KNOWN_ERRORS as exc:
        raise _fail(str(exc), 1) from None


@app.command()
def monitor(
    amqp_url: AmqpUrl = "",
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
    webhook: Annotated[
        list[str] | None,
        typer.Option("--webhook", help="URL that receives every alert as a JSON POST; repeatable."),
    ] = None,
    lost_after_beats: Annotated[
        float | None,
        typer.Option(help="Heartbeat intervals of silence before an agent is lost (default 3)."),
    ] = None,
    start_timeout: Annotated[
        float | None,
        typer.Option(help="Seconds a run may stay STARTING, unless it says (default 180)."),
    ] = None,
    long_running: Annotated[
        float | None, typer.Option(help="Alert once when a run runs longer (default 3600 s).")
    ] = None,
    retry_backoff: Annotated[
        float | None, typer.Option(help="Seconds before a first retry; doubles (default 1).")
    ] = None,
    cancel_confirm: Annotated[
        float | None,
        typer.Option(
            help="Seconds after a cancel's grace before an unconfirmed stop ends the run "
            "CANCELED with CANCEL_TIMEOUT (default 30)."
        ),
    ] = None,
    metrics_port: Annotated[
        int, typer.Option(envvar="HD_METRICS_PORT", help="Serve /metrics here; 0: no metrics.")
    ] = 9465,
    log_level: Annotated[
        LogLevel, typer.Option(case_sensitive=False, help="What to log, from DEBUG up.")
    ] = LogLevel.INFO,
) -> None:
    """Run the failure monitor: lost agents, vanished runs, timeouts, retries and alerts.

    Several may run: one is active (a PostgreSQL advisory lock), the others stand by and take
    over when it stops.
    """
    from transport.process import run_until_signalled, setup_logging

    open_database()
    from .monitor import run_monitor
    from .settings import MonitorSettings

    try:
        settings = MonitorSettings.from_env(
            amqp_url=amqp_url or None,
            database_url=database_url or None,
            database_schema=database_schema,
            webhook_urls=tuple(webhook) if webhook else None,
            lost_after_beats=lost_after_beats,
            start_timeout_s=start_timeout,
            long_running_s=long_running,
            retry_backoff_s=retry_backoff,
            cancel_confirm_s=cancel_confirm,
            metrics_port=metrics_port,
        )
        setup_logging(log_level)
        serve_metrics(settings.metrics_port)
    except KNOWN_ERRORS as exc:
        raise _fail(str(exc)) from None
    try:
        run_until_signalled(lambda stop: run_monitor(settings, stop))
    except KNOWN_ERRORS as exc:
        raise _fail(str(exc), 1) from None


@db_app.command("upgrade")
def db_upgrade(database_url: DatabaseUrl = "", database_schema: DatabaseSchema = None) -> None:
    """Apply the database migrations not applied yet (serve also does this at start)."""
    from .store.migrations import MIGRATIONS, newer_words

    async def upgrade(store: Database) -> tuple[list[int], int]:
        return await store.upgrade(), await store.version()

    applied, version = with_store(database_url, database_schema, upgrade)
    if version > MIGRATIONS[-1][0]:
        typer.echo(f"warning: {newer_words(version)}: upgrade this release", err=True)
    else:
        typer.echo(f"applied migrations {applied}" if applied else "database is up to date")


@db_app.command("prune")
def db_prune(
    older_than_days: Annotated[
        float, typer.Option(help="Prune what runs finished more than this many days ago left.")
    ] = 30.0,
    batch: Annotated[int, typer.Option(help="Rows deleted per transaction.")] = 1000,
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Delete the history, output and progress of runs finished long ago, and old sent outbox
    rows, in short batches (the runs' own rows stay). `serve` does it on a schedule when
    HD_RETENTION_DAYS is set."""
    if not 0 <= older_than_days <= 36500 or not 1 <= batch <= 100_000:
        raise _fail("--older-than-days must be 0 to 36500 and --batch 1 to 100000")
    pruned = with_store(
        database_url,
        database_schema,
        lambda s: s.retention.prune(older_than_days * 86400, batch),
    )
    details = ", ".join(f"{table} {n}" for table, n in pruned.counts.items())
    typer.echo(f"pruned {pruned.total} row(s): {details}")


@app.command(context_settings={"allow_interspersed_args": False})
def submit(
    command: Annotated[
        list[str] | None, typer.Argument(help="Command and arguments, after `--`.")
    ] = None,
    image: Annotated[str, typer.Option(help="Image to run (must exist on the agent's host).")] = "",
    location: Annotated[
        str | None, typer.Option(help="Code location whose job to run (with --job).")
    ] = None,
    job: Annotated[str | None, typer.Option(help="Job of the location to run.")] = None,
    config: Annotated[
        str | None, typer.Option(help="The job's config, as JSON (checked by its schema).")
    ] = None,
    queue: Annotated[str, typer.Option(help="Agent queue to send the run to.")] = "default",
    env: Annotated[
        list[str] | None,
        typer.Option(
            "--env",
            "-e",
            help="KEY=VALUE or KEY=secret:NAME (resolved on the agent's host); repeatable. "
            "Not with --location: a job run takes its environment from its location.",
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Submissions with the same key make one run.")
    ] = None,
    tag: Annotated[
        list[str] | None,
        typer.Option(
            "--tag",
            "-t",
            help="KEY=VALUE stored with the run; tag limits (tag:KEY=VALUE) count it. Repeatable.",
        ),
    ] = None,
    priority: Annotated[
        int,
        typer.Option(
            help="Among runs a concurrency limit holds back, higher starts first "
            "(-1000..1000; FIFO within a priority). Runs under no limit start at once."
        ),
    ] = 0,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the run; exit with its exit code.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: give up after SECONDS.")] = 3600,
    max_runtime: Annotated[
        float | None, typer.Option(help="Stop and fail the run after SECONDS running.")
    ] = None,
    start_timeout: Annotated[
        float | None, typer.Option(help="Fail the run if not started after SECONDS.")
    ] = None,
    queue_timeout: Annotated[
        float | None,
        typer.Option(help="Fail the run (QUEUE_TIMEOUT) if no agent took it after SECONDS."),
    ] = None,
    max_retries: Annotated[
        int | None,
        typer.Option(
            help="Retries (0 to 100) after a lost agent or a vanished container; not given: 2."
        ),
    ] = None,
    memory_mb: Annotated[
        int | None, typer.Option(help="Memory limit of the container, in MB (MiB).")
    ] = None,
    cpus: Annotated[
        float | None,
        typer.Option(
            help="CPUs the container gets (fractions count: 0.5); an agent takes the run only "
            "while it has them free."
        ),
    ] = None,
    gpus: Annotated[
        int, typer.Option(help="GPUs the container gets; only agents declaring them take it.")
    ] = 0,
    ready_check: Annotated[
        str | None,
        typer.Option(help="Command run in the container; the run is STARTED once it succeeds."),
    ] = None,
    amqp_url: AmqpUrl = "",
) -> None:
    """Submit a run and print its id: an image and command
    (`dispatcher submit --image IMG -- CMD ARGS`), or a job of a code location
    (`dispatcher submit --location L --job J --config '{...}'`, checked before it is accepted).

    The submission is checked against the wire contract before it is sent (names, image
    reference, env keys, secret references, sizes; a job brings no --image, --env,
    --ready-check or command of its own); a refusal names the field and exits 2. With
    --wait, each attempt's outcome and retry is printed, and the exit code is the run's
    final one.
    """
    from transport.errors import BrokerUnavailable

    from .client import Client, Unreadable, wait_for_outcome
    from .errors import SubmissionRejected

    is_job = location is not None or job is not None
    if is_job and not (location and job):
        raise _fail("a job run needs both --location and --job")
    if not is_job and not image:
        raise _fail("--image is required (or --location and --job)")
    if config is not None and not is_job:
        raise _fail("--config goes with --location and --job: a run of an image takes none")
    if ready_check is not None and not ready_check.strip():
        raise _fail("--ready-check is empty: give the command that says the run is ready")
    if not amqp_url:
        raise _fail("no broker: pass --amqp-url or set HD_AMQP_URL")
    environment = parse_env(env, "KEY=VALUE or KEY=secret:NAME")
    tags = parse_env(tag, "KEY=VALUE", option="--tag")
    try:
        job_config = json.loads(config) if config is not None else {}
    except ValueError as exc:
        raise _fail(f"--config is not JSON: {exc}") from None
    except RecursionError:
        raise _fail("--config is nested too deep to read") from None
    if not isinstance(job_config, dict):
        raise _fail("--config must be a JSON object")
    if not timeout > 0:
        raise _fail(f"--timeout must be more than 0 seconds, got {timeout:g}")
    for option, number in (
        ("--cpus", cpus),
        ("--max-runtime", max_runtime),
        ("--start-timeout", start_timeout),
        ("--queue-timeout", queue_timeout),
    ):
        if number is not None and not math.isfinite(number):
            raise _fail(f"{option} must be a finite number, got {number:g}")
    try:
        checks = shlex.split(ready_check) if ready_check else []
    except ValueError as exc:
        raise _fail(f"--ready-check is not a command line: {exc}") from None

    async def go() -> int:
        from schemas import RunAccepted, RunRejected

        run_id = uuid.uuid4()
        fields: dict[str, Any] = dict(
            location=location,
            job=job,
            config=job_config,
            env=environment,
            queue=queue,
            idempotency_key=idempotency_key,
            tags=tags,
            priority=priority,
            run_id=run_id,
            max_runtime_s=max_runtime,
            queue_timeout_s=queue_timeout,
            start_timeout_s=start_timeout,
            max_retries=max_retries,
            memory_limit_mb=memory_mb,
            cpus=cpus,
            gpus=gpus,
            ready_check=checks,
        )
        # A mistake is said as such (exit 2) before any broker is reached.
        await Client(amqp_url).submit(image, command or [], **fields, check_only=True)
        async with Client(amqp_url) as client:
            follower = await client.follow({run_id})
            stage[:] = ["submitting", str(run_id)]
            await client.submit(image, command or [], **fields)
            stage[0] = "submitted"
            if is_job:
                # A job is checked against its location first: wait for the answer.
                async with contextlib.aclosing(follower.events(answers=True)) as answers:
                    async for event in answers:
                        if isinstance(event, RunRejected):
                            typer.echo(f"error: submission rejected: {event.reason}", err=True)
                            return 2
                        if isinstance(event, RunAccepted | Unreadable):  # ended: accepted
                            break
                    else:
                        raise BrokerUnavailable(
                            "the status stream ended before the control plane answered"
                        )
            typer.echo(str(run_id))
            if not wait:
                return 0
            heard = asyncio.Event()

            def on_event(event: object) -> None:
                heard.set()
                show_progress(event)

            async def nudge() -> None:
                """A line now and then while nothing is heard of the run (no agent yet)."""
                waited = 0.0
                while True:
                    await asyncio.sleep(QUIET_NOTE_S)
                    waited += QUIET_NOTE_S
                    if heard.is_set():
                        return
                    typer.echo(
                        f"run {run_id}: not launched after {waited:.0f} s; still waiting for "
                        "an agent of its queue, or for room under a concurrency limit "
                        "(`dispatcher runs show` says which)",
                        err=True,
                    )

            nudging = asyncio.create_task(nudge())
            try:
                outcome = await wait_for_outcome(follower, run_id, None, on_event)
            except SubmissionRejected as exc:
                # The id printed above names no run: say so.
                typer.echo(f"error: submission rejected, run {run_id} not created: {exc}", err=True)
                return 2
            finally:
                nudging.cancel()
            return report_outcome(outcome)

    # Without --wait, a job submission waits only for the control plane's answer.
    limit = timeout if wait else min(timeout, 60.0)
    #: How far the command got: a timeout says what it means at each stage.
    stage = ["connecting"]
    try:
        raise typer.Exit(asyncio.run(asyncio.wait_for(go(), limit)))
    except TimeoutError:
        if stage[0] == "connecting":
            raise broker_silent(amqp_url, limit) from None
        if stage[0] == "submitting":
            raise _fail(
                f"the broker did not confirm the submission of run {stage[1]} within "
                f"{limit:g} s: it may or may not have been taken (`dispatcher runs show` says)",
                1,
            ) from None
        if wait:
            raise _fail(
                f"the run did not end within {limit:g} s; it goes on (`dispatcher runs show`, "
                "`dispatcher runs cancel`)",
                124,
            ) from None
        raise _fail(f"no answer within {limit:g} s", 124) from None
    except InvalidSubmission as exc:
        raise _fail(str(exc), 2) from None
    except KNOWN_ERRORS as exc:
        raise _fail(str(exc), 1) from None


#: ``submit --wait``: how long without news of the run before a line says it still waits.
QUIET_NOTE_S = 15.0


def main() -> None:
    """Entry point of the ``dispatcher`` console script."""
    app()
