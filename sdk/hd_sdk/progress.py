"""The context a job runs with: steps, log lines and metadata, written as frames."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from .frames import encode_frame


class Context:
    """Handed to a job; what it reports reaches the control plane through the agent."""

    def __init__(self, job: str, run_id: str = "", stream: TextIO | None = None) -> None:
        self.job = job
        self.run_id = run_id
        self._stream = stream or sys.stdout

    def _emit(self, event: str, **fields: Any) -> None:
        self._stream.write(encode_frame(event, **fields) + "\n")
        self._stream.flush()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """A step of the job: started, then finished with its status and duration."""
        started = time.monotonic()
        self._emit("step_started", step=name)
        status = "failed"
        try:
            yield
            status = "succeeded"
        finally:
            self._emit(
                "step_finished",
                step=name,
                status=status,
                duration_s=round(time.monotonic() - started, 3),
            )

    def log(self, message: str, level: str = "info") -> None:
        self._emit("log", level=level, message=message)

    def metadata(self, **values: Any) -> None:
        self._emit("metadata", values=values)
