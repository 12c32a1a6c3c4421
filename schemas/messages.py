"""Every message on the wire, as frozen msgspec structs in tagged unions.

The envelope is flat: each message carries its header fields (``message_id``, ``kind``,
``schema_version``, ``sent_at``; ``run_id`` and ``attempt`` on run messages) beside its body
fields, and ``kind`` is the union's tag. One JSON object, decoded in one pass by a typed
decoder, with no second field to keep in step with the tag.

Compatibility rules, so that peers of different releases keep talking:

- additive changes (a new field with a default, a new message kind, a new enum value) keep
  ``SCHEMA_VERSION``; a consumer ignores fields it does not know;
- a message kind or an enum value a consumer does not know is refused as InvalidMessage
  naming the field (``kind``, ``reason``...): it came from a newer peer, and is dead-lettered
  rather than misread;
- any other change raises ``SCHEMA_VERSION``; a consumer refuses a message with a higher
  version than its own, since it cannot tell what the message means;
- a refusal is no answer (a stop an older agent cannot read leaves its container running):
  a new kind or enum value needs its readers upgraded before any writer sends it.

Every field is bounded (see ``schemas.bounds``). The message kinds live in ``envelope``
(the header), ``runs`` and ``agents``; this module gathers them into the unions a consumer
decodes.
"""

from __future__ import annotations

import typing

from .agents import (
    AgentHeartbeat,
    ContainerState,
    JobDefinition,
    LocationFailed,
    LocationLoaded,
    LocationSnapshot,
    LocationSpec,
    LocationsWanted,
)
from .envelope import (
    SCHEMA_VERSION,
    AttemptMessage,
    FailureReason,
    Message,
    RunMessage,
    kind_of,
)
from .runs import (
    CancelRun,
    LaunchGranted,
    LaunchRun,
    ProgressItem,
    RunAccepted,
    RunClaimed,
    RunEnded,
    RunFailed,
    RunLaunched,
    RunLog,
    RunProgress,
    RunRejected,
    RunRetrying,
    RunStarted,
    RunStateWanted,
    RunSucceeded,
    SubmitRun,
    TerminateRun,
)

__all__ = [
    "ALL_MESSAGES",
    "SCHEMA_VERSION",
    "AgentHeartbeat",
    "AnyMessage",
    "AttemptMessage",
    "CancelRun",
    "ContainerState",
    "Event",
    "FailureReason",
    "Instruction",
    "JobDefinition",
    "LaunchGranted",
    "LaunchRun",
    "LocationFailed",
    "LocationLoaded",
    "LocationSnapshot",
    "LocationSpec",
    "LocationsWanted",
    "Message",
    "ProgressItem",
    "Request",
    "RunAccepted",
    "RunClaimed",
    "RunEnded",
    "RunEvent",
    "RunFailed",
    "RunLaunched",
    "RunLog",
    "RunMessage",
    "RunProgress",
    "RunRejected",
    "RunRetrying",
    "RunStarted",
    "RunStateWanted",
    "RunSucceeded",
    "SubmitRun",
    "TerminateRun",
    "kind_of",
]

Instruction = LaunchRun | TerminateRun | LaunchGranted

Request = SubmitRun | CancelRun | RunStateWanted | LocationsWanted
RunEvent = RunClaimed | RunLaunched | RunStarted | RunSucceeded | RunFailed
Event = (
    RunClaimed
    | RunLaunched
    | RunStarted
    | RunSucceeded
    | RunFailed
    | RunLog
    | RunProgress
    | AgentHeartbeat
    | LocationLoaded
    | LocationFailed
    | RunAccepted
    | RunRejected
    | RunRetrying
    | RunEnded
)
AnyMessage = (
    SubmitRun
    | CancelRun
    | RunStateWanted
    | LaunchRun
    | TerminateRun
    | LaunchGranted
    | RunClaimed
    | RunLaunched
    | RunStarted
    | RunSucceeded
    | RunFailed
    | RunLog
    | RunProgress
    | AgentHeartbeat
    | LocationSnapshot
    | LocationsWanted
    | LocationLoaded
    | LocationFailed
    | RunAccepted
    | RunRejected
    | RunRetrying
    | RunEnded
)

#: Every message kind, in the order of ``AnyMessage``.
ALL_MESSAGES: tuple[type[Message], ...] = typing.get_args(AnyMessage)
