"""Running a long-lived process: logging, and SIGTERM / SIGINT turned into a stop event."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aio-pika and aiormq are chatty at INFO about reconnects we already log ourselves.
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)``; the first SIGTERM or SIGINT sets ``stop``, a second one exits."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                logging.getLogger(__name__).warning("second signal: exiting now")
                sys.exit(1)
            logging.getLogger(__name__).info("%s: shutting down", signal.Signals(signum).name)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        await main(stop)

    asyncio.run(runner())


def version_option(command: str) -> Any:
    """A ``--version`` option for a typer callback that prints ``COMMAND VERSION`` and exits."""
    from importlib.metadata import version

    import typer

    def show(value: bool) -> None:
        if value:
            typer.echo(f"{command} {version('hybrid-dispatcher')}")
            raise typer.Exit()

    return typer.Option("--version", callback=show, is_eager=True, help="Print the version.")
