"""A content header whose properties do not decode becomes a delivery marked unreadable (its
body size kept), where pamqp's error ended aiormq's reader and the whole connection; every
other frame that does not decode still fails as it did."""

from __future__ import annotations

import struct

import pamqp.frame
import pytest
from pamqp import exceptions, header
from pamqp.body import ContentBody
from pamqp.commands import Basic

from transport.frames import UNREADABLE, install, unreadable

install()


def header_frame(properties: Basic.Properties, body_size: int = 10) -> bytes:
    return pamqp.frame.marshal(header.ContentHeader(0, body_size, properties), 1)


def timestamp_past_any_calendar() -> bytes:
    good = header_frame(Basic.Properties(timestamp=None, message_id="x"))
    flags = struct.pack(">H", 0x0040 | 0x0100)  # timestamp and message_id
    # class id, weight, body size; flags; message_id (shortstr); timestamp (uint64).
    payload = good[7:-1][:12] + flags + b"\x01x" + struct.pack(">Q", 2**63 - 1)
    return struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"


def deep_headers(levels: int = 3000) -> bytes:
    """Headers {"a": {"a": ...}} nested ``levels`` deep, as the wire carries a table: its
    length, then entries (a short-string key, a type, the value; an "F" value is a table)."""
    entries = b""
    for _ in range(levels):
        entries = b"\x01aF" + struct.pack(">I", len(entries)) + entries
    flags = struct.pack(">H", 0x2000)  # headers only
    payload = struct.pack(">HHQ", 60, 0, 10) + flags + struct.pack(">I", len(entries)) + entries
    return struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(
            header_frame(Basic.Properties(message_id="ABCDEF")).replace(b"ABCDEF", b"AB\xff\xfeEF"),
            id="message_id not UTF-8",
        ),
        pytest.param(
            header_frame(Basic.Properties(headers={"kkk": "v"})).replace(b"kkk", b"k\xff\xfe"),
            id="header key not UTF-8",
        ),
        pytest.param(timestamp_past_any_calendar(), id="timestamp past any calendar"),
        pytest.param(deep_headers(), id="headers nested past the parser"),
    ],
)
def test_a_header_whose_properties_do_not_decode_is_marked_unreadable(frame: bytes) -> None:
    consumed, channel, decoded = pamqp.frame.unmarshal(frame)
    assert (consumed, channel) == (len(frame), 1)
    assert isinstance(decoded, header.ContentHeader)
    assert decoded.body_size == 10
    why = unreadable(decoded.properties)
    assert why is not None and why.startswith("its properties cannot be read")
    assert decoded.properties.message_id is None


def test_frames_that_decode_are_as_they_were_and_other_bad_frames_still_fail() -> None:
    good = header_frame(Basic.Properties(message_id="m-1", headers={"a": "b"}))
    _, _, decoded = pamqp.frame.unmarshal(good)
    assert decoded.properties.message_id == "m-1"
    assert unreadable(decoded.properties) is None
    body = pamqp.frame.marshal(ContentBody(b"hello"), 1)
    assert pamqp.frame.unmarshal(body)[2].value == b"hello"
    broken_method = pamqp.frame.marshal(Basic.Ack(delivery_tag=1), 1)[:-1] + b"\x00"
    with pytest.raises(exceptions.UnmarshalingException):
        pamqp.frame.unmarshal(broken_method)
    # A header frame whose end is wrong is a broken stream, whatever its properties.
    unreadable_and_broken = (
        header_frame(Basic.Properties(message_id="ABCDEF")).replace(b"ABCDEF", b"AB\xff\xfeEF")[:-1]
        + b"\x00"
    )
    with pytest.raises(exceptions.UnmarshalingException):
        pamqp.frame.unmarshal(unreadable_and_broken)
    assert UNREADABLE.startswith("x-hd-")
