"""Run configuration checked against a job's schema: a small subset of JSON Schema.

Supported: ``type`` (object, array, string, integer, number, boolean, null), ``properties``,
``required``, ``additionalProperties: false``, ``items``, ``enum``, ``minimum``, ``maximum``,
``minLength``, ``maxLength``, ``default`` (informative). Anything else in a schema is refused
when the job is declared, so that a schema never promises a check it does not make.
"""

from __future__ import annotations

import json
import math
from typing import Any

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}
_KEYWORDS = {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "default",
    "description",
    "title",
}


#: (keyword, the kind of its value, in words); booleans are no numbers here.
_KEYWORD_VALUES: tuple[tuple[str, type | tuple[type, ...], str], ...] = (
    ("properties", dict, "an object"),
    ("required", list, "a list"),
    ("enum", list, "a list"),
    ("minimum", (int, float), "a number"),
    ("maximum", (int, float), "a number"),
    ("minLength", int, "a whole number"),
    ("maxLength", int, "a whole number"),
    ("description", str, "a string"),
    ("title", str, "a string"),
)


class ConfigError(ValueError):
    """A config does not match its job's schema; ``problems`` lists each mismatch."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def check_schema(schema: dict[str, Any], path: str = "$") -> None:
    """Refuse schema keywords this validator does not check, and values of the wrong kind
    for the ones it does: a schema is checked when the job is declared, never found wrong
    by a run's config."""
    if not isinstance(schema, dict):
        raise ValueError(f"schema at {path} must be an object")
    unknown = set(schema) - _KEYWORDS
    if unknown:
        raise ValueError(
            f"schema at {path} uses unsupported keyword(s): {', '.join(sorted(unknown))}"
        )
    kind = schema.get("type")
    if "type" in schema and not (isinstance(kind, str) and kind in _TYPES):
        raise ValueError(f"schema at {path} has unknown type {kind!r} (one name of a type)")
    for keyword, wanted, what in _KEYWORD_VALUES:
        value = schema.get(keyword)
        if keyword in schema and not (isinstance(value, wanted) and not isinstance(value, bool)):
            raise ValueError(f"schema at {path}: {keyword} must be {what}")
    if "additionalProperties" in schema and not isinstance(schema["additionalProperties"], bool):
        raise ValueError(f"schema at {path}: additionalProperties must be true or false")
    if not all(isinstance(name, str) for name in schema.get("required") or ()):
        raise ValueError(f"schema at {path}: required must list names")
    for key in ("minLength", "maxLength"):
        if schema.get(key, 0) < 0:
            raise ValueError(f"schema at {path}: {key} must not be negative")
    for key, sub in (schema.get("properties") or {}).items():
        check_schema(sub, f"{path}.{key}")
    if "items" in schema:
        check_schema(schema["items"], f"{path}[]")
    if path == "$":
        try:
            # Sent to the control plane as JSON: a date as a default, an infinite minimum
            # would fail the code server's /definitions instead.
            json.dumps(schema, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"schema is not JSON: {exc}") from None


def problems(schema: dict[str, Any], value: Any, path: str = "config") -> list[str]:
    """Every way ``value`` fails ``schema``, each naming where."""
    found: list[str] = []
    kind = schema.get("type")
    if kind is not None:
        ok = isinstance(value, _TYPES[kind]) and not (
            kind in ("integer", "number") and isinstance(value, bool)
        )
        if not ok:
            return [f"{path} must be of type {kind}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{path} must be one of {schema['enum']!r}")
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{path} must be a finite number, got {value}"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            found.append(f"{path} must be at least {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            found.append(f"{path} must be at most {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            found.append(f"{path} must be at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            found.append(f"{path} must be at most {schema['maxLength']} characters")
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for key in schema.get("required") or ():
            if key not in value:
                found.append(f"{path}.{key} is required")
        for key, item in value.items():
            if key in properties:
                found.extend(problems(properties[key], item, f"{path}.{key}"))
            elif schema.get("additionalProperties") is False:
                found.append(f"{path}.{key} is not a known field")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            found.extend(problems(schema["items"], item, f"{path}[{index}]"))
    return found


def validate_config(schema: dict[str, Any], value: Any) -> None:
    """Raise ConfigError naming every problem of ``value``; return if it matches."""
    found = problems(schema, value)
    if found:
        raise ConfigError(found)
