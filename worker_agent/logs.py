"""Log forwarding: a run's output lines, batched into RunLog events, with size caps.

Lines that are progress frames (written by the SDK) become RunProgress events instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from schemas import ProgressItem, RunLog, RunProgress

from .errors import DockerUnavailable
from .progress import parse_progress
from .runtime import DockerRuntime

log = logging.getLogger(__name__)

TRUNCATED_MARK = " [line truncated]"


@dataclass
class LineBatcher:
    """Turns chunks of output into numbered, capped lines (no I/O: easy to test).

    A line longer than ``max_line_chars`` is cut and marked; past ``max_lines`` lines the run's
    output is no longer forwarded and ``truncated`` is set.
    """

    max_line_chars: int = 4096
    max_lines: int = 10_000
    next_line: int = 0
    truncated: bool = False
    #: Progress frames are numbered apart from output lines (both restart the same way when
    #: an adopted container's output is read again from its start).
    next_item: int = 0
    _partial: str = ""
    _pending: list[str] = field(default_factory=list)
    _pending_first: int = 0
    _progress: list[ProgressItem] = field(default_factory=list)

    def feed(self, chunk: str) -> None:
        text = self._partial + chunk
        *complete, self._partial = text.split("\n")
        for line in complete:
            self._add(line)

    def finish(self) -> None:
        """The stream ended: a last line without a newline still counts."""
        if self._partial:
            self._add(self._partial)
            self._partial = ""

    def _add(self, line: str) -> None:
        item = parse_progress(line.rstrip("\r"), self.next_item)
        if item is not None:
            self._progress.append(item)
            self.next_item += 1
            return
        if self.next_line >= self.max_lines:
            self.truncated = True
            return
        if len(line) > self.max_line_chars:
            line = line[: self.max_line_chars] + TRUNCATED_MARK
        if not self._pending:
            self._pending_first = self.next_line
        self._pending.append(line.rstrip("\r"))
        self.next_line += 1

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._progress)

    def take_progress(self) -> tuple[ProgressItem, ...]:
        items, self._progress = tuple(self._progress), []
        return items

    def take(self) -> tuple[int, tuple[str, ...]]:
        """(number of the first line, lines) waiting to be sent; empties the batch."""
        if not self._pending:
            return self.next_line, ()
        lines, self._pending = tuple(self._pending), []
        return self._pending_first, lines


class LogForwarder:
    """Follows one container's output and publishes it in batches until the container ends."""

    def __init__(
        self,
        runtime: DockerRuntime,
        publish: Callable[[RunLog | RunProgress], Awaitable[None]],
        run_id: object,
        attempt: int,
        agent_id: str,
        container_id: str,
        batch_interval_s: float = 0.5,
        batch_lines: int = 500,
        max_line_chars: int = 4096,
        max_lines: int = 10_000,
        forward_lines: bool = True,
    ) -> None:
        self._forward_lines = forward_lines
        self._runtime = runtime
        self._publish = publish
        self._run_id = run_id
        self._attempt = attempt
        self._agent_id = agent_id
        self._container_id = container_id
        self._interval = batch_interval_s
        self._batch_lines = batch_lines
        self.batcher = LineBatcher(max_line_chars=max_line_chars, max_lines=max_lines)
        self._chunks: asyncio.Queue[str | None] = asyncio.Queue()
        self._stream: object | None = None

    async def run(self) -> None:
        """Forward until the container's output ends (it exited, or was removed)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.create_task(asyncio.to_thread(self._read, loop))
        ended = False
        try:
            while not ended:
                try:
                    chunk = await asyncio.wait_for(self._chunks.get(), self._interval)
                except TimeoutError:
                    chunk = ""
                if chunk is None:
                    ended = True
                    self.batcher.finish()
                elif chunk:
                    self.batcher.feed(chunk)
                if self.batcher.pending and (
                    ended or not chunk or self.batcher.pending >= self._batch_lines
                ):
                    await self._send()
            if self.batcher.truncated:
                await self._send(force=True)
        finally:
            self.close()
            with contextlib.suppress(Exception):
                await reader

    async def _send(self, force: bool = False) -> None:
        items = self.batcher.take_progress()
        if not self._forward_lines:
            # Only states and metadata leave the host: no output line, no log record.
            items = tuple(item for item in items if item.event != "log")
        if items:
            await self._publish(
                RunProgress(
                    run_id=self._run_id,  # type: ignore[arg-type]
                    attempt=self._attempt,
                    agent_id=self._agent_id,
                    items=items,
                )
            )
        first, lines = self.batcher.take()
        if not self._forward_lines or (not lines and not force):
            return
        await self._publish(
            RunLog(
                run_id=self._run_id,  # type: ignore[arg-type]
                attempt=self._attempt,
                agent_id=self._agent_id,
                first_line=first,
                lines=lines,
                truncated=self.batcher.truncated,
            )
        )

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            stream = self._runtime.open_log_stream(self._container_id)
            self._stream = stream
            for raw in stream:
                loop.call_soon_threadsafe(
                    self._chunks.put_nowait, raw.decode("utf-8", errors="replace")
                )
        except DockerUnavailable as exc:
            log.warning("output of container %s not followed: %s", self._container_id[:12], exc)
        finally:
            loop.call_soon_threadsafe(self._chunks.put_nowait, None)

    def close(self) -> None:
        stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()  # type: ignore[attr-defined]
