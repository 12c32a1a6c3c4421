"""The multi-host rig: agent hosts with Docker engines of their own (compose/hosts.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from compose.hosts import Host
from tests.conftest import labels_for_tests


def test_each_host_has_an_engine_of_its_own(
    engine_hosts: list[Host], run_image: str, unique: str
) -> None:
    first, second = engine_hosts
    name = f"hosts-{unique}"
    container = first.client.containers.run(
        run_image, ["sleep", "60"], name=name, detach=True, labels=labels_for_tests()
    )
    try:
        assert [c.name for c in first.client.containers.list(filters={"name": name})] == [name]
        assert second.client.containers.list(all=True, filters={"name": name}) == []
    finally:
        container.remove(force=True)


def test_every_host_holds_the_run_image_and_runs_it(
    engine_hosts: list[Host], run_image: str
) -> None:
    for host in engine_hosts:
        assert run_image in host.client.images.get(run_image).tags
        # No network given, as the agent launches runs: the engine has no bridge, so the
        # container gets a network namespace with loopback only.
        output = host.client.containers.run(
            run_image,
            ["cat", "/proc/net/dev"],
            labels=labels_for_tests(),
            remove=True,
        )
        interfaces = [line.split(":")[0].strip() for line in output.decode().splitlines()[2:]]
        assert interfaces == ["lo"]


def test_a_stopped_dockerd_freezes_its_engine_alone(engine_hosts: list[Host]) -> None:
    frozen, other = engine_hosts
    os.kill(frozen.dockerd_pid, signal.SIGSTOP)
    try:
        # The stop reaches every thread of the process soon, not at once.
        deadline = time.monotonic() + 10
        while _state(frozen.dockerd_pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _state(frozen.dockerd_pid) == "T"
        assert not frozen.answers(timeout=1)
        assert other.answers()
    finally:
        os.kill(frozen.dockerd_pid, signal.SIGCONT)
    assert frozen.answers(timeout=30)


def _state(pid: int) -> str:
    """The state letter of a process (``T``: stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0]
