"""An example code location: three small jobs declared with the SDK."""

from __future__ import annotations

import time
from typing import Any

from hd_sdk import Context, job


@job(
    description="Greet someone, in one step.",
    config_schema={
        "type": "object",
        "properties": {"name": {"type": "string", "minLength": 1}},
        "required": ["name"],
        "additionalProperties": False,
    },
)
def hello(context: Context, config: dict[str, Any]) -> None:
    with context.step("greet"):
        print(f"hello, {config['name']}!")
    context.metadata(greeted=config["name"])


@job(
    description="Count to N in steps, reporting each.",
    config_schema={
        "type": "object",
        "properties": {
            "to": {"type": "integer", "minimum": 1, "maximum": 1000},
            "pause_s": {"type": "number", "minimum": 0, "maximum": 5},
        },
        "required": ["to"],
    },
)
def count(context: Context, config: dict[str, Any]) -> None:
    for number in range(1, config["to"] + 1):
        with context.step(f"count-{number}"):
            print(number)
            time.sleep(config.get("pause_s", 0))
    context.metadata(counted=config["to"])


@job(description="Fail on purpose, after a step that succeeds.")
def broken(context: Context, config: dict[str, Any]) -> None:
    with context.step("fine"):
        context.log("this step works")
    with context.step("not fine"):
        raise RuntimeError("this job always fails")
