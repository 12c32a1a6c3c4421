"""Reading the structured progress a run writes on stdout (the SDK's frame format).

A frame is one line: ``\\x02hd1 `` then a JSON object with an ``event`` field. The format is
the contract between the SDK (the writer, in user images) and the agent (the reader); a line
that is not a well-formed frame is ordinary output. A frame whose values cannot travel (too
big, too deep) is dropped with a log line rather than break the message that would carry it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from hd_sdk.frames import FRAME_PREFIX, parse_frame
from schemas import OutOfBounds, ProgressItem

from . import limits

log = logging.getLogger(__name__)

__all__ = ["DROPPED", "FRAME_PREFIX", "Dropped", "parse_progress"]


class Dropped:
    """A well-formed frame that cannot travel: it is neither progress nor output."""


DROPPED = Dropped()


def parse_progress(
    line: str, number: int, redact: Callable[[str], str] | None = None
) -> ProgressItem | Dropped | None:
    """The progress item a line holds, numbered ``number``; None for ordinary output.

    ``redact`` is applied to every decoded string (keys too) before anything is cut to its
    limit: JSON escapes (quotes, backslashes, non-ASCII) hide a secret from the raw line's
    redaction, and a secret cut in two would no longer be found."""
    frame = parse_frame(line)
    if frame is None:
        return None
    if redact is not None:
        frame = _scrub(frame, redact)
    values = limits.progress_values(frame.get("values"))
    if values is None:
        log.warning(
            "progress frame %d dropped: its values break the contract's limits (%d bytes "
            "encoded, %d levels, %d values)",
            number,
            limits.MAX_PROGRESS_VALUES_BYTES,
            limits.MAX_PROGRESS_DEPTH,
            limits.MAX_PROGRESS_ELEMENTS,
        )
        return DROPPED
    try:
        return ProgressItem(
            line_no=number,
            event=frame["event"],
            step=limits.progress_text(frame.get("step"), 200),
            status=limits.progress_text(frame.get("status"), 50),
            duration_s=limits.progress_duration(frame.get("duration_s")),
            level=limits.progress_text(frame.get("level"), 20),
            message=limits.progress_text(frame.get("message"), limits.MAX_PROGRESS_TEXT_BYTES),
            values=values,
        )
    except OutOfBounds as exc:
        # The contract's own check, should it be stricter than the one above.
        log.warning("progress frame %d dropped: %s", number, exc)
        return DROPPED


def _scrub(value: Any, redact: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {_scrub(k, redact): _scrub(v, redact) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, redact) for v in value]
    return value
