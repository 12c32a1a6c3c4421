"""Concurrency limit keys: what a limit covers, checked before anything is stored.

``global``, ``queue:NAME``, ``location:NAME`` or ``tag:KEY=VALUE``; how the control plane
holds runs back is ``store.limits``'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from schemas import SubmitRun, is_safe_name

from .errors import BadLimit

SCOPES = ("global", "queue", "location", "tag")


@dataclass(frozen=True)
class Limit:
    key: str
    scope: str
    name: str = ""
    value: str = ""
    max_running: int = 0

    def covers(self, run: SubmitRun) -> bool:
        """Whether the limit covers ``run`` (the twin of ``store.limits._COVERS``)."""
        if self.scope == "global":
            return True
        if self.scope == "queue":
            return run.queue == self.name
        if self.scope == "location":
            return run.location == self.name
        return run.tags.get(self.name) == self.value


#: The most runs a limit may let run at once (a column of 32 bits holds it).
MAX_RUNNING = 1_000_000


def parse(key: str, max_running: int = 0) -> Limit:
    """A limit from its key; BadLimit says what is wrong with a bad one."""
    if not 0 <= max_running <= MAX_RUNNING:
        raise BadLimit(f"a limit is 0 to {MAX_RUNNING:,} runs, not {max_running}")
    key = key.strip()
    if len(key) > 400:
        raise BadLimit("a limit's key is at most 400 characters")
    if key == "global":
        return Limit("global", "global", max_running=max_running)
    scope, sep, rest = key.partition(":")
    if not sep or scope not in SCOPES[1:]:
        raise BadLimit(
            f"unknown limit {key!r}: use global, queue:NAME, location:NAME or tag:KEY=VALUE"
        )
    if scope == "tag":
        name, eq, value = rest.partition("=")
        if not eq or not name:
            raise BadLimit(f"a tag limit is tag:KEY=VALUE, not {key!r}")
    else:
        name, value = rest, ""
        if not name:
            raise BadLimit(f"a {scope} limit names the {scope}: {scope}:NAME")
        if not is_safe_name(name):
            raise BadLimit(f"{name!r} is no {scope}'s name: letters, digits, '_' and '-'")
    return Limit(key, scope, name, value, max_running)


def holds(in_force: Sequence[Limit], run: SubmitRun) -> bool:
    """Whether ``run`` falls under any limit in force (and so waits for the admitter)."""
    return any(limit.covers(run) for limit in in_force)
