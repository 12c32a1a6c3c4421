"""``dispatcher runs``: list runs and show one (reads PostgreSQL), wait for one, cancel one."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .cli_common import (
    KNOWN_ERRORS,
    AmqpUrl,
    DatabaseSchema,
    DatabaseUrl,
    _fail,
    broker_silent,
    report_outcome,
    show_progress,
    with_store,
)
from .errors import InvalidSubmission, SubmissionRejected
from .states import TERMINAL, RunState

if TYPE_CHECKING:
    from .client import RunOutcome
    from .store import Database, RunEventRow, RunRow

runs_app = typer.Typer(
    help="Inspect runs (reads PostgreSQL), wait for one to end, and cancel them.",
    no_args_is_help=True,
)


@runs_app.command("list")
def runs_list(
    state: Annotated[
        str | None, typer.Option(help="Only runs in this state (QUEUED, STARTED, FAILURE, ...).")
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=100_000, help="At most this many, newest first.")
    ] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """List runs, newest first."""
    try:
        wanted = RunState(state.upper()) if state else None
    except ValueError:
        raise _fail(
            f"unknown state {state!r}; one of {', '.join(s.value for s in RunState)}"
        ) from None

    rows = with_store(database_url, database_schema, lambda s: s.runs.recent(wanted, limit))
    runs: list[dict[str, object]] = [
        {
            "run_id": str(r.run_id),
            "state": r.state.value,
            "attempt": r.attempt,
            "image": r.image,
            "queue": r.queue,
            "exit_code": r.exit_code,
            "failure_reason": r.failure_reason,
            "agent_id": r.agent_id,
            "created_at": r.created_at.isoformat(),
            "priority": r.priority,
            "waiting_on": r.waiting_on,
        }
        for r in rows
    ]
    if as_json:
        typer.echo(json.dumps(runs, indent=2))
        return
    typer.echo(f"{'RUN':36}  {'STATE':9}  {'EXIT':>4}  {'CREATED':19}  IMAGE")
    for run in runs:
        exit_code = "" if run["exit_code"] is None else str(run["exit_code"])
        created = str(run["created_at"])[:19].replace("T", " ")
        waiting = f"  (waiting for {run['waiting_on']})" if run["waiting_on"] else ""
        typer.echo(
            f"{run['run_id']:36}  {run['state']:9}  {exit_code:>4}  {created}  {run['image']}"
            f"{waiting}"
        )


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="Run id (or a unique prefix of it).")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    logs: Annotated[
        bool, typer.Option("--logs", help="Print every forwarded output line of every attempt.")
    ] = False,
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Show one run: its state history, exit code and output tail."""

    async def read(
        store: Database,
    ) -> tuple[
        RunRow, list[RunEventRow], list[tuple[int, int, str]], list[dict[str, Any]], str | None
    ]:
        run = await store.runs.find(run_id)
        lines = await store.output.lines(run.run_id) if logs else []
        progress = await store.output.progress(run.run_id)
        waiting = await store.limits.waiting_reason(run.run_id) if run.waiting_on else None
        return run, await store.runs.events(run.run_id), lines, progress, waiting

    run, events, lines, progress, waiting = with_store(database_url, database_schema, read)
    waiting = waiting or run.waiting_on
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "run_id": str(run.run_id),
                    "state": run.state.value,
                    "attempt": run.attempt,
                    "image": run.image,
                    "command": run.command,
                    "queue": run.queue,
                    "exit_code": run.exit_code,
                    "failure_reason": run.failure_reason,
                    "failure_message": run.failure_message,
                    "agent_id": run.agent_id,
                    "container_id": run.container_id,
                    "priority": run.priority,
                    "cpus": run.cpus,
                    "memory_limit_mb": run.memory_limit_mb,
                    "gpus": run.gpus,
                    "submitted_by": run.submitted_by,
                    "waiting": waiting,
                    "output_tail": run.output_tail,
                    "progress": progress,
                    "events": [
                        {
                            "kind": e.kind,
                            "attempt": e.attempt,
                            "from": e.from_state,
                            "to": e.to_state,
                            "at": e.recorded_at.isoformat(),
                        }
                        for e in events
                    ],
                },
                indent=2,
            )
        )
        return
    typer.echo(f"run       {run.run_id}")
    typer.echo(f"state     {run.state.value} (attempt {run.attempt})")
    typer.echo(f"image     {run.image}  command {json.dumps(run.command)}")
    typer.echo(f"queue     {run.queue}  agent {run.agent_id or '-'}  priority {run.priority}")
    asks = [
        f"{run.cpus:g} CPUs" if run.cpus is not None else "",
        f"{run.memory_limit_mb} MB" if run.memory_limit_mb is not None else "",
        f"{run.gpus} GPUs" if run.gpus else "",
    ]
    if any(asks):
        typer.echo(f"asks for  {', '.join(a for a in asks if a)}")
    if waiting:
        typer.echo(f"waiting   for {waiting}: sent to its queue once there is room")
    if run.exit_code is not None:
        typer.echo(f"exit code {run.exit_code}")
    if run.failure_reason:
        typer.echo(f"failure   {run.failure_reason}: {run.failure_message or ''}")
    typer.echo("history")
    for e in events:
        change = f"{e.from_state or '-'} -> {e.to_state}" if e.to_state else "(no change)"
        typer.echo(f"  {e.recorded_at.isoformat(timespec='milliseconds')}  {e.kind:13} {change}")
    if progress:
        typer.echo("progress")
        for item in progress:
            typer.echo(f"  {_describe_progress(item)}")
    if logs:
        typer.echo(f"output ({len(lines)} forwarded lines)")
        for attempt, number, line in lines:
            typer.echo(f"  {attempt}:{number:<5} | {line}")
    elif run.output_tail:
        typer.echo("output (last lines; --logs for all)")
        for line in run.output_tail:
            typer.echo(f"  | {line}")


