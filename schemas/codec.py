"""Encoding and decoding at the boundary: bytes in, typed messages out, or a clear error."""

from __future__ import annotations

import re
from typing import Any, Generic, TypeVar

import msgspec

from .errors import InvalidMessage, MessageTooLarge
from .messages import AnyMessage, Event, Instruction, Message, Request

#: Default size limit of one payload, checked before any decoding.
MAX_MESSAGE_BYTES = 1024 * 1024

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_AT_PATH = re.compile(r"- at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def encode(message: Message) -> bytes:
    """The JSON bytes of a message."""
    return _encoder.encode(message)


def _field_of(detail: str) -> str | None:
    path = _AT_PATH.search(detail)
    missing = _MISSING.search(detail)
    if missing:
        prefix = path.group(1) if path else ""
        return f"{prefix}.{missing.group(1)}" if prefix else missing.group(1)
    if path:
        return path.group(1) or None
    return None


class Decoder(Generic[T]):
    """A typed decoder for one union of messages, with a size limit."""

    def __init__(self, type_: Any, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(type_)
        self.max_bytes = max_bytes

    def decode(self, payload: bytes) -> T:
        """Decode ``payload``; raise MessageTooLarge or InvalidMessage (naming the field)."""
        if len(payload) > self.max_bytes:
            raise MessageTooLarge(len(payload), self.max_bytes)
        try:
            return self._decoder.decode(payload)
        except msgspec.ValidationError as exc:
            detail = str(exc)
            raise InvalidMessage(detail, _field_of(detail)) from None
        except msgspec.DecodeError as exc:
            raise InvalidMessage(str(exc)) from None
        except UnicodeDecodeError as exc:
            raise InvalidMessage(f"payload is not valid UTF-8 ({exc.reason})") from None


def request_decoder(max_bytes: int = MAX_MESSAGE_BYTES) -> Decoder[Request]:
    """Decoder for what scripts and the CLI send to the control plane."""
    return Decoder(Request, max_bytes)


def instruction_decoder(max_bytes: int = MAX_MESSAGE_BYTES) -> Decoder[Instruction]:
    """Decoder for what the control plane sends to agents."""
    return Decoder(Instruction, max_bytes)


def event_decoder(max_bytes: int = MAX_MESSAGE_BYTES) -> Decoder[Event]:
    """Decoder for what agents publish on the status exchange."""
    return Decoder(Event, max_bytes)


def any_decoder(max_bytes: int = MAX_MESSAGE_BYTES) -> Decoder[AnyMessage]:
    """Decoder for every kind of message (tools and tests)."""
    return Decoder(AnyMessage, max_bytes)
