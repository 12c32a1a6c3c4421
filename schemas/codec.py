"""Encoding and decoding at the boundary: bytes in, typed messages out, or a clear error.

``Decoder.decode`` raises nothing but SchemaError: MessageTooLarge before parsing, and
InvalidMessage, naming the field when there is one, for everything else, from malformed
JSON to a value nested deeper than the interpreter's stack. It also refuses:

- a NUL character in any string, known field or not (PostgreSQL text cannot hold one);
- a lone UTF-16 surrogate escape (msgspec refuses these: UTF-8 cannot encode them);
- a ``kind`` it does not know, or a kind the decoder's union does not take;
- a ``schema_version`` higher than SCHEMA_VERSION. Additive changes keep the version, so a
  higher one means a change this consumer cannot interpret; the message is dead-lettered
  rather than misread (see ``schemas.messages`` for the compatibility rules).
"""

from __future__ import annotations

import re
import typing
from typing import Any, Generic, TypeVar

import msgspec

from .envelope import SCHEMA_VERSION, Message
from .errors import InvalidMessage, MessageTooLarge, OutOfBounds
from .messages import ALL_MESSAGES, AnyMessage, Event, Instruction, Request

#: Default size limit of one payload, checked before any decoding.
MAX_MESSAGE_BYTES = 1024 * 1024

T = TypeVar("T", bound=Message)

_encoder = msgspec.json.Encoder()
_AT_PATH = re.compile(r"- at `\$\.?([^`]*)`$")
_KEY_AT_PATH = re.compile(r"- at `key` in `\$\.?([^`]*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")
# An escape is one only after an even run of backslashes: ``\\u0000`` is a backslash and text.
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_LONE_HIGH_SURROGATE = re.compile(
    rb"(?<!\\)(?:\\\\)*\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
)
_KNOWN_KINDS = frozenset(str(t.__struct_config__.tag) for t in ALL_MESSAGES)


class _Header(msgspec.Struct):
    """The two fields read again when a message is refused, to explain the refusal."""

    kind: Any = None
    schema_version: Any = None


_header_decoder = msgspec.json.Decoder(_Header)


def encode(message: Message) -> bytes:
    """The JSON bytes of a message."""
    return _encoder.encode(message)


def _field_of(detail: str, cause: BaseException | None) -> str | None:
    key = _KEY_AT_PATH.search(detail)
    if key:
        return key.group(1) or None
    path = _AT_PATH.search(detail)
    prefix = path.group(1) if path else ""
    missing = _MISSING.search(detail)
    inner = cause.field if isinstance(cause, OutOfBounds) else None
    if missing:
        inner = missing.group(1)
    if inner:
        return f"{prefix}.{inner}" if prefix else inner
    return prefix or None


def _header(payload: bytes) -> _Header | None:
    try:
        return _header_decoder.decode(payload)
    except (msgspec.MsgspecError, RecursionError, ValueError):
        return None


class Decoder(Generic[T]):
    """A typed decoder for one union of messages, with a size limit."""

    def __init__(self, type_: Any, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(type_)
        self.max_bytes = max_bytes
        members = typing.get_args(type_) or (type_,)
        #: The ``kind`` tags this decoder takes.
        self.kinds = frozenset(str(t.__struct_config__.tag) for t in members)

    def decode(self, payload: bytes) -> T:
        """Decode ``payload``; raise MessageTooLarge or InvalidMessage (naming the field)."""
        if len(payload) > self.max_bytes:
            raise MessageTooLarge(len(payload), self.max_bytes)
        # The substring test keeps the regular expression off the common path.
        if b"u0000" in payload and _NUL_ESCAPE.search(payload):
            raise InvalidMessage("a string holds a NUL character (\\u0000)")
        try:
            message = self._decoder.decode(payload)
        except msgspec.ValidationError as exc:
            raise self._refusal(payload, str(exc), exc.__cause__) from None
        except msgspec.DecodeError as exc:
            if _LONE_HIGH_SURROGATE.search(payload) or "surrogate" in str(exc):
                raise InvalidMessage(
                    "a string holds a lone UTF-16 surrogate, which UTF-8 cannot encode"
                ) from None
            raise InvalidMessage(str(exc)) from None
        except UnicodeDecodeError as exc:
            raise InvalidMessage(f"payload is not valid UTF-8 ({exc.reason})") from None
        except RecursionError:
            # msgspec recurses once per level, in known and unknown fields alike.
            raise InvalidMessage("nested too deeply to decode") from None
        except (ValueError, TypeError, OverflowError) as exc:
            # Not raised by msgspec or this package today; kept so that a consumer's loop
            # never sees anything but SchemaError from a payload.
            raise InvalidMessage(f"undecodable ({type(exc).__name__}: {exc})") from None
        if message.schema_version > SCHEMA_VERSION:
            raise _newer_version(message.schema_version)
        return message

    def _refusal(self, payload: bytes, detail: str, cause: BaseException | None) -> InvalidMessage:
        header = _header(payload)
        version = header.schema_version if header else None
        if isinstance(version, int) and version > SCHEMA_VERSION:
            # A newer peer's message may break any rule: the version is the real reason.
            return _newer_version(version)
        field = _field_of(detail, cause)
        if field == "kind" and header is not None and isinstance(header.kind, str):
            if header.kind in _KNOWN_KINDS and header.kind not in self.kinds:
                takes = ", ".join(sorted(self.kinds))
                return InvalidMessage(
                    f"kind {header.kind!r} is not one this consumer takes ({takes})", "kind"
                )
            if header.kind not in _KNOWN_KINDS:
                return InvalidMessage(f"unknown kind {header.kind!r} (from a newer peer?)", "kind")
        if isinstance(cause, OutOfBounds):
            detail = f"{field}: {cause.detail}" if field else cause.detail
        return InvalidMessage(detail, field)


def _newer_version(version: int) -> InvalidMessage:
    return InvalidMessage(
        f"schema_version {version} is newer than this consumer's {SCHEMA_VERSION}: "
        "the message holds a change it cannot interpret",
        "schema_version",
    )


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
