"""``dispatcher runs``: list runs and show one (reads PostgreSQL)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .cli_common import DatabaseSchema, DatabaseUrl, _fail, with_store
from .states import RunState

if TYPE_CHECKING:
    from .store import Database, RunEventRow, RunRow

runs_app = typer.Typer(help="Inspect runs (reads PostgreSQL).", no_args_is_help=True)


@runs_app.command("list")
def runs_list(
    state: Annotated[
        str | None, typer.Option(help="Only runs in this state (QUEUED, STARTED, FAILURE, ...).")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
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
        typer.echo(
            f"{run['run_id']:36}  {run['state']:9}  {exit_code:>4}  {created}  {run['image']}"
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
    ) -> tuple[RunRow, list[RunEventRow], list[tuple[int, int, str]], list[dict[str, Any]]]:
        run = await store.runs.find(run_id)
        lines = await store.output.lines(run.run_id) if logs else []
        progress = await store.output.progress(run.run_id)
        return run, await store.runs.events(run.run_id), lines, progress

    run, events, lines, progress = with_store(database_url, database_schema, read)
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
    typer.echo(f"queue     {run.queue}  agent {run.agent_id or '-'}")
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
