"""Log forwarding: a run's output lines, batched into RunLog events, within the contract's limits.

Lines that are progress frames (written by the SDK) become RunProgress events instead.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from schemas import ProgressItem, RunLog, RunProgress
from schemas.bounds import INT32_MAX
from transport.errors import BrokerRefused, BrokerUnavailable

from . import limits
from .errors import DockerUnavailable
from .limits import TRUNCATED_MARK
from .ports import ContainerRuntime
from .progress import FRAME_PREFIX, Dropped, parse_progress
from .streams import Stream, read_on_thread

log = logging.getLogger(__name__)

__all__ = ["TRUNCATED_MARK", "LineBatcher", "LogForwarder"]

_MAX_PARTIAL = 256 * 1024


@dataclass
class LineBatcher:
    """Turns chunks of output into numbered, capped lines (no I/O: easy to test).

    A line longer than ``max_line_chars`` (or than the contract allows) is cut and marked; NUL
    becomes U+FFFD; past ``max_lines`` lines (or the contract's numbering) the run's output is
    no longer forwarded and ``truncated`` is set. ``take`` hands out lines in batches that fit
    in one RunLog. Whatever a line holds, ``feed`` takes it: a progress frame that cannot be
    read is dropped with a warning (never output: see ``_add_frame``), and past
    ``max_items`` frames they are no longer forwarded either.
    """

    max_line_chars: int = 4096
    max_lines: int = 10_000
    #: Progress frames forwarded at most, as lines are: past them, ``progress_truncated``.
    max_items: int = 10_000
    progress_truncated: bool = False
    next_line: int = 0
    truncated: bool = False
    #: Progress frames are numbered apart from output lines (both restart the same way when
    #: an adopted container's output is read again from its start).
    next_item: int = 0
    _partial: str = ""
    _pending: list[str] = field(default_factory=list)
    _pending_first: int = 0
    _progress: list[ProgressItem] = field(default_factory=list)
    #: Applied to every line first (the run's secret values become ``***``).
    redact: Callable[[str], str] | None = None
    #: How many of the last output lines (not frames) to keep for ``tail``, whether or not
    #: they were forwarded.
    tail_lines: int = 0
    _recent: deque[str] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self._recent = deque(maxlen=max(0, self.tail_lines))

    def feed(self, chunk: str) -> None:
        text = self._partial + chunk
        *complete, self._partial = text.split("\n")
        for line in complete:
            self._add(line)
        if len(self._partial) > _MAX_PARTIAL:
            # A line that never ends must not grow without bound; it is cut when sent anyway
            # (the margin keeps a long progress frame whole).
            self._partial = self._partial[:_MAX_PARTIAL]

    def finish(self) -> None:
        """The stream ended: a last line without a newline still counts."""
        if self._partial:
            self._add(self._partial)
            self._partial = ""

    def _add(self, line: str) -> None:
        line = line.rstrip("\r")
        if self.redact is not None:
            line = self.redact(line)
        head, prefix, rest = line.partition(FRAME_PREFIX)
        if prefix:
            # A frame after output with no line break before it (a progress bar's carriage
            # returns, print(..., end="")): that output is a line of its own, and the frame
            # is read as a frame, not forwarded as output with its secrets' JSON escapes.
            if head:
                self._add_output(head)
            self._add_frame(prefix + rest)
            return
        self._add_output(line)

    def _add_output(self, line: str) -> None:
        if self._recent.maxlen:
            # As the engine's own read of the output splits it (a carriage return ends a
            # line there too), each line cut as a tail line is.
            self._recent.extend(limits.line(part) for part in line.splitlines() or [""])
        if self.next_line >= min(self.max_lines, INT32_MAX):
            self.truncated = True
            return
        if not self._pending:
            self._pending_first = self.next_line
        self._pending.append(limits.line(line, self.max_line_chars))
        self.next_line += 1

    def _add_frame(self, line: str) -> None:
        """A progress frame, as an item; one that cannot be read is dropped with a warning,
        never forwarded as output: the line's own redaction misses a secret its JSON escapes
        (a frame cut at ``_MAX_PARTIAL`` no longer parses)."""
        number = self.next_item
        if number >= self.max_items or number > INT32_MAX:
            # As many as lines, at most: a frame a line is no way round the lines' bound.
            if not self.progress_truncated:
                log.warning("past %d progress frames: the run's next are not forwarded", number)
            self.progress_truncated = True
            return
        self.next_item += 1
        try:
            item = parse_progress(line, number, self.redact)
        except Exception as exc:
            # Reading the run's output goes on whatever one line holds.
            item = None
            why = f"{type(exc).__name__}: {exc}"[:200]
        else:
            why = "not a frame this agent reads"
        if item is None:
            log.warning("progress frame %d dropped: %s", number, why)
        elif not isinstance(item, Dropped):
            self._progress.append(item)

    def tail(self) -> tuple[str, ...]:
        """The last ``tail_lines`` output lines fed so far (redacted; frames, even those not
        understood, left out), as a final event carries them."""
        return limits.tail(self._recent, self.tail_lines)

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._progress)

    def take_progress(self) -> tuple[ProgressItem, ...]:
        """Progress items waiting to be sent, as many as fit in one RunProgress."""
        size = 0
        count = 0
        for item in self._progress[: limits.MAX_ITEMS_PER_BATCH]:
            size += limits.encoded_size(item) + 1
            if size > limits.MAX_ITEMS_BYTES and count:
                break
            count += 1
        items = tuple(self._progress[:count])
        del self._progress[:count]
        return items

    def take(self) -> tuple[int, tuple[str, ...]]:
        """(number of the first line, lines) of the next batch; the rest waits for the next."""
        if not self._pending:
            return self.next_line, ()
        first = self._pending_first
        lines = limits.take_batch(self._pending)
        self._pending_first = first + len(lines)
        return first, lines


class LogForwarder:
    """Follows one container's output and publishes it in batches until the container ends."""

    def __init__(
        self,
        runtime: ContainerRuntime,
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
        redact: Callable[[str], str] | None = None,
        tail_lines: int = 0,
        exited: asyncio.Event | None = None,
    ) -> None:
        """``exited``: set when the container's exit is known. Given it, the output is followed
        only once the container exited or ran for ``batch_interval_s``: a short run's output is
        then read once, as a finished container's, instead of followed live (a live follow is
        a long-lived stream, a thread and a file watch in the engine, per container). Its
        lines go out no later than a batch interval after that."""
        self._forward_lines = forward_lines
        self._runtime = runtime
        self._publish = publish
        self._run_id = run_id
        self._attempt = attempt
        self._agent_id = agent_id
        self._container_id = container_id
        self._interval = batch_interval_s
        self._batch_lines = batch_lines
        self.batcher = LineBatcher(
            max_line_chars=max_line_chars, max_lines=max_lines, redact=redact, tail_lines=tail_lines
        )
        self._chunks: asyncio.Queue[str | None] = asyncio.Queue()
        # Incremental: a character split between two chunks is still one character.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stream: Stream | None = None
        self._exited = exited
        #: The stream was opened once the container had exited: not followed live.
        self._after_exit = False

    async def run(self) -> tuple[str, ...] | None:
        """Forward until the container's output ends (it exited, or was removed). The
        output's tail when it was opened after the exit and read to its end without an error,
        else None (a live follow may miss the last line when it has no newline, and ends the
        same way when its connection breaks: its tail is read again then).

        A failure ends the forwarding of this run's output, with a log line; it never ends
        the run, whose final event still carries the output's tail (read from the engine
        then)."""
        try:
            if await self._forward() and self._after_exit:
                return self.batcher.tail()
        except Exception:
            log.exception(
                "output of run %s (container %s) no longer forwarded",
                self._run_id,
                self._container_id[:12],
            )
        return None

    async def _forward(self) -> bool:
        """Forward the output; True when it was read to its end without an error."""
        if self._exited is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exited.wait(), self._interval)
            self._after_exit = self._exited.is_set()
        try:
            self._stream = await self._runtime.open_log_stream(self._container_id)
        except DockerUnavailable as exc:
            log.warning("output of container %s not followed: %s", self._container_id[:12], exc)
            return False
        reader = asyncio.create_task(
            read_on_thread(self._stream, self._on_chunk, f"output-{self._container_id[:12]}")
        )
        reader.add_done_callback(lambda _: self._chunks.put_nowait(None))
        ended = False
        try:
            while not ended:
                try:
                    chunk = await asyncio.wait_for(self._chunks.get(), self._interval)
                except TimeoutError:
                    chunk = ""
                if chunk is None:
                    ended = True
                    self.batcher.feed(self._decoder.decode(b"", final=True))
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
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if not reader.cancelled() and (error := reader.exception()) is not None:
            log.warning(
                "output of container %s not followed to its end: %s",
                self._container_id[:12],
                error,
            )
            return False
        return True

    def _on_chunk(self, raw: bytes) -> None:
        self._chunks.put_nowait(self._decoder.decode(raw))

    async def _send(self, force: bool = False) -> None:
        """Publish everything waiting, in as many events as the limits ask for.

        Output the broker does not take (after the publisher's own retries) is given up with a
        log line: the run goes on, and its final event carries the tail."""
        try:
            await self._send_all(force)
        except (BrokerUnavailable, BrokerRefused) as exc:
            log.error("output of run %s not forwarded: %s", self._run_id, exc)

    async def _send_all(self, force: bool) -> None:
        while True:
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
            if self._forward_lines and (lines or force):
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
            force = False
            if not self.batcher.pending:
                return

    def close(self) -> None:
        stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
