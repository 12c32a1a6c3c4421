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
