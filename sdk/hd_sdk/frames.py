"""The framed progress format a run writes on stdout for its agent to read.

A frame is one line: the ASCII start-of-text character (not a line break to
``str.splitlines``, unlike the separators), ``hd1``, a space, then a JSON object with
an ``event`` field: ``step_started`` / ``step_finished`` (``step``, ``status``,
``duration_s``), ``log`` (``level``, ``message``) or ``metadata`` (``values``). Any other line
is ordinary output.
"""

from __future__ import annotations

import json
from typing import Any

FRAME_PREFIX = "\x02hd1 "
#: The kinds of frame (the ``event`` field).
EVENTS = frozenset({"step_started", "step_finished", "log", "metadata"})


def encode_frame(event: str, **fields: Any) -> str:
    # Keys as they come (sorting fails on keys of mixed kinds); anything JSON has no form
    # for (a date, a set) in words; NaN and infinities as JSON has no numbers for them.
    return FRAME_PREFIX + json.dumps({"event": event, **fields}, default=str)


def parse_frame(line: str) -> dict[str, Any] | None:
    """The frame a line holds, or None for an ordinary line (or a broken frame)."""
    if not line.startswith(FRAME_PREFIX):
        return None
    try:
        frame = json.loads(line[len(FRAME_PREFIX) :])
    except (ValueError, RecursionError):
        return None
    event = frame.get("event") if isinstance(frame, dict) else None
    return frame if isinstance(event, str) and event in EVENTS else None
