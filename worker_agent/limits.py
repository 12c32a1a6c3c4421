"""What a run's output may become on the wire: cleaned and cut to the contract's limits.

The contract (``schemas.bounds``) refuses NUL characters in any string and bounds every
collection, so that a run printing anything at all (binary output, a 1 GB line, a frame
nested 10,000 deep) must never make the agent publish a message that would be refused.
Lengths are counted here in UTF-8 bytes, never fewer than characters, so that a text within
a byte budget is within either kind of limit; batches are counted JSON-encoded, never less
than their UTF-8 bytes, so that escapes cannot push a message past its size limit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import msgspec

from schemas import OutOfBounds
from schemas.bounds import (
    KIB,
    MAX_JSON_DEPTH,
    MAX_JSON_ELEMENTS,
    MAX_LOG_BATCH_BYTES,
    MAX_VALUES_BYTES,
    check_json,
)

#: A RunLog batch: lines, bytes of one line, bytes of all its lines (JSON-encoded).
MAX_LINES_PER_BATCH = 1000
MAX_LINE_BYTES = 16 * KIB
MAX_BATCH_BYTES = MAX_LOG_BATCH_BYTES
#: A final event's output tail: lines, and all of it encoded (well below a message's 1 MiB).
MAX_TAIL_LINES = 1000
MAX_TAIL_BYTES = 512 * KIB
#: A progress item: each string, its values (JSON-encoded) and their nesting.
MAX_PROGRESS_TEXT_BYTES = 4 * KIB
MAX_PROGRESS_VALUES_BYTES = MAX_VALUES_BYTES
MAX_PROGRESS_DEPTH = MAX_JSON_DEPTH
MAX_PROGRESS_ELEMENTS = MAX_JSON_ELEMENTS
#: Progress items of one RunProgress, in number and encoded size.
MAX_ITEMS_PER_BATCH = 1000
MAX_ITEMS_BYTES = 512 * KIB
#: A progress item's duration, in seconds either way.
MAX_DURATION_S = 1e9

REPLACEMENT = "\ufffd"
TRUNCATED_MARK = " [line truncated]"
#: NUL is refused by the contract; lone surrogates (from a JSON ``\\ud800``) cannot be encoded.
_UNWANTED = re.compile("[\x00\ud800-\udfff]")
_encode = msgspec.json.Encoder().encode


def clean(text: str) -> str:
    """``text`` with NUL and lone surrogates replaced by U+FFFD."""
    return _UNWANTED.sub(REPLACEMENT, text)


def clip(text: str, max_bytes: int, mark: str = "") -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes (``mark`` included when cut)."""
    if len(text) * 4 <= max_bytes:  # no character takes more than 4 bytes
        return text
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    room = max(0, max_bytes - len(mark.encode("utf-8")))
    return raw[:room].decode("utf-8", errors="ignore") + mark


def encoded_size(value: Any) -> int:
    """Bytes of ``value`` in a JSON message (escapes included: they can be 6 per character)."""
    return len(_encode(value))


def line(text: str, max_chars: int = MAX_LINE_BYTES) -> str:
    """One output line as it may travel: cleaned, cut at ``max_chars`` and at the byte limit."""
    text = clean(text)
    if len(text) > max_chars:
        text = text[:max_chars] + TRUNCATED_MARK
    return clip(text, MAX_LINE_BYTES, TRUNCATED_MARK)


def take_batch(lines: list[str]) -> tuple[str, ...]:
    """Remove from ``lines`` and return the longest head that fits in one RunLog."""
    size = 0
    count = 0
    for text in lines[:MAX_LINES_PER_BATCH]:
        size += encoded_size(text) + 1
        if size > MAX_BATCH_BYTES and count:
            break
        count += 1
    head = tuple(lines[:count])
    del lines[:count]
    return head


def tail(lines: Iterable[str], wanted: int) -> tuple[str, ...]:
    """The last ``wanted`` lines (at most the contract's), cleaned, within the tail's budget."""
    kept: list[str] = []
    size = 0
    for text in reversed(list(lines)[-min(wanted, MAX_TAIL_LINES) :]):
        text = line(text)
        size += encoded_size(text) + 1
        if size > MAX_TAIL_BYTES:
            break
        kept.append(text)
    return tuple(reversed(kept))


def progress_text(value: Any, max_chars: int) -> str | None:
    """A progress string field: cleaned and cut (None stays None)."""
    if value is None:
        return None
    return clip(clean(str(value)[:max_chars]), MAX_PROGRESS_TEXT_BYTES)


def progress_duration(value: Any) -> float | None:
    """A progress item's duration, or None when it is not a number the contract takes
    (JSON integers have no size limit: one too large for a float is not a duration)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        duration = float(value)
    except OverflowError:
        return None
    return duration if -MAX_DURATION_S <= duration <= MAX_DURATION_S else None


def progress_values(values: Any) -> dict[str, Any] | None:
    """A progress item's values made safe, or None when they cannot travel (the item drops).

    Strings (keys included) are cleaned; values nested deeper than the contract allows, with
    too many elements, too big once encoded, or not encodable at all are refused rather than
    cut, so that what arrives is what the run wrote.
    """
    if not isinstance(values, dict):
        return {}
    cleaned = json_object(values)
    try:
        if cleaned is None or encoded_size(cleaned) > MAX_PROGRESS_VALUES_BYTES:
            return None
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
        return None
    return cleaned


def json_object(value: dict[str, Any]) -> dict[str, Any] | None:
    """A free-form JSON object with its strings cleaned; None past the contract's depth or
    element count (its size is the caller's to check, once cleaned)."""
    try:
        # The contract's own walk, which is iterative: nothing deeper than it allows reaches
        # the recursive cleaning below.
        check_json("values", value, max_bytes=None)
    except OutOfBounds:
        return None
    return {clean(str(k)): _cleaned(v) for k, v in value.items()}


def _cleaned(value: Any) -> Any:
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean(str(k)): _cleaned(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_cleaned(v) for v in value]
    return value
