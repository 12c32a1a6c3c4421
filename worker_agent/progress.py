"""Reading the structured progress a run writes on stdout (the SDK's frame format).

A frame is one line: ``\\x02hd1 `` then a JSON object with an ``event`` field. The format is
the contract between the SDK (the writer, in user images) and the agent (the reader); a line
that is not a well-formed frame is ordinary output.
"""

from __future__ import annotations

import json
from typing import Any

from schemas import ProgressItem

FRAME_PREFIX = "\x02hd1 "
_EVENTS = {"step_started", "step_finished", "log", "metadata"}


def _text(value: Any, limit: int = 4096) -> str | None:
    return None if value is None else str(value)[:limit]


def parse_progress(line: str, number: int) -> ProgressItem | None:
    """The progress item a line holds, numbered ``number``; None for ordinary output."""
    if not line.startswith(FRAME_PREFIX):
        return None
    try:
        frame = json.loads(line[len(FRAME_PREFIX) :])
    except ValueError:
        return None
    if not isinstance(frame, dict) or frame.get("event") not in _EVENTS:
        return None
    values = frame.get("values")
    duration = frame.get("duration_s")
    return ProgressItem(
        line_no=number,
        event=frame["event"],
        step=_text(frame.get("step"), 200),
        status=_text(frame.get("status"), 50),
        duration_s=float(duration) if isinstance(duration, (int, float)) else None,
        level=_text(frame.get("level"), 20),
        message=_text(frame.get("message")),
        values=values if isinstance(values, dict) else {},
    )
