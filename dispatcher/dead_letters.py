"""Dead letters seen by the control plane: counted, alerted on, and a dead LaunchRun fails its run.

Every dead letter reaches two queues through the fanout dead-letter exchange: the operators'
queue (bounded, listed by ``dispatcher dead-letters list``) and the control plane's watch
queue, consumed here. A consumer that refuses a message says why in ``x-hd-reason``; one the
broker dead-lettered (delivery limit) carries RabbitMQ's ``x-first-death-*`` headers instead.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from schemas import FailureReason, RunFailed, is_safe_name
from schemas.topology import (
    DEAD_LETTER_QUEUE_HEADER,
    DEAD_LETTER_REASON_HEADER,
    REQUESTS_QUEUE,
    STATUS_MONITOR_QUEUE,
    STATUS_STORE_QUEUE,
)
from transport.frames import UNREADABLE

_DEAD_LETTER_DECISIONS = uuid.UUID("5b7f3c52-0c57-4d3e-9f0b-1f7a2b5c9d41")
_FIXED_QUEUES = frozenset({REQUESTS_QUEUE, STATUS_STORE_QUEUE, STATUS_MONITOR_QUEUE})


class RawDecoder:
    """Hands the payload on undecoded: dead letters are poison by definition."""

    def decode(self, payload: bytes) -> bytes:
        return payload


@dataclass(frozen=True)
class DeadLetterSeen:
    """One dead letter: where it came from and why."""

    source_queue: str
    reason: str
    body: bytes
    message_id: str | None = None


def seen(
    headers: Mapping[str, Any] | None, body: bytes, message_id: str | None = None
) -> DeadLetterSeen:
    """What a dead letter's headers say of it (ours, or the broker's own)."""
    headers = headers or {}
    source = headers.get(DEAD_LETTER_QUEUE_HEADER) or headers.get("x-first-death-queue") or "?"
    # Its properties could not be read (the broker dead-lettered it, or it was published
    # to the dead letters so): that is the reason to tell.
    reason = headers.get(DEAD_LETTER_REASON_HEADER) or headers.get(UNREADABLE)
    if not reason:
        why = headers.get("x-first-death-reason") or "unknown"
        reason = f"dead-lettered by the broker ({_text(why)})"
    kept_id = _text(message_id)[:200] if message_id else None
    return DeadLetterSeen(known_queue(_text(source)), _text(reason)[:2000], body, kept_id)


def known_queue(name: str) -> str:
    """``name`` when it is one of the project's queues, else ``other``: headers are the
    sender's to write, and counts, alerts and metric labels must not grow without bound."""
    if name in _FIXED_QUEUES:
        return name
    prefix, _, rest = name.rpartition(".")
    if prefix in ("hd.instructions", "hd.control") and is_safe_name(rest):
        return name
    return "other"


def _text(value: object) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text.replace("\x00", "\ufffd")


class _Launch(msgspec.Struct):
    """What names the attempt of a LaunchRun, read alone: an agent dead-letters a LaunchRun
    it cannot decode, and the whole of it would not decode here either (a bound of another
    release, a newer ``schema_version``), which left its run QUEUED for ever."""

    kind: str = ""
    run_id: uuid.UUID | None = None
    attempt: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)] = 0


def launch_failure(letter: DeadLetterSeen) -> RunFailed | None:
    """The failure of the attempt a dead-lettered LaunchRun was for; None for anything else."""
    try:
        launch = msgspec.json.decode(letter.body[: 2 * 1024 * 1024], type=_Launch)
    except Exception:  # anything hostile: no attempt to fail
        return None
    if launch.kind != "LaunchRun" or launch.run_id is None or not launch.attempt:
        return None
    return RunFailed(
        message_id=uuid.uuid5(_DEAD_LETTER_DECISIONS, f"{launch.run_id}/{launch.attempt}"),
        run_id=launch.run_id,
        attempt=launch.attempt,
        reason=FailureReason.LAUNCH_ERROR,
        message=f"instruction dead-lettered from {letter.source_queue}: {letter.reason}"[:4000],
    )
