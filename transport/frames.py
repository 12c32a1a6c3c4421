"""Deliveries whose properties cannot be read: poison, never the end of the connection.

aiormq decodes every frame with pamqp. A content header pamqp cannot decode (a short string
that is not UTF-8, a timestamp past any calendar, a header table nested past the parser's
recursion: the broker passes each of them on from any publisher) ends aiormq's reader, and
with it the connection and every channel on it; the message, unacked, comes back first after
the reconnect and ends it again, until the queue's delivery limit. Any agent or submitter
could so silence a consumer, the failure monitor's among them, for as long.

pamqp offers no hook for it: its frame decoder is wrapped here (``install``, called as the
transport's connections are made). A content header that does not decode becomes one with
the same body size and no properties but ``UNREADABLE``, the reason, which every consumer of
the transport refuses as poison (``unreadable``): dead-lettered with the reason, and acked.
"""

from __future__ import annotations

import struct
from typing import Any

import pamqp.frame
from pamqp import constants, exceptions, header
from pamqp.commands import Basic

#: The header that marks a delivery whose properties could not be read, with the reason.
UNREADABLE = "x-hd-unreadable-properties"

_decode = pamqp.frame.unmarshal


def _tolerant(data_in: bytes) -> tuple[int, int, Any]:
    try:
        return _decode(data_in)
    except (exceptions.UnmarshalingException, RecursionError) as exc:
        if data_in[:1] != bytes([constants.FRAME_HEADER]):
            raise
        _, channel, size = pamqp.frame.frame_parts(data_in)
        if size is None:
            raise
        end = constants.FRAME_HEADER_SIZE + size + 1
        if len(data_in) < end or data_in[end - 1] != constants.FRAME_END:
            raise  # a broken stream, not a header with odd properties
        payload = data_in[constants.FRAME_HEADER_SIZE : end - 1]
        try:
            # class id, weight, body size, then the properties that did not decode.
            _, weight, body_size = struct.unpack(">HHQ", payload[:12])
        except struct.error:
            raise exc from None
        why = f"its properties cannot be read ({type(exc).__name__}: {exc})"[:500]
        properties = Basic.Properties(headers={UNREADABLE: why})
        return end, channel, header.ContentHeader(weight, body_size, properties)


def install() -> None:
    """Decode frames through ``_tolerant`` from now on (idempotent)."""
    pamqp.frame.unmarshal = _tolerant


def unreadable(delivery: Any) -> str | None:
    """Why a delivery's properties could not be read; None when they could."""
    headers = getattr(delivery, "headers", None) or {}
    why = headers.get(UNREADABLE) if isinstance(headers, dict) else None
    return None if why is None else str(why)
