"""Jobs and the registry a module's jobs are declared in."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import check_schema

# The wire contract's safe-name rule: a job name becomes part of broker names and keys.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")

JobFunction = Callable[..., Any]


@dataclass(frozen=True)
class Job:
    """A job: a function run with a Context and its (validated) config."""

    name: str
    function: JobFunction
    description: str = ""
    config_schema: dict[str, Any] = field(default_factory=lambda: {"type": "object"})

    def definition(self) -> dict[str, Any]:
        """What the code server reports of this job."""
        return {
            "name": self.name,
            "description": self.description,
            "config_schema": self.config_schema,
        }


class Registry:
    """The jobs of one code location."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}

    def add(self, job_: Job) -> None:
        if not _NAME.match(job_.name):
            raise ValueError(
                f"job name {job_.name!r} is invalid: 1 to 64 letters, digits, '_' or '-', "
                "starting with a letter or digit"
            )
        if job_.name in self.jobs:
            raise ValueError(f"job {job_.name!r} is declared twice")
        if not isinstance(job_.description, str):
            # Else /definitions fails for the whole location (bytes are no JSON).
            raise ValueError(f"job {job_.name!r}: its description must be a string")
        check_schema(job_.config_schema)
        self.jobs[job_.name] = job_

    def get(self, name: str) -> Job:
        try:
            return self.jobs[name]
        except KeyError:
            known = ", ".join(sorted(self.jobs)) or "none"
            raise KeyError(f"no job {name!r} in this location (jobs: {known})") from None

    def definitions(self) -> list[dict[str, Any]]:
        return [self.jobs[name].definition() for name in sorted(self.jobs)]


#: Jobs declared with ``@job`` at import time land here.
DEFAULT_REGISTRY = Registry()


def job(
    name: str | None = None,
    *,
    description: str = "",
    config_schema: dict[str, Any] | None = None,
    registry: Registry | None = None,
) -> Callable[[JobFunction], JobFunction]:
    """Declare a job; the function receives ``(context, config)``."""

    def register(function: JobFunction) -> JobFunction:
        (registry or DEFAULT_REGISTRY).add(
            Job(
                name or function.__name__,
                function,
                description or (function.__doc__ or "").strip().split("\n")[0],
                config_schema or {"type": "object"},
            )
        )
        return function

    return register


def load_registry(module: str) -> Registry:
    """Import the module that declares a location's jobs and return its registry."""
    imported = importlib.import_module(module)
    registry = getattr(imported, "registry", None)
    if isinstance(registry, Registry):
        return registry
    return DEFAULT_REGISTRY
