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


#: The most problems a check lists: past them a config is wrong enough to say so, and
#: listing all of a 10,000-item array's took seconds and gigabytes.
MAX_PROBLEMS = 20
#: An enum is quoted in a problem when it is this short (items, and characters).
_QUOTED_ENUM = (10, 200)


def problems(
    schema: dict[str, Any], value: Any, path: str = "config", limit: int = MAX_PROBLEMS
) -> list[str]:
    """Every way ``value`` fails ``schema``, each naming where, up to ``limit`` of them."""
    found: list[str] = []
    _check(schema, value, path, found, limit, {})
    return found[:limit]


def _check(
    schema: dict[str, Any],
    value: Any,
    path: str,
    found: list[str],
    limit: int,
    enums: dict[int, tuple[set[Any], list[Any]]],
) -> None:
    if len(found) >= limit:
        return
    kind = schema.get("type")
    if kind is not None:
        ok = isinstance(value, _TYPES[kind]) and not (
            kind in ("integer", "number") and isinstance(value, bool)
        )
        if not ok:
            found.append(f"{path} must be of type {kind}, got {type(value).__name__}")
            return
    if "enum" in schema and not _in_enum(value, schema["enum"], enums):
        found.append(f"{path} must be one of {_enum_words(schema['enum'])}")
    if isinstance(value, float) and not math.isfinite(value):
        found.append(f"{path} must be a finite number, got {value}")
        return
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
            if len(found) >= limit:
                return
            if key not in value:
                found.append(f"{path}.{key} is required")
        for key, item in value.items():
            if len(found) >= limit:
                return
            if key in properties:
                _check(properties[key], item, f"{path}.{key}", found, limit, enums)
            elif schema.get("additionalProperties") is False:
                found.append(f"{path}.{key} is not a known field")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            if len(found) >= limit:
                return
            _check(schema["items"], item, f"{path}[{index}]", found, limit, enums)


def _in_enum(value: Any, enum: list[Any], enums: dict[int, tuple[set[Any], list[Any]]]) -> bool:
    """``value in enum``, by a set of its hashable values made once a check: an array's every
    item against a long enum was a scan each."""
    if id(enum) not in enums:
        hashable: set[Any] = set()
        others: list[Any] = []
        for option in enum:
            try:
                hashable.add(option)
            except TypeError:  # a list or an object
                others.append(option)
        enums[id(enum)] = (hashable, others)
    hashable, others = enums[id(enum)]
    try:
        if value in hashable:
            return True
    except TypeError:
        pass
    return value in others


def _enum_words(enum: list[Any]) -> str:
    shown = repr(enum)
    if len(enum) <= _QUOTED_ENUM[0] and len(shown) <= _QUOTED_ENUM[1]:
        return shown
    return f"the {len(enum)} values its schema lists"


def validate_config(schema: dict[str, Any], value: Any) -> None:
    """Raise ConfigError naming the problems of ``value`` (the first ``MAX_PROBLEMS``);
    return if it matches."""
    found = problems(schema, value)
    if found:
        raise ConfigError(found)
