"""A connect that is cancelled (a timeout, Ctrl-C) closes its connection: its reconnect
task left running kept ``asyncio.run`` from ever returning, and a command with a timeout hung
on a broker that accepts connections and never answers."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

SCRIPT = """
import asyncio, logging, sys
from transport.connection import connect

logging.disable(logging.WARNING)


async def main() -> None:
    try:
        await asyncio.wait_for(connect(sys.argv[1], "t"), 0.5)
    except TimeoutError:
        print("timed out", flush=True)


asyncio.run(main())
print("returned", flush=True)
"""


def test_a_cancelled_connect_lets_the_program_end() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    accepted: list[socket.socket] = []

    def keep_accepting() -> None:
        while True:
            try:
                accepted.append(silent.accept()[0])  # and never a byte back
            except OSError:
                return

    threading.Thread(target=keep_accepting, daemon=True).start()
    url = f"amqp://u:p@127.0.0.1:{silent.getsockname()[1]}/"
    root = Path(__file__).resolve().parents[2]
    try:
        # A hang is the failure: the bound is generous, far from the 0.5 s it takes.
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, url],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=root,
        )
    finally:
        silent.close()
        for conn in accepted:
            conn.close()
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["timed", "out", "returned"]
