"""Bounds of the wire contract: constrained types, and the checks of free-form values.

Every field a peer fills has a limit, so that a consumer can hold, store and log whatever it
decodes: integers fit their PostgreSQL columns, floats are finite, strings, lists and maps
have a maximum length, and names that become part of an AMQP routing key or queue name use
one safe character set.

Lengths of strings count characters, as msgspec's ``max_length`` does; the budgets of
free-form JSON and of a batch of lines count UTF-8 bytes. msgspec checks the ``Meta``
constraints when it decodes, not when a message is built in Python; the free-form checks
run in ``__post_init__``, so at both, and raise OutOfBounds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any, Final

import msgspec

from .errors import OutOfBounds

KIB: Final = 1024
#: Ten years: longer than any duration the contract has a use for.
TEN_YEARS_S: Final = 315_360_000
INT32_MAX: Final = 2**31 - 1
INT64_MAX: Final = 2**63 - 1

# Python's ``$`` also matches before a trailing newline, which msgspec's ``re.search`` would
# let through; ``(?!\n)`` closes that gap and is a no-op in ECMA-262, the JSON Schema dialect.
_END = r"$(?!\n)"

#: Names that become part of a routing key or queue name: agent ids, agent queues, code
#: locations, jobs. No ``.``, ``*`` or ``#`` (topic-exchange syntax); a first character that
#: is a letter or digit, so that names starting with ``_`` stay free for the control plane.
SAFE_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}" + _END
_SAFE_NAME = re.compile(SAFE_NAME_PATTERN)

Name = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=64,
        pattern=SAFE_NAME_PATTERN,
        description=(
            "A name that can be part of an AMQP routing key or queue name: 1 to 64 ASCII "
            "letters, digits, '_' and '-', starting with a letter or digit."
        ),
    ),
]


def is_safe_name(value: object) -> bool:
    """Whether ``value`` is a Name: usable as part of a routing key or queue name."""
    return isinstance(value, str) and _SAFE_NAME.match(value) is not None


# Docker's reference grammar (github.com/distribution/reference, regexp.go). The separator is
# ``-+`` rather than the older ``-*``: the same language, without the nested quantifier that
# makes a backtracking engine take exponential time on a near-miss.
_ALNUM = r"[a-z0-9]+"
_PATH_COMPONENT = rf"{_ALNUM}(?:(?:[._]|__|-+){_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])"
_DOMAIN = rf"{_HOST}(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*(?::{_TAG})?(?:@{_DIGEST})?"
IMAGE_REF_PATTERN: Final = rf"^{_REFERENCE}{_END}"
MAX_IMAGE_REF = 255
_IMAGE_RULE = (
    "A container image reference, per Docker's reference grammar: "
    "[registry[:port]/]path[:tag][@digest], the path in lower case, at most 255 characters."
)

ImageRef = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=MAX_IMAGE_REF,
        pattern=IMAGE_REF_PATTERN,
        description=_IMAGE_RULE,
    ),
]
#: SubmitRun's image: empty when the submission names a location and a job instead.
ImageRefOrEmpty = Annotated[
    str,
    msgspec.Meta(
        max_length=MAX_IMAGE_REF,
        pattern=rf"^(?:{_REFERENCE})?{_END}",
        description=_IMAGE_RULE + " Empty for a job of a code location.",
    ),
]

NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
#: Characters of free text for people: messages, reasons, descriptions.
MAX_TEXT: Final = 16 * KIB
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
ShortText = Annotated[str, msgspec.Meta(max_length=4 * KIB)]
Line = Annotated[str, msgspec.Meta(max_length=16 * KIB)]
#: Lines of a container's output: a batch of them, or the last ones.
Lines = Annotated[tuple[Line, ...], msgspec.Meta(max_length=1000)]

# Docker refuses '=' in a key and the C environment cannot hold NUL.
EnvKey = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[^=\u0000]+$")]
EnvValue = Annotated[str, msgspec.Meta(max_length=64 * KIB)]
Env = Annotated[dict[EnvKey, EnvValue], msgspec.Meta(max_length=1000)]
TagKey = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
TagValue = Annotated[str, msgspec.Meta(max_length=1024)]
Tags = Annotated[dict[TagKey, TagValue], msgspec.Meta(max_length=64)]
Argument = Annotated[str, msgspec.Meta(max_length=64 * KIB)]
#: A command line: a program and its arguments.
Argv = Annotated[tuple[Argument, ...], msgspec.Meta(max_length=1000)]

#: A container id as Docker gives it (64 hex digits); letters, digits, '_', '.' and '-' are
#: taken, none of which JSON escapes, so that a heartbeat's size has a known worst case.
CONTAINER_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}" + _END
ContainerId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=64, pattern=CONTAINER_ID_PATTERN)
]
#: A container's state: Docker's status ("running", "exited"...) or the agent's own word.
ContainerStatus = Annotated[
    str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]{1,32}" + _END)
]

Attempt = Annotated[int, msgspec.Meta(ge=1, le=1000)]
ExitCode = Annotated[int, msgspec.Meta(ge=-1, le=255)]
#: Output lines and progress items are numbered within an attempt into PostgreSQL integers.
LineNo = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
Generation = Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)]
MemoryMb = Annotated[int, msgspec.Meta(ge=6, le=1_048_576)]
#: CPUs a run asks for (Docker's nano-CPUs, so fractions count; 0.01 is Docker's least) or
#: an agent offers.
Cpus = Annotated[float, msgspec.Meta(ge=0.01, le=4096)]
#: GPUs a run asks for or an agent offers.
Gpus = Annotated[int, msgspec.Meta(ge=0, le=256)]
#: Higher first among the runs a concurrency limit holds back.
Priority = Annotated[int, msgspec.Meta(ge=-1000, le=1000)]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]
#: A duration that must pass before something happens.
Seconds = Annotated[float, msgspec.Meta(gt=0, le=TEN_YEARS_S)]
#: A wait that may be zero.
Delay = Annotated[float, msgspec.Meta(ge=0, le=TEN_YEARS_S)]

MAX_JSON_DEPTH: Final = 32
MAX_JSON_ELEMENTS: Final = 10_000
MAX_CONFIG_BYTES: Final = 64 * KIB
MAX_VALUES_BYTES: Final = 16 * KIB
MAX_LOG_BATCH_BYTES: Final = 512 * KIB
#: Attempts one heartbeat lists. Each takes at most 206 bytes encoded, its separator included
#: (every field at its longest, no character of them escaped), so that 5,000 of them and the
#: heartbeat's other fields (at most 5 KiB) stay within a message's 1 MiB.
MAX_IN_FLIGHT: Final = 5_000
#: Jobs one code location describes.
MAX_LOCATION_JOBS: Final = 1000

Config = Annotated[
    dict[str, Any],
    msgspec.Meta(
        description=(
            f"Free-form JSON: at most {MAX_JSON_DEPTH} levels deep, {MAX_JSON_ELEMENTS} values "
            f"and {MAX_CONFIG_BYTES // KIB} KiB encoded."
        )
    ),
]
ProgressValues = Annotated[
    dict[str, Any],
    msgspec.Meta(
        description=(
            f"Free-form JSON: at most {MAX_JSON_DEPTH} levels deep, {MAX_JSON_ELEMENTS} values "
            f"and {MAX_VALUES_BYTES // KIB} KiB encoded."
        )
    ),
]

_encoder = msgspec.json.Encoder()


def check_json(field: str, value: Any, max_bytes: int | None) -> None:
    """Refuse free-form JSON nested deeper than MAX_JSON_DEPTH containers, holding more than
    MAX_JSON_ELEMENTS values, or encoding to more than ``max_bytes`` (None: not encoded, for
    a value whose strings must be cleaned before it can be)."""
    if not value:
        return
    # Iterative, so that a value deeper than the interpreter's stack is refused, not crashed on.
    stack: list[tuple[Any, int]] = [(value, 1)]
    count = 0
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise OutOfBounds(f"nested deeper than {MAX_JSON_DEPTH} levels", field)
        children: Iterable[Any] = item.values() if isinstance(item, dict) else item
        for child in children:
            count += 1
            if count > MAX_JSON_ELEMENTS:
                raise OutOfBounds(f"holds more than {MAX_JSON_ELEMENTS} values", field)
            if isinstance(child, dict | list | tuple):
                stack.append((child, depth + 1))
    if max_bytes is None:
        return
    try:
        size = len(_encoder.encode(value))
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON text)
        raise OutOfBounds("holds text that is no valid Unicode (a lone surrogate)", field) from None
    if size > max_bytes:
        raise OutOfBounds(f"encodes to {size} bytes, more than {max_bytes}", field)


def check_text_budget(field: str, texts: tuple[str, ...], max_bytes: int) -> None:
    """Refuse ``texts`` whose UTF-8 bytes add up to more than ``max_bytes``."""
    chars = sum(len(text) for text in texts)
    if chars * 4 <= max_bytes:
        return  # no UTF-8 character is longer than 4 bytes
    size = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
    if size > max_bytes:
        raise OutOfBounds(f"{size} bytes of text, more than {max_bytes}", field)
