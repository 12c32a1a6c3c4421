"""A long-lived process's signals: SIGTERM stops it, and a stop that hangs fails loudly."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.unit

_PROGRAM = textwrap.dedent(
    """
    import asyncio, sys, time
    from transport.process import run_until_signalled

    async def main(stop):
        print("serving", flush=True)
        await stop.wait()
        if sys.argv[1] == "hang":
            time.sleep(600)  # a shutdown step that never ends, holding the loop

    # A clean stop gets time to spare on a loaded machine; a hanging one, a second.
    run_until_signalled(main, exit_within=1.0 if sys.argv[1] == "hang" else 30.0)
    print("ended", flush=True)
    """
)


def _stopped(mode: str) -> tuple[int, str, str]:
    process = subprocess.Popen(
        [sys.executable, "-c", _PROGRAM, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "serving\n"
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    return process.returncode, out, err


def test_sigterm_stops_the_process_cleanly() -> None:
    code, out, err = _stopped("clean")
    assert (code, out) == (0, "ended\n")
    assert "Timeout" not in err


def test_a_shutdown_that_hangs_exits_1_with_every_thread_s_stack() -> None:
    code, out, err = _stopped("hang")
    assert code == 1
    assert out == ""
    assert "Timeout (0:00:01)!" in err
    assert "in main" in err  # the hanging step is named
