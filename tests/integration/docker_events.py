"""Docker's own account of containers' lives, from its event stream, followed live."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import docker

from worker_agent.containers import LABEL_ATTEMPT, LABEL_RUN


@dataclass(frozen=True)
class Life:
    """One container's time running, from Docker's start and die events (ns since the epoch)."""

    container_id: str
    run_id: str
    attempt: int
    started: int
    died: int | None  # None: still running when the recording stopped
    exit_code: int | None = None


class ContainerEvents:
    """Docker's container events with a label (``KEY=VALUE``, or a key alone), recorded on a
    thread of their own.

    The engine keeps only a short backlog of past events, too short for the hundreds that a
    burst of 60 produces, so the stream is followed live for the whole test.
    """

    def __init__(
        self,
        label: str,
        base_url: str | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """``base_url``: the engine (default: the environment's); ``on_event`` is called on
        the recording thread with each event as it comes."""
        self.label = label
        self.events: list[dict[str, Any]] = []
        self._on_event = on_event
        self._client = (
            docker.DockerClient(base_url=base_url, timeout=None)
            if base_url
            else docker.from_env(timeout=None)
        )
        self._stream: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> ContainerEvents:
        self._stream = self._client.api.events(
            since=int(time.time()) - 1,
            decode=True,
            filters={
                "type": "container",
                "label": self.label,
                "event": ["create", "start", "die", "destroy"],
            },
        )
        self._thread = threading.Thread(target=self._read, name="burst-events", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        # Closing the stream from the test's thread ends this loop with an error: expected.
        with contextlib.suppress(Exception):
            for event in self._stream:
                self.events.append(event)
                if self._on_event is not None:
                    self._on_event(event)

    def stop(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._client.close()

    def created(self) -> dict[str, tuple[str, int]]:
        """Container id -> (run id, attempt) of every container created."""
        return {
            event["id"]: (
                event["Actor"]["Attributes"][LABEL_RUN],
                int(event["Actor"]["Attributes"][LABEL_ATTEMPT]),
            )
            for event in list(self.events)
            if event["Action"] == "create"
        }

    def lives(self) -> list[Life]:
        """Every start-to-die interval of every container, in the order they started."""
        open_: dict[str, dict[str, Any]] = {}
        lives: list[Life] = []
        for event in sorted(list(self.events), key=lambda e: int(e["timeNano"])):
            action, container_id = event["Action"], event["id"]
            if action == "start":
                open_[container_id] = event
            elif action == "die" and container_id in open_:
                started = open_.pop(container_id)
                code = int(event["Actor"]["Attributes"].get("exitCode", -1))
                lives.append(_life(started, int(event["timeNano"]), code))
        lives.extend(_life(started, None, None) for started in open_.values())
        return sorted(lives, key=lambda life: life.started)

    def all_died(self) -> bool:
        """Every container that started has died (its die event has arrived)."""
        return all(life.died is not None for life in self.lives())


def _life(start: dict[str, Any], died: int | None, exit_code: int | None) -> Life:
    labels = start["Actor"]["Attributes"]
    return Life(
        start["id"],
        labels[LABEL_RUN],
        int(labels[LABEL_ATTEMPT]),
        int(start["timeNano"]),
        died,
        exit_code,
    )


def peak_running(lives: list[Life]) -> int:
    """The most containers running at once."""
    edges = sorted(
        [(life.started, 1) for life in lives]
        + [(life.died, -1) for life in lives if life.died is not None],
        key=lambda edge: (edge[0], edge[1]),
    )
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak
