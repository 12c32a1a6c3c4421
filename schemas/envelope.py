"""The envelope every message carries, and the reasons an attempt fails."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Annotated

import msgspec

from .bounds import INT32_MAX, Attempt, AwareDatetime

#: Version of the wire contract written by this code. Additive changes keep it.
SCHEMA_VERSION = 1


def _now() -> datetime:
    return datetime.now(UTC)


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Header fields every message carries."""

    message_id: uuid.UUID = msgspec.field(default_factory=uuid.uuid4)
    schema_version: Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)] = SCHEMA_VERSION
    sent_at: AwareDatetime = msgspec.field(default_factory=_now)


class RunMessage(Message, frozen=True, kw_only=True):
    """A message about one run."""

    run_id: uuid.UUID


class AttemptMessage(RunMessage, frozen=True, kw_only=True):
    """A message about one attempt of a run; the attempt is part of every idempotency key."""

    attempt: Attempt


class FailureReason(enum.StrEnum):
    """Why an attempt failed."""

    EXIT_CODE = "EXIT_CODE"
    IMAGE_NOT_FOUND = "IMAGE_NOT_FOUND"
    LAUNCH_ERROR = "LAUNCH_ERROR"
    START_TIMEOUT = "START_TIMEOUT"
    AGENT_LOST = "AGENT_LOST"
    UNEXPECTED_TERMINATION = "UNEXPECTED_TERMINATION"
    OOM = "OOM"
    MAX_RUNTIME = "MAX_RUNTIME"
    CANCEL_TIMEOUT = "CANCEL_TIMEOUT"
    QUEUE_TIMEOUT = "QUEUE_TIMEOUT"


def kind_of(message: Message) -> str:
    """The ``kind`` tag a message is sent with."""
    return str(type(message).__struct_config__.tag)
