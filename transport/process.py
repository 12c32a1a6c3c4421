"""Running a long-lived process: logging, and SIGTERM / SIGINT turned into a stop event."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import faulthandler
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar


class LogLevel(enum.StrEnum):
    """What a process logs: its ``--log-level`` (one of these, any case; nothing else)."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


#: How a yes/no setting may be written; anything else is refused, not read as the default
#: (HD_LOG_FORWARDING=off must not leave output forwarded).
_YES, _NO = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def yes_or_no(env: Mapping[str, str], name: str) -> bool | None:
    """A yes/no variable of ``env``; None when it is not set; ValueError, in words, for a
    value that is neither."""
    raw = env.get(name, "").strip().lower()
    if not raw:
        return None
    if raw in _YES or raw in _NO:
        return raw in _YES
    raise ValueError(f"{name}={raw!r} is neither yes nor no: give one of {', '.join(_YES + _NO)}")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, LogLevel(level.upper())),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aio-pika and aiormq are chatty at INFO about reconnects we already log ourselves.
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(logging.WARNING)


class StoppedStarting(Exception):
    """Asked to stop before the process had started (``unless_stopped``): an orderly end."""


T = TypeVar("T")


async def unless_stopped(stop: asyncio.Event, step: Awaitable[T]) -> T:
    """``step``'s result, unless ``stop`` is set first: then ``step`` is cancelled and
    StoppedStarting raised, which ``run_until_signalled`` takes for an orderly stop. For the
    steps of a start-up (a connect to a broker that does not answer waits 30 s): a SIGTERM
    then was taken only once the step timed out, and the process exited 1."""
    if stop.is_set():
        if asyncio.iscoroutine(step):
            step.close()
        raise StoppedStarting
    doing = asyncio.ensure_future(step)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([doing, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if doing.done():
        return doing.result()
    doing.cancel()
    with contextlib.suppress(BaseException):
        await doing
    raise StoppedStarting


async def bounded(step: Awaitable[object], seconds: float, what: str) -> None:
    """Await a step of a shutdown for at most ``seconds``: a robust connection's operations
    wait for a reconnection that may never come (a broker gone for good), and must not hold
    the process's end."""
    try:
        await asyncio.wait_for(step, max(seconds, 0.1))
    except TimeoutError:
        logging.getLogger(__name__).warning("shutdown: %s did not finish in time; going on", what)


def run_until_signalled(
    main: Callable[[asyncio.Event], Awaitable[None]],
    drain: Callable[[], None] | None = None,
    drain_on: tuple[int, ...] = (),
    exit_within: float = 60.0,
) -> None:
    """Run ``main(stop)``; the first SIGTERM or SIGINT sets ``stop``, a second one exits.

    With ``drain``: the first of the ``drain_on`` signals calls it instead (a graceful drain,
    which ends by itself); a later SIGTERM or SIGINT stops as above.

    A process that has not ended ``exit_within`` seconds after it was asked to stop (or after
    ``main`` returned) writes every thread's stack to stderr and exits 1: a shutdown that
    hangs fails loudly, and says where, instead of hanging until it is killed."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        drained = False

        def on_signal(signum: int) -> None:
            nonlocal drained
            name = signal.Signals(signum).name
            if drain is not None and signum in drain_on and not drained and not stop.is_set():
                drained = True
                logging.getLogger(__name__).info("%s: draining", name)
                drain()
                return
            if stop.is_set():
                logging.getLogger(__name__).warning("second signal: exiting now")
                sys.exit(1)
            logging.getLogger(__name__).info("%s: shutting down", name)
            faulthandler.dump_traceback_later(exit_within, exit=True)
            stop.set()

        for signum in {signal.SIGTERM, signal.SIGINT, *drain_on}:
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            await main(stop)
        except StoppedStarting:
            logging.getLogger(__name__).info("stopped before it had started")
        finally:
            # What is left (the loop cancelling its tasks, joining its threads) is bounded too.
            faulthandler.dump_traceback_later(exit_within, exit=True)

    try:
        asyncio.run(runner())
    finally:
        faulthandler.cancel_dump_traceback_later()


def version_option(command: str) -> Any:
    """A ``--version`` option for a typer callback that prints ``COMMAND VERSION`` and exits."""
    from importlib.metadata import version

    import typer

    def show(value: bool) -> None:
        if value:
            typer.echo(f"{command} {version('hybrid-dispatcher')}")
            raise typer.Exit()

    return typer.Option("--version", callback=show, is_eager=True, help="Print the version.")
