"""Errors of the wire contract: one root, a shallow hierarchy."""

from __future__ import annotations


class SchemaError(Exception):
    """Root of every error raised by ``schemas``."""


class MessageTooLarge(SchemaError):
    """A payload is larger than the size limit; it was not decoded."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class InvalidMessage(SchemaError):
    """A payload is not a valid message. ``field`` names the offending field when known."""

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(f"invalid message: {detail}")
        self.detail = detail
        self.field = field


class OutOfBounds(InvalidMessage, ValueError):
    """A free-form value breaks one of the contract's bounds (depth, count or size).

    Raised when such a message is built, and, being a ValueError, turned by msgspec into a
    validation error when one is decoded; the decoder reports it as InvalidMessage naming the
    field's full path.
    """