def _describe_progress(item: dict[str, Any]) -> str:
    event = item["event"]
    if event == "step_started":
        return f"step {item['step']} started"
    if event == "step_finished":
        took = f" in {item['duration_s']:.3f} s" if item["duration_s"] is not None else ""
        return f"step {item['step']} {item['status'] or 'finished'}{took}"
    if event == "log":
        return f"[{item['level'] or 'info'}] {item['message']}"
    return "metadata " + ", ".join(f"{k}={v}" for k, v in sorted(item["details"].items()))


@runs_app.command("wait")
def runs_wait(
    run_id: Annotated[str, typer.Argument(help="Run id (or, with the database, a unique prefix).")],
    timeout: Annotated[
        float, typer.Option(help="Give up waiting after this long (seconds): exit 124.")
    ] = 3600.0,
    amqp_url: AmqpUrl = "",
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Wait for a run submitted before to end, printing each attempt's outcome and retry, and
    exit as `submit --wait` does: 0 or the run's exit code, 130 when it was canceled, 124 when
    --timeout passed first, 2 when its submission was refused (or a usage mistake), 1 for a
    broker or database error (a broker away for 90 s too). A run's own exit code may be any
    of these: read the printed verdict. A run that has ended already is reported at once.
    Follows the run through the broker; the database, when given, finds a run by a prefix of
    its id and says when no run has it. Without it, an unknown id is waited for until
    --timeout, as is a run beyond the limits of a submitter token (it hears no answer)."""

    if not timeout > 0:  # NaN too
        raise _fail(f"--timeout must be more than 0 seconds, got {timeout:g}")
    if not amqp_url:
        raise _fail("no broker: pass --amqp-url or set HD_AMQP_URL")
    target, found = _target(run_id, database_url, database_schema)
    if found is not None and RunState(found.state) in TERMINAL:
        raise typer.Exit(report_outcome(_outcome_of(found)))

    connected = False

    async def go() -> int:
        from .client import Client

        nonlocal connected
        # --timeout bounds the whole command, the connect included.
        async with asyncio.timeout(timeout), Client(amqp_url) as client:
            connected = True
            return report_outcome(await client.wait(target, None, show_progress))

    try:
        code = asyncio.run(go())
    except SubmissionRejected as exc:
        raise _fail(f"submission rejected, run {target} not created: {exc}", 2) from None
    except TimeoutError:
        if not connected:
            raise broker_silent(amqp_url, timeout) from None
        raise _fail(
            f"no end of run {target} was heard within {timeout:g} s: it may still be going, "
            "or be unknown or beyond this identity's limits (`dispatcher runs show` says)",
            124,
        ) from None
    except KNOWN_ERRORS as exc:
        raise _fail(str(exc), 1) from None
    raise typer.Exit(code)


def _target(
    run_id: str, database_url: str, database_schema: str | None
) -> tuple[uuid.UUID, RunRow | None]:
    """The run ``run_id`` names: with the database, found there (a prefix does) with its row;
    without it, the id as given (a whole one)."""
    if database_url:
        run = with_store(database_url, database_schema, lambda s: s.runs.find(run_id))
        return run.run_id, run
    try:
        return uuid.UUID(run_id), None
    except ValueError:
        raise _fail(f"{run_id!r} is not a run id (a prefix needs the database)") from None


def _outcome_of(run: RunRow) -> RunOutcome:
    """How an ended run ended, as the database has it."""
    from .client import RunOutcome

    return RunOutcome(
        run.run_id,
        run.state == RunState.SUCCESS,
        run.exit_code,
        run.failure_reason,
        tuple(run.output_tail),
        run.failure_message or "",
        run.attempt,
        run.state.value,
    )


@runs_app.command("cancel")
def runs_cancel(
    run_id: Annotated[str, typer.Argument(help="Run id (or, with the database, a unique prefix).")],
    grace: Annotated[
        float, typer.Option(help="Seconds a running run gets between SIGTERM and SIGKILL.")
    ] = 30.0,
    reason: Annotated[str, typer.Option(help="Why; recorded with the run.")] = "",
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the run's end; exit 0 when it was canceled.")
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            help="Give up after this long (seconds): on a broker that does not answer (exit "
            "1), and with --wait on a run that does not end (exit 124)."
        ),
    ] = 300.0,
    amqp_url: AmqpUrl = "",
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Cancel a run: a queued run never starts; a running one gets SIGTERM, then SIGKILL after
    --grace, and ends CANCELED. Canceling it again changes nothing; a run that has ended stays
    as it ended (exit 1 unless it was canceled)."""

    if not 0 <= grace <= 3600:
        raise _fail("--grace must be 0 to 3600 seconds")
    if not timeout > 0:  # NaN too
        raise _fail(f"--timeout must be more than 0 seconds, got {timeout:g}")
    if not amqp_url:
        raise _fail("no broker: pass --amqp-url or set HD_AMQP_URL")
    target, run = _target(run_id, database_url, database_schema)
    if run is not None and RunState(run.state) in TERMINAL:
        typer.echo(f"run {target} has ended already: {run.state}")
        raise typer.Exit(0 if run.state == RunState.CANCELED else 1)
    code = _request_cancel(amqp_url, target, grace, reason, wait, timeout)
    raise typer.Exit(code)


def _request_cancel(
    amqp_url: str, run_id: Any, grace: float, reason: str, wait: bool, timeout: float
) -> int:
    from .client import Client, wait_for_outcome

    stage = "connecting"

    async def go() -> int:
        nonlocal stage
        # --timeout bounds the whole command, the connect and the request included.
        async with asyncio.timeout(timeout), Client(amqp_url) as client:
            follower = await client.follow({run_id}) if wait else None
            stage = "requesting"
            await client.cancel(run_id, grace_s=grace, reason=reason)
            stage = "requested"
            typer.echo(f"run {run_id}: cancel requested")
            if follower is None:
                return 0
            outcome = await wait_for_outcome(follower, run_id, None)
            typer.echo(f"run {run_id}: {outcome.state}")
            return 0 if outcome.canceled else 1

    try:
        return asyncio.run(go())
    except TimeoutError:
        if stage == "connecting":
            raise broker_silent(amqp_url, timeout) from None
        if stage == "requesting":
            raise _fail(
                f"the broker did not confirm the cancel of run {run_id} within {timeout:g} s: "
                "it may or may not have been sent",
                1,
            ) from None
        raise _fail(f"the run did not end within {timeout:g} s", 124) from None
    except InvalidSubmission as exc:
        raise _fail(str(exc), 2) from None
    except KNOWN_ERRORS as exc:
        raise _fail(str(exc), 1) from None
