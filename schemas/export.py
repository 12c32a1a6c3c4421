"""JSON Schema export, so that a client in any language can speak the protocol."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from .messages import ALL_MESSAGES, AnyMessage, Event, Instruction, Request


def message_schemas() -> dict[str, dict[str, object]]:
    """One JSON Schema per message kind, keyed by kind."""
    schemas: dict[str, dict[str, object]] = {}
    for message_type in ALL_MESSAGES:
        kind = str(message_type.__struct_config__.tag)
        schemas[kind] = msgspec.json.schema(message_type)
    return schemas


def union_schemas() -> dict[str, dict[str, object]]:
    """One JSON Schema per union a consumer decodes."""
    return {
        "Request": msgspec.json.schema(Request),
        "Instruction": msgspec.json.schema(Instruction),
        "Event": msgspec.json.schema(Event),
        "AnyMessage": msgspec.json.schema(AnyMessage),
    }


def export(directory: Path) -> list[Path]:
    """Write ``<Kind>.json`` for every message and ``union-<Name>.json`` per union."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    items = [*message_schemas().items()]
    items += [(f"union-{name}", schema) for name, schema in union_schemas().items()]
    for name, schema in items:
        path = directory / f"{name}.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
