"""The wire contract: round trips, and clear errors for every kind of bad input."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import msgspec
import pytest

from schemas import (
    ALL_MESSAGES,
    AgentHeartbeat,
    CancelRun,
    ContainerState,
    FailureReason,
    InvalidMessage,
    JobDefinition,
    LaunchRun,
    LocationFailed,
    LocationLoaded,
    LocationSnapshot,
    LocationSpec,
    LocationsWanted,
    Message,
    MessageTooLarge,
    ProgressItem,
    RunAccepted,
    RunFailed,
    RunLaunched,
    RunLog,
    RunProgress,
    RunRejected,
    RunStarted,
    RunSucceeded,
    SubmitRun,
    TerminateRun,
    any_decoder,
    encode,
    event_decoder,
    instruction_decoder,
    kind_of,
    request_decoder,
)

RUN = uuid.UUID("6a0c6f38-2b7e-4d4e-8b7f-2a6c1f7d0e11")
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

EXAMPLES: list[Message] = [
    SubmitRun(
        run_id=RUN,
        image="busybox",
        command=("sh", "-c", "echo hi"),
        env={"A": "1"},
        queue="gpu",
        idempotency_key="nightly-2026-01-02",
        tags={"team": "data"},
        max_runtime_s=60,
    ),
    CancelRun(run_id=RUN, reason="user asked"),
    LaunchRun(run_id=RUN, attempt=2, image="busybox", command=("true",), env={"B": "2"}),
    TerminateRun(run_id=RUN, attempt=2, reason="cancel", grace_s=5),
    RunLaunched(
        run_id=RUN, attempt=1, agent_id="a1", container_id="c" * 64, container_name="hd-run-x"
    ),
    RunStarted(run_id=RUN, attempt=1, agent_id="a1", container_id="c1", started_at=NOW),
    RunSucceeded(run_id=RUN, attempt=1, agent_id="a1", output_tail=("done",), finished_at=NOW),
    RunFailed(
        run_id=RUN,
        attempt=1,
        agent_id="a1",
        reason=FailureReason.EXIT_CODE,
        exit_code=3,
        output_tail=("line 1", "line 2"),
    ),
    RunLog(run_id=RUN, attempt=1, agent_id="a1", first_line=10, lines=("a", "b")),
    RunProgress(
        run_id=RUN,
        attempt=1,
        agent_id="a1",
        items=(
            ProgressItem(line_no=3, event="step_finished", step="load", status="succeeded"),
            ProgressItem(line_no=4, event="metadata", values={"rows": 3, "ok": True}),
        ),
    ),
    LocationSnapshot(
        queue="default",
        locations=(
            LocationSpec(name="etl", image="etl:1", command=("serve",), env={"K": "secret:K"}),
        ),
    ),
    LocationsWanted(agent_id="a1", queues=("default",)),
    LocationLoaded(
        location="etl",
        generation=2,
        agent_id="a1",
        container_id="c1",
        jobs=(JobDefinition(name="load", config_schema={"type": "object"}),),
    ),
    LocationFailed(location="etl", generation=2, agent_id="a1", message="timeout"),
    RunAccepted(run_id=RUN),
    RunRejected(run_id=RUN, reason="no job 'x' in location etl"),
    AgentHeartbeat(
        agent_id="a1",
        sequence=7,
        queues=("default",),
        max_concurrent=4,
        in_flight=(ContainerState(run_id=RUN, attempt=1, container_id="c1", state="running"),),
    ),
]


def test_every_message_kind_has_an_example() -> None:
    assert {type(m) for m in EXAMPLES} == set(ALL_MESSAGES)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: kind_of(m))
def test_every_message_round_trips(message: Message) -> None:
    payload = encode(message)
    assert json.loads(payload)["kind"] == kind_of(message)
    assert any_decoder().decode(payload) == message


@pytest.mark.parametrize(
    ("decoder", "kinds"),
    [
        (request_decoder(), {"SubmitRun", "CancelRun", "LocationsWanted"}),
        (instruction_decoder(), {"LaunchRun", "TerminateRun"}),
        (
            event_decoder(),
            {
                "RunLaunched",
                "RunStarted",
                "RunSucceeded",
                "RunFailed",
                "RunLog",
                "RunProgress",
                "AgentHeartbeat",
                "LocationLoaded",
                "LocationFailed",
                "RunAccepted",
                "RunRejected",
            },
        ),
    ],
)
def test_each_union_accepts_its_kinds_and_rejects_the_others(
    decoder: object, kinds: set[str]
) -> None:
    for message in EXAMPLES:
        payload = encode(message)
        if kind_of(message) in kinds:
            assert decoder.decode(payload) == message  # type: ignore[attr-defined]
        else:
            with pytest.raises(InvalidMessage) as caught:
                decoder.decode(payload)  # type: ignore[attr-defined]
            assert caught.value.field == "kind"


def test_envelope_fields_are_filled_in() -> None:
    message = SubmitRun(run_id=RUN, image="busybox")
    assert message.schema_version == 1
    assert message.sent_at.tzinfo is not None
    assert isinstance(message.message_id, uuid.UUID)
    assert SubmitRun(run_id=RUN, image="busybox").message_id != message.message_id


def test_messages_are_frozen() -> None:
    message = SubmitRun(run_id=RUN, image="busybox")
    with pytest.raises(AttributeError):
        message.image = "other"  # type: ignore[misc]


def test_unknown_extra_fields_are_ignored() -> None:
    body = json.loads(encode(LaunchRun(run_id=RUN, attempt=1, image="busybox")))
    body["added_in_a_later_version"] = {"nested": [1, 2]}
    decoded = instruction_decoder().decode(json.dumps(body).encode())
    assert decoded == LaunchRun(
        run_id=RUN,
        attempt=1,
        image="busybox",
        message_id=uuid.UUID(body["message_id"]),
        sent_at=datetime.fromisoformat(body["sent_at"]),
    )


def _payload(**changes: object) -> bytes:
    body = json.loads(encode(LaunchRun(run_id=RUN, attempt=1, image="busybox")))
    for key, value in changes.items():
        if value is _DELETE:
            del body[key]
        else:
            body[key] = value
    return json.dumps(body).encode()


_DELETE = object()


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"attempt": "one"}, "attempt", "Expected `int`, got `str`"),
        ({"attempt": 0}, "attempt", ">= 1"),
        ({"run_id": "not-a-uuid"}, "run_id", "uuid"),
        ({"image": ""}, "image", "length"),
        ({"command": "echo hi"}, "command", "array"),
        ({"env": {"A": 1}}, "env[...]", "Expected `str`"),
        ({"sent_at": "2026-01-02T03:04:05"}, "sent_at", "timezone"),
        ({"image": _DELETE}, "image", "missing required field"),
        ({"run_id": _DELETE}, "run_id", "missing required field"),
        ({"kind": "LaunchRocket"}, "kind", "Invalid value 'LaunchRocket'"),
        ({"kind": _DELETE}, "kind", "missing required field"),
    ],
)
def test_invalid_fields_are_rejected_naming_the_field(
    changes: dict[str, object], field: str, words: str
) -> None:
    with pytest.raises(InvalidMessage) as caught:
        instruction_decoder().decode(_payload(**changes))
    assert caught.value.field == field
    assert words.lower() in str(caught.value).lower()


def test_nested_field_errors_name_the_path() -> None:
    body = json.loads(encode(EXAMPLES[-1]))
    body["in_flight"][0]["attempt"] = -1
    with pytest.raises(InvalidMessage) as caught:
        event_decoder().decode(json.dumps(body).encode())
    assert caught.value.field == "in_flight[0].attempt"


def test_unknown_failure_reason_is_rejected() -> None:
    body = json.loads(encode(EXAMPLES[7]))
    body["reason"] = "GREMLINS"
    with pytest.raises(InvalidMessage) as caught:
        event_decoder().decode(json.dumps(body).encode())
    assert caught.value.field == "reason"


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"[1, 2]", b"null", b'{"kind": "LaunchRun"', b"\xff\xfe{}"],
)
def test_malformed_payloads_are_rejected(payload: bytes) -> None:
    with pytest.raises(InvalidMessage):
        instruction_decoder().decode(payload)


def test_invalid_utf8_inside_a_string_is_rejected() -> None:
    payload = _payload(image="IMAGE").replace(b"IMAGE", b"bad\xff\xfe")
    with pytest.raises(InvalidMessage) as caught:
        instruction_decoder().decode(payload)
    assert "utf-8" in str(caught.value).lower()


def test_oversized_payloads_are_rejected_before_decoding() -> None:
    big = LaunchRun(run_id=RUN, attempt=1, image="busybox", env={"X": "y" * (1024 * 1024)})
    with pytest.raises(MessageTooLarge) as caught:
        instruction_decoder().decode(encode(big))
    assert caught.value.limit == 1024 * 1024
    assert "exceeds the limit" in str(caught.value)
    # Not even parsed: a huge payload of garbage is rejected for its size, not its syntax.
    with pytest.raises(MessageTooLarge):
        instruction_decoder(max_bytes=10).decode(b"x" * 11)


def test_the_limit_is_a_setting() -> None:
    payload = encode(LaunchRun(run_id=RUN, attempt=1, image="busybox"))
    assert instruction_decoder(max_bytes=len(payload)).decode(payload).image == "busybox"
    with pytest.raises(MessageTooLarge):
        instruction_decoder(max_bytes=len(payload) - 1).decode(payload)


def test_json_schema_describes_each_message() -> None:
    schema = msgspec.json.schema(SubmitRun)
    definition = schema["$defs"]["SubmitRun"]
    assert definition["properties"]["kind"] == {"enum": ["SubmitRun"]}
    assert set(definition["required"]) == {"kind", "run_id"}
