"""A code location's definitions as one LocationLoaded can carry them.

A code server describes its jobs as it likes. What travels is bounded for each job by the
contract (a safe name, a description of at most MAX_TEXT characters, a config schema of at
most MAX_CONFIG_BYTES), and for all of them by the size of one message: a thousand jobs with
16 KiB descriptions, or 64 KiB config schemas, do not fit in 1 MiB. What does not fit is cut,
the least useful first, with a log line, so that the location still loads: descriptions are
shortened, then left out; then config schemas are left out, the largest first (a submission
to such a job is no longer checked against it, and the code server still refuses what it
cannot run); jobs themselves only as a last resort.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec

from schemas import MAX_MESSAGE_BYTES, JobDefinition, LocationLoaded, OutOfBounds, is_safe_name
from schemas.bounds import MAX_LOCATION_JOBS, MAX_TEXT

from . import limits

log = logging.getLogger(__name__)

#: A description shortened to fit keeps this many bytes.
SHORT_DESCRIPTION = 256
_CUT_MARK = " [cut]"


def job_definitions(location: str, jobs: object) -> tuple[JobDefinition, ...]:
    """The jobs a code server describes that the contract can carry; the others are left out
    (one log line says which), so that one bad definition does not keep the location from
    loading. Only strings are taken for names and descriptions (``str()`` of a deeply nested
    value raised RecursionError on the agent's loop), a name twice keeps its first, and once
    ``MAX_LOCATION_JOBS`` are kept the rest is counted, not read: an answer of a million
    entries cost seconds of the agent's time, and a log line each."""
    found: list[JobDefinition] = []
    names: set[str] = set()
    left_out: list[str] = []
    entries = jobs if isinstance(jobs, list) else []
    for count, job in enumerate(entries):
        if len(found) >= MAX_LOCATION_JOBS:
            log.warning(
                "location %s: %d job(s) past the first %d left out",
                location,
                len(entries) - count,
                MAX_LOCATION_JOBS,
            )
            break
        name = job.get("name") if isinstance(job, dict) else None
        if not isinstance(name, str) or not is_safe_name(name) or name in names:
            left_out.append(repr(name)[:80] if isinstance(name, str) else "(no name)")
            continue
        schema = job.get("config_schema") or {}
        description = job.get("description") or ""
        try:
            cleaned = limits.json_object(schema) if isinstance(schema, dict) else {}
            if cleaned is None:
                raise OutOfBounds("nested too deep or too many values", "config_schema")
            description = limits.clean(description) if isinstance(description, str) else ""
            found.append(
                JobDefinition(
                    name=name,
                    description=limits.clip(description, MAX_TEXT),
                    config_schema=cleaned,
                )
            )
            names.add(name)
        except OutOfBounds as exc:
            left_out.append(f"{name} ({exc})")
    if left_out:
        log.warning(
            "location %s: %d job(s) left out (a name that is not a safe one, or twice; "
            "a config schema past the bounds): %s",
            location,
            len(left_out),
            _names(left_out),
        )
    return tuple(found)


def fit_to_message(event: LocationLoaded, max_bytes: int = MAX_MESSAGE_BYTES) -> LocationLoaded:
    """``event`` with its jobs cut until it encodes to at most ``max_bytes`` (see above)."""
    excess = limits.encoded_size(event) - max_bytes
    if excess <= 0:
        return event
    jobs = list(event.jobs)
    sizes = [limits.encoded_size(job) for job in jobs]

    def shrink(
        what: str,
        applies: Callable[[JobDefinition], bool],
        trim: Callable[[JobDefinition], JobDefinition],
    ) -> None:
        nonlocal excess
        shrunk: list[str] = []
        # The largest first: the fewest jobs lose something.
        for i in sorted(range(len(jobs)), key=lambda i: sizes[i], reverse=True):
            if excess <= 0:
                break
            if not applies(jobs[i]):
                continue
            smaller = trim(jobs[i])
            size = limits.encoded_size(smaller)
            excess -= sizes[i] - size  # the separators between jobs stay as they were
            jobs[i], sizes[i] = smaller, size
            shrunk.append(smaller.name)
        if shrunk:
            log.warning(
                "location %s: %s of %d job(s) to fit in one message: %s",
                event.location,
                what,
                len(shrunk),
                _names(shrunk),
            )

    shrink(
        f"descriptions cut to {SHORT_DESCRIPTION} bytes",
        lambda job: len(job.description.encode("utf-8")) > SHORT_DESCRIPTION,
        lambda job: msgspec.structs.replace(
            job, description=limits.clip(job.description, SHORT_DESCRIPTION, _CUT_MARK)
        ),
    )
    shrink(
        "descriptions left out",
        lambda job: bool(job.description),
        lambda job: msgspec.structs.replace(job, description=""),
    )
    shrink(
        "config schemas left out",
        lambda job: bool(job.config_schema),
        lambda job: msgspec.structs.replace(job, config_schema={}),
    )
    left_out: list[str] = []
    while excess > 0 and jobs:
        left_out.append(jobs.pop().name)
        excess -= sizes.pop()  # and its separator: counting less keeps the result within
    if left_out:
        log.warning(
            "location %s: %d job(s) left out to fit in one message: %s",
            event.location,
            len(left_out),
            _names(left_out),
        )
    return msgspec.structs.replace(event, jobs=tuple(jobs))


def _names(names: list[str]) -> str:
    """Names for a log line: the first 20 in order, then how many more."""
    shown = ", ".join(sorted(names[:1000])[:20])
    return shown + (f" and {len(names) - 20} more" if len(names) > 20 else "")
