"""JSON Schema export, so that a client in any language can speak the protocol."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from .envelope import SCHEMA_VERSION
from .messages import ALL_MESSAGES, AnyMessage, Event, Instruction, Request

#: What every exported schema says of the contract it describes.
COMMENT = (
    f"hybrid-dispatcher wire contract, schema_version {SCHEMA_VERSION}: unknown fields are "
    "ignored; an unknown kind or enum value, or a higher schema_version, is refused"
)


def _pinned(schema: dict[str, object]) -> dict[str, object]:
    """``schema`` with every ``schema_version`` bounded by this release's: a consumer
    refuses a higher one, which the struct's own bound (any 32-bit integer) did not say."""

    def walk(node: object) -> None:
        if isinstance(node, dict):
            version = (node.get("properties") or {}).get("schema_version")
            if isinstance(version, dict):
                version["maximum"] = SCHEMA_VERSION
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return {"$comment": COMMENT, **schema}


def message_schemas() -> dict[str, dict[str, object]]:
    """One JSON Schema per message kind, keyed by kind."""
    schemas: dict[str, dict[str, object]] = {}
    for message_type in ALL_MESSAGES:
        kind = str(message_type.__struct_config__.tag)
        schemas[kind] = _pinned(msgspec.json.schema(message_type))
    return schemas


def union_schemas() -> dict[str, dict[str, object]]:
    """One JSON Schema per union a consumer decodes."""
    return {
        "Request": _pinned(msgspec.json.schema(Request)),
        "Instruction": _pinned(msgspec.json.schema(Instruction)),
        "Event": _pinned(msgspec.json.schema(Event)),
        "AnyMessage": _pinned(msgspec.json.schema(AnyMessage)),
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
