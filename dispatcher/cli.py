"""The ``dispatcher`` command: control plane, failure monitor, submission and inspection."""

from __future__ import annotations

from importlib.metadata import version as _dist_version
from pathlib import Path
from typing import Annotated

import typer

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


def package_version() -> str:
    """The installed distribution's version."""
    return _dist_version("hybrid-dispatcher")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"dispatcher {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Hybrid work dispatcher: control plane."""


@schemas_app.command("export")
def schemas_export(
    directory: Annotated[
        Path, typer.Argument(help="Directory to write into; created when missing.")
    ],
) -> None:
    """Write one JSON Schema file per message kind (and one per union) into DIRECTORY."""
    from schemas.export import export

    if directory.exists() and not directory.is_dir():
        typer.echo(f"error: {directory} exists and is not a directory", err=True)
        raise typer.Exit(2)
    written = export(directory)
    for path in written:
        typer.echo(str(path))
    typer.echo(f"{len(written)} schema files written to {directory}", err=True)


def main() -> None:
    """Entry point of the ``dispatcher`` console script."""
    app()
