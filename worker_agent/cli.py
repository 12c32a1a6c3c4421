"""The ``worker-agent`` command: the long-lived agent on a user's host."""

from __future__ import annotations

import asyncio
from importlib.metadata import version as _dist_version
from typing import Annotated

import typer

app = typer.Typer(
    name="worker-agent",
    help=(
        "Agent of the hybrid work dispatcher. It runs on your host, connects out to the broker "
        "only, takes launch instructions from its queues and starts containers through the "
        "local Docker engine. Your code, data and secrets stay on this host."
    ),
    no_args_is_help=True,
    add_completion=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"worker-agent {_dist_version('hybrid-dispatcher')}")
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
    """Hybrid work dispatcher: agent."""


@app.command()
def check(
    amqp_url: Annotated[
        str | None,
        typer.Option(envvar="HD_AMQP_URL", help="Broker to try as well (amqp://user:pass@host/)."),
    ] = None,
) -> None:
    """Check that this host can run an agent: Docker answers (and the broker, if given)."""
    from .checks import check_broker, check_docker

    ok = True
    for name, result in [("docker", check_docker())] + (
        [("broker", asyncio.run(check_broker(amqp_url)))] if amqp_url else []
    ):
        typer.echo(f"{name:8} {'ok  ' if result.ok else 'FAIL'} {result.detail}")
        ok = ok and result.ok
    if not ok:
        raise typer.Exit(1)


def main() -> None:
    """Entry point of the ``worker-agent`` console script."""
    app()
