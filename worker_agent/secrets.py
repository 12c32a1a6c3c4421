"""Secrets by reference: ``secret:NAME`` in a run's or a location's environment, resolved here.

A value comes from this host only: the variable ``HD_SECRET_NAME`` of the agent's own
environment, or else the file ``NAME`` in the agent's secrets directory (one trailing newline
dropped). The reference travels; the value never leaves the host. Every output line the agent
sends (forwarded lines, output tails) has the values of its run's secrets replaced by ``***``.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from schemas import is_safe_name

from .errors import LaunchFailed

log = logging.getLogger(__name__)

PREFIX = "secret:"
REDACTED = "***"
#: Values shorter than this are not redacted: replacing every "a" or "1" of the output would
#: destroy it and hide nothing.
MIN_REDACTED_CHARS = 4


class MissingSecret(LaunchFailed):
    """A reference names a secret this host does not have (or a name that cannot be one)."""


class Secrets:
    """This host's secret store: environment variables, then a directory of files.

    ``allowed`` (glob patterns, ``CI_*``): the only names a run or location may reference;
    empty: any secret the host has."""

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        directory: Path | None = None,
        allowed: Sequence[str] = (),
    ):
        self._environ = os.environ if environ is None else environ
        self._directory = directory
        self._allowed = tuple(allowed)

    def get(self, name: str) -> str:
        if not is_safe_name(name):
            raise MissingSecret(f"{PREFIX}{name!r} is not a secret name (letters, digits, _ -)")
        if self._allowed and not any(fnmatch.fnmatchcase(name, p) for p in self._allowed):
            raise MissingSecret(
                f"secret {name} is not allowed on this agent (allowed: {', '.join(self._allowed)})"
            )
        value = self._environ.get(f"HD_SECRET_{name}")
        if value is not None:
            return value
        if self._directory is not None:
            try:
                return (self._directory / name).read_text().removesuffix("\n")
            except FileNotFoundError:
                pass
            except (OSError, UnicodeDecodeError) as exc:
                # The reason stays in this host's log: it may quote the secret's bytes.
                log.error("secret %s cannot be read from %s: %r", name, self._directory, exc)
                raise MissingSecret(f"secret {name} cannot be read on this host") from None
        # Where the agent looked stays on the host too: its paths are nobody else's business.
        where = f"HD_SECRET_{name}" + (f" or {self._directory / name}" if self._directory else "")
        log.warning("secret %s not found (%s)", name, where)
        raise MissingSecret(f"secret {name} is not set on this host (HD_SECRET_{name})")

    def resolve(self, env: Mapping[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
        """``env`` with every reference replaced by its value; and the keys that held one."""
        resolved, keys = {}, []
        for key, value in env.items():
            if value.startswith(PREFIX):
                resolved[key] = self.get(value.removeprefix(PREFIX))
                keys.append(key)
            else:
                resolved[key] = value
        return resolved, tuple(keys)


def is_reference(value: str) -> bool:
    return value.startswith(PREFIX)


class Redactor:
    """Replaces secret values in output lines."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        # Output is read line by line: a value of several lines is redacted line by line.
        pieces = {piece for v in values for piece in (v, *v.splitlines())}
        # Longest first: a value that contains another is replaced whole.
        self._values = sorted(
            (p for p in pieces if len(p) >= MIN_REDACTED_CHARS), key=len, reverse=True
        )

    def __bool__(self) -> bool:
        return bool(self._values)

    def __call__(self, line: str) -> str:
        for value in self._values:
            if value in line:
                line = line.replace(value, REDACTED)
        return line
