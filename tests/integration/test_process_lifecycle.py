"""The long-lived processes end in order at every phase, and say a mistake in one line: a
stop during a start-up that waits on a broker that never answers, a database setting the
server refuses at connect."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        for peer in held:
            peer.close()


@pytest.mark.parametrize(
    "command",
    [("dispatcher", "serve"), ("dispatcher", "monitor"), ("worker_agent", "run")],
)
async def test_a_stop_while_the_broker_does_not_answer_ends_the_start_up_in_order(
    command: tuple[str, str], database_url: str, schema: str
) -> None:
    with silent_port() as port:
        process = subprocess.Popen(  # noqa: ASYNC220 - started, not waited on here
            [sys.executable, "-m", *command],
            env={
                "HD_AMQP_URL": f"amqp://u:p@127.0.0.1:{port}/",
                "HD_DATABASE_URL": database_url,
                "HD_DATABASE_SCHEMA": schema,
                "HD_AGENT_ID": "lifecycle",
                "HD_METRICS_PORT": "0",
                "PATH": "",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            await asyncio.sleep(3)  # connecting: a connect waits up to 30 s for an answer
            process.send_signal(signal.SIGTERM)
            output, _ = await asyncio.to_thread(process.communicate, timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    # Before, the stop was taken only once the connect timed out: exit 1, "TimeoutError()".
    assert process.returncode == 0, output
    assert "stopped" in output and "Traceback" not in output


async def test_a_database_setting_the_server_refuses_is_said_in_one_line(
    database_url: str,
) -> None:
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "dispatcher", "serve"],
        env={
            "HD_AMQP_URL": "amqp://u:p@127.0.0.1:1/",
            "HD_DATABASE_URL": f"{database_url}?no_such_setting=1",
            "HD_METRICS_PORT": "0",
            "PATH": "",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "PostgreSQL refused the connection" in result.stderr
    assert 'unrecognized configuration parameter "no_such_setting"' in result.stderr
    assert "Traceback" not in result.stderr
