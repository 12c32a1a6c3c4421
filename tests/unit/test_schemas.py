"""The wire contract: round trips, bounds, routing keys, and clear errors for bad input."""

from __future__ import annotations

import json
import re
import typing
import uuid
from datetime import UTC, datetime

import msgspec
import pytest

from schemas import (
    ALL_MESSAGES,
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    AgentHeartbeat,
    AnyMessage,
    CancelRun,
    ContainerState,
    FailureReason,
    InvalidMessage,
    JobDefinition,
    LaunchGranted,
    LaunchRun,
    LocationFailed,
    LocationLoaded,
    LocationSnapshot,
    LocationSpec,
    LocationsWanted,
    Message,
    MessageTooLarge,
    OutOfBounds,
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
    SchemaError,
    SubmitRun,
    TerminateRun,
    any_decoder,
    encode,
    event_decoder,
    instruction_decoder,
    is_safe_name,
    kind_of,
    request_decoder,
)
from schemas.bounds import MAX_IN_FLIGHT
from schemas.topology import (
    AGENT_EVENTS,
    CONTROL_SOURCE,
    LOCATION_EVENTS,
    MONITOR_SOURCE,
    RUN_EVENTS,
    control_queue,
    event_routing_key,
    follow_pattern,
    heartbeat_routing_key,
    instructions_queue,
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
    RunStateWanted(run_id=RUN),
    LaunchRun(run_id=RUN, attempt=2, image="busybox", command=("true",), env={"B": "2"}),
    TerminateRun(run_id=RUN, attempt=2, reason="cancel", grace_s=5),
    LaunchGranted(run_id=RUN, attempt=2, agent_id="host-1"),
    RunClaimed(run_id=RUN, attempt=2, agent_id="host-1"),
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
    RunRetrying(
        run_id=RUN,
        attempt=1,
        next_attempt=2,
        reason=FailureReason.EXIT_CODE,
        delay_s=2.5,
        message="exited with code 3",
    ),
    RunEnded(
        run_id=RUN,
        attempt=2,
        state="FAILURE",
        exit_code=3,
        reason=FailureReason.EXIT_CODE,
        message="exited with code 3",
        output_tail=("line 1",),
    ),
    AgentHeartbeat(
        agent_id="a1",
        sequence=7,
        queues=("default",),
        max_concurrent=4,
        in_flight=(ContainerState(run_id=RUN, attempt=1, container_id="c1", state="running"),),
    ),
]


BY_KIND = {kind_of(m): m for m in EXAMPLES}


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
        (request_decoder(), {"SubmitRun", "CancelRun", "RunStateWanted", "LocationsWanted"}),
        (instruction_decoder(), {"LaunchRun", "TerminateRun", "LaunchGranted"}),
        (
            event_decoder(),
            {
                "RunClaimed",
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
                "RunRetrying",
                "RunEnded",
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
        ({"kind": "LaunchRocket"}, "kind", "unknown kind 'LaunchRocket' (from a newer peer?)"),
        ({"kind": "RunLog"}, "kind", "kind 'RunLog' is not one this consumer takes"),
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
    body = json.loads(encode(next(e for e in EXAMPLES if isinstance(e, RunFailed))))
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


# ------------------------------------------------------------------ forward compatibility


def test_a_newer_schema_version_is_refused_naming_both_versions() -> None:
    newer = SCHEMA_VERSION + 1
    with pytest.raises(InvalidMessage) as caught:
        instruction_decoder().decode(_payload(schema_version=newer))
    assert caught.value.field == "schema_version"
    assert f"schema_version {newer}" in caught.value.detail
    assert f"this consumer's {SCHEMA_VERSION}" in caught.value.detail


def test_a_newer_version_is_the_reason_given_even_when_other_rules_break() -> None:
    payload = _payload(schema_version=SCHEMA_VERSION + 1, kind="LaunchRocket", attempt=0)
    with pytest.raises(InvalidMessage) as caught:
        instruction_decoder().decode(payload)
    assert caught.value.field == "schema_version"


def test_the_current_version_is_accepted_and_zero_is_not() -> None:
    assert instruction_decoder().decode(_payload(schema_version=SCHEMA_VERSION)).attempt == 1
    with pytest.raises(InvalidMessage) as caught:
        instruction_decoder().decode(_payload(schema_version=0))
    assert caught.value.field == "schema_version"


# --------------------------------------------------------------- characters and nesting


def test_a_nul_escape_is_refused_in_any_string() -> None:
    for changes in (
        {"image": "IMAGE"},
        {"env": {"A": "IMAGE"}},
        {"env": {"IMAGE": "1"}},
        {"added_in_a_later_version": ["IMAGE"]},
    ):
        payload = _payload(**changes).replace(b"IMAGE", b"a\\u0000b")
        with pytest.raises(InvalidMessage) as caught:
            instruction_decoder().decode(payload)
        assert "NUL" in caught.value.detail


def test_an_escaped_backslash_before_u0000_is_text_not_nul() -> None:
    payload = _payload(env={"A": "IMAGE"}).replace(b"IMAGE", b"C:\\\\u0000")
    assert instruction_decoder().decode(payload).env == {"A": "C:\\u0000"}
    # A third backslash escapes the NUL again.
    with pytest.raises(InvalidMessage):
        instruction_decoder().decode(payload.replace(b"\\\\u0000", b"\\\\\\u0000"))


@pytest.mark.parametrize("escape", [b"\\ud800", b"\\udc00", b"\\ud800x", b"\\ud800\\u0041"])
def test_lone_surrogates_are_refused(escape: bytes) -> None:
    payload = _payload(env={"A": "TEXT"}).replace(b"TEXT", escape)
    with pytest.raises(InvalidMessage) as caught:
        instruction_decoder().decode(payload)
    assert "surrogate" in caught.value.detail


def test_a_surrogate_pair_is_one_character() -> None:
    payload = _payload(env={"A": "TEXT"}).replace(b"TEXT", b"\\ud83d\\ude00")
    assert instruction_decoder().decode(payload).env == {"A": "\U0001f600"}


DEEP_LIST = "[" * 5000 + "]" * 5000
DEEP_OBJECT = '{"a":' * 5000 + "1" + "}" * 5000


@pytest.mark.parametrize(
    ("field", "deep"),
    [
        ("config", DEEP_OBJECT),
        ("added_in_a_later_version", DEEP_LIST),
        ("added_in_a_later_version", DEEP_OBJECT),
    ],
)
def test_nesting_deeper_than_the_stack_is_refused_not_crashed_on(field: str, deep: str) -> None:
    payload = _payload(**{field: "DEEP"}).replace(b'"DEEP"', deep.encode())
    with pytest.raises(InvalidMessage) as caught:
        instruction_decoder().decode(payload)
    assert "nested too deeply" in caught.value.detail


def _nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_config_depth_count_and_size_are_bounded() -> None:
    decoder = instruction_decoder()
    assert decoder.decode(_payload(config=_nested(32))).config == _nested(32)
    for config, words in (
        (_nested(33), "deeper than 32"),
        ({"k": list(range(10_000))}, "more than 10000 values"),
        ({"k": "x" * (64 * 1024)}, "more than 65536"),
    ):
        with pytest.raises(InvalidMessage) as caught:
            decoder.decode(_payload(config=config))
        assert caught.value.field == "config"
        assert words in caught.value.detail
    assert decoder.decode(_payload(config={"k": list(range(9_999))})).config
    assert decoder.decode(_payload(config={"k": "x" * (64 * 1024 - 10)})).config


def test_free_form_bounds_hold_when_a_message_is_built() -> None:
    with pytest.raises(OutOfBounds) as caught:
        SubmitRun(run_id=RUN, image="busybox", config=_nested(40))
    assert caught.value.field == "config"
    assert isinstance(caught.value, SchemaError)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(OutOfBounds):
        RunLog(run_id=RUN, attempt=1, agent_id="a1", first_line=0, lines=("x" * 16384,) * 40)


def test_a_log_batch_is_numbered_within_postgresql_integers() -> None:
    decoder = event_decoder()
    last = BY_KIND["RunLog"]
    for first, lines in [(2**31 - 1, ()), (2**31 - 2, ("a",)), (2**31 - 1001, ("x",) * 1000)]:
        fits = RunLog(run_id=RUN, attempt=1, agent_id="a1", first_line=first, lines=lines)
        assert decoder.decode(encode(fits)) == fits
    for first, lines in [
        (2**31 - 1, ("a", "b")),
        (2**31 - 1, ("a",)),
        (2**31 - 1000, ("x",) * 1000),
    ]:
        with pytest.raises(OutOfBounds) as built:
            RunLog(run_id=RUN, attempt=1, agent_id="a1", first_line=first, lines=lines)
        assert built.value.field == "first_line"
        body = json.loads(encode(last))
        body.update(first_line=first, lines=list(lines))
        with pytest.raises(InvalidMessage) as decoded:
            decoder.decode(json.dumps(body).encode())
        assert decoded.value.field == "first_line"


def test_a_heartbeat_listing_the_most_attempts_fits_in_a_message() -> None:
    # Every field at its longest; none of their characters is escaped in JSON.
    worst = ContainerState(
        run_id=RUN, attempt=1000, container_id="f" * 64, state="s" * 32, exit_code=255
    )
    beat = AgentHeartbeat(
        agent_id="a" * 64,
        sequence=2**63 - 1,
        schema_version=SCHEMA_VERSION,
        sent_at=datetime(2024, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        queues=tuple(f"{i:02d}" + "q" * 62 for i in range(64)),
        max_concurrent=100_000,
        interval_s=0.30000000000000004,
        in_flight=(worst,) * MAX_IN_FLIGHT,
        draining=True,
        synced=False,
    )
    payload = encode(beat)
    assert len(payload) <= MAX_MESSAGE_BYTES
    assert event_decoder().decode(payload) == beat


def test_all_messages_are_the_members_of_any_message() -> None:
    assert typing.get_args(AnyMessage) == ALL_MESSAGES
    assert len(set(ALL_MESSAGES)) == len(ALL_MESSAGES)
    assert {kind_of(m) for m in EXAMPLES} == {str(t.__struct_config__.tag) for t in ALL_MESSAGES}


def test_nested_free_form_errors_name_the_path() -> None:
    progress = BY_KIND["RunProgress"]
    assert isinstance(progress, RunProgress)
    with pytest.raises(InvalidMessage) as caught:
        event_decoder().decode(_edited(progress, "items.1.values", {"v": "x" * 16384}))
    assert caught.value.field == "items[1].values"
    assert caught.value.detail.startswith("items[1].values: encodes to")
    loaded = BY_KIND["LocationLoaded"]
    with pytest.raises(InvalidMessage) as caught:
        event_decoder().decode(_edited(loaded, "jobs.0.config_schema", _nested(33)))
    assert caught.value.field == "jobs[0].config_schema"


# -------------------------------------------------------------------------------- bounds


class Raw:
    """JSON text put into a payload as is (what json.dumps cannot write, such as 1e400)."""

    def __init__(self, text: str) -> None:
        self.text = text


def _edited(message: Message, path: str, value: object) -> bytes:
    body = json.loads(encode(message))
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    target = body
    for part in parents:
        target = target[part]
    target[last] = "RAW" if isinstance(value, Raw) else value
    payload = json.dumps(body, ensure_ascii=False).encode()
    return payload.replace(b'"RAW"', value.text.encode()) if isinstance(value, Raw) else payload


def _field(path: str) -> str:
    return re.sub(r"\.(\d+)", r"[\1]", path)


DIGEST = "sha256:" + "0123456789abcdef" * 4
HEARTBEAT_ENTRY = {"run_id": str(RUN), "attempt": 1, "state": "running"}
KIB = 1024

# kind, path, an accepted value, a refused value; the error names the path.
BOUNDS = [
    # Safe names: everything that becomes part of a routing key or queue name.
    ("SubmitRun", "queue", "gpu-2_x", "gpu.2"),
    ("SubmitRun", "queue", "x" * 64, "x" * 65),
    ("SubmitRun", "queue", "A1", "_control"),
    ("SubmitRun", "queue", "default", "de*"),
    ("SubmitRun", "queue", "default", "#"),
    ("SubmitRun", "queue", "default", "default\n"),
    ("SubmitRun", "queue", "default", "déjà"),
    ("SubmitRun", "queue", "default", ""),
    ("SubmitRun", "location", "etl", "etl.prod"),
    ("SubmitRun", "job", "count", "count all"),
    ("LaunchRun", "location", "etl", "etl/x"),
    ("LaunchRun", "job", "count", "-count"),
    ("RunLaunched", "agent_id", "host-1", "host.example.com"),
    ("RunStarted", "agent_id", "host-1", "a*"),
    ("RunSucceeded", "agent_id", "host-1", "_monitor"),
    ("RunFailed", "agent_id", None, "a b"),
    ("RunLog", "agent_id", "host-1", "a#"),
    ("RunProgress", "agent_id", "host-1", "a.b"),
    ("AgentHeartbeat", "agent_id", "host-1", "a.b"),
    ("AgentHeartbeat", "queues.0", "gpu", "gpu.large"),
    ("LocationsWanted", "agent_id", "host-1", "a.b"),
    ("LocationsWanted", "queues.0", "gpu", "gpu.large"),
    ("LocationSnapshot", "queue", "gpu", "gpu.large"),
    ("LocationSnapshot", "locations.0.name", "etl-2", "etl.2"),
    ("LocationLoaded", "location", "etl", "etl.2"),
    ("LocationLoaded", "agent_id", "host-1", "a.b"),
    ("LocationLoaded", "jobs.0.name", "count", "count.all"),
    ("LocationFailed", "location", "etl", "etl.2"),
    ("LocationFailed", "agent_id", "host-1", "a.b"),
    # Image references, per Docker's grammar.
    ("LaunchRun", "image", "busybox:1.36", "Busybox"),
    ("LaunchRun", "image", "localhost:5000/team/app:v1.2", "bad\x01image"),
    ("LaunchRun", "image", "hybrid-dispatcher/run-tiny:latest", "a b c"),
    ("LaunchRun", "image", f"docker.io/library/alpine@{DIGEST}", "alpine@sha256:abc"),
    ("LaunchRun", "image", "busybox", ""),
    ("LaunchRun", "image", "a/" + "b" * 253, "a/" + "b" * 254),
    ("LaunchRun", "image", "busybox", "busybox:"),
    ("LaunchRun", "image", "busybox", "busybox\n"),
    ("SubmitRun", "image", "", "bad image"),
    ("LocationSnapshot", "locations.0.image", "etl:1", "ETL:1"),
    # Environment, tags, command lines.
    ("SubmitRun", "env", {"A_B": "1"}, {"A=B": "1"}),
    ("SubmitRun", "env", {"A": "1"}, {"": "1"}),
    ("SubmitRun", "env", {"K" * 256: "1"}, {"K" * 257: "1"}),
    ("SubmitRun", "env", {f"K{i}": "" for i in range(1000)}, {f"K{i}": "" for i in range(1001)}),
    ("LaunchRun", "env", {"A": "v" * 64 * KIB}, {"A": "v" * (64 * KIB + 1)}),
    ("LocationSnapshot", "locations.0.env", {"A": "1"}, {"A=": "1"}),
    ("SubmitRun", "tags", {"t" * 128: "v" * 1024}, {"t" * 129: "v"}),
    ("SubmitRun", "tags", {"t": "v"}, {"t": "v" * 1025}),
    ("SubmitRun", "tags", {"t": "v"}, {"": "v"}),
    ("LaunchRun", "tags", {f"t{i}": "" for i in range(64)}, {f"t{i}": "" for i in range(65)}),
    ("SubmitRun", "command", ["x"] * 1000, ["x"] * 1001),
    ("LaunchRun", "ready_check", ["x"] * 1000, ["x"] * 1001),
    ("SubmitRun", "idempotency_key", "k" * 1024, "k" * 1025),
    # Integers within their PostgreSQL columns.
    ("LaunchRun", "attempt", 1000, 1001),
    ("RunSucceeded", "exit_code", 255, 256),
    ("RunFailed", "exit_code", -1, -2),
    ("RunLog", "first_line", 0, 2**31),
    ("RunLog", "first_line", 2**31 - 3, 2**31 - 2),  # 2 lines: the next one's number fits
    ("RunProgress", "items.0.line_no", 0, -1),
    ("AgentHeartbeat", "sequence", 2**63 - 1, 2**63),
    ("AgentHeartbeat", "max_concurrent", 100_000, 100_001),
    ("SubmitRun", "memory_limit_mb", 6, 5),
    ("LaunchRun", "memory_limit_mb", 1_048_576, 1_048_577),
    ("SubmitRun", "max_retries", 100, 101),
    ("LocationLoaded", "generation", 2**31 - 1, 2**31),
    ("LocationSnapshot", "locations.0.generation", 1, 0),
    ("RunRetrying", "next_attempt", 1000, 1001),
    # Floats: finite and sane.
    ("SubmitRun", "max_runtime_s", 315_360_000, 315_360_001),
    ("SubmitRun", "start_timeout_s", 0.5, 0),
    ("LaunchRun", "max_runtime_s", 60, Raw("1e400")),
    ("AgentHeartbeat", "interval_s", 0.05, 0.04),
    ("AgentHeartbeat", "interval_s", 300, 301),
    ("TerminateRun", "grace_s", 3600, 3601),
    ("TerminateRun", "grace_s", 0, -1),
    ("RunProgress", "items.0.duration_s", -1e9, -1.1e9),
    ("RunProgress", "items.0.duration_s", 1e9, 1.1e9),
    ("RunRetrying", "delay_s", 0, -0.5),
    ("RunRetrying", "delay_s", 315_360_000, 315_360_001),
    # Batches, lists and free text.
    ("RunLog", "lines", ["x"] * 1000, ["x"] * 1001),
    ("RunLog", "lines.0", "x" * 16 * KIB, "x" * (16 * KIB + 1)),
    ("RunLog", "lines", ["x" * 16 * KIB] * 32, ["x" * 16 * KIB] * 33),
    ("RunLog", "lines", ["\U0001f600" * 4096] * 32, ["\U0001f600" * 4096] * 33),
    (
        "RunProgress",
        "items",
        [{"line_no": 1, "event": "log"}] * 1000,
        [{"line_no": 1, "event": "log"}] * 1001,
    ),
    ("RunProgress", "items.0.message", "m" * 4 * KIB, "m" * (4 * KIB + 1)),
    ("RunProgress", "items.0.step", "s", "s" * (4 * KIB + 1)),
    ("RunSucceeded", "output_tail", ["x"] * 1000, ["x"] * 1001),
    ("RunFailed", "output_tail.0", "x" * 16 * KIB, "x" * (16 * KIB + 1)),
    ("LocationFailed", "output_tail", ["x"] * 1000, ["x"] * 1001),
    ("RunEnded", "output_tail", ["x"] * 1000, ["x"] * 1001),
    ("RunFailed", "message", "m" * 16 * KIB, "m" * (16 * KIB + 1)),
    ("RunRejected", "reason", "m" * 16 * KIB, "m" * (16 * KIB + 1)),
    ("CancelRun", "reason", "m" * 16 * KIB, "m" * (16 * KIB + 1)),
    ("TerminateRun", "reason", "m" * 16 * KIB, "m" * (16 * KIB + 1)),
    ("LocationFailed", "message", "m" * 16 * KIB, "m" * (16 * KIB + 1)),
    ("RunRetrying", "message", "m" * 16 * KIB, "m" * (16 * KIB + 1)),
    ("LocationLoaded", "jobs.0.description", "d" * 16 * KIB, "d" * (16 * KIB + 1)),
    ("AgentHeartbeat", "queues", ["q"] * 64, ["q"] * 65),
    ("AgentHeartbeat", "in_flight.0.state", "s" * 32, "s" * 33),
    ("AgentHeartbeat", "in_flight.0.state", "running", "run\u0001ning"),
    ("AgentHeartbeat", "in_flight.0.state", "dead", 'de"ad'),
    ("AgentHeartbeat", "in_flight.0.container_id", "c" * 64, "c" * 65),
    ("AgentHeartbeat", "in_flight.0.container_id", "a0.b-c_d", "c\u0001"),
    ("AgentHeartbeat", "in_flight.0.container_id", "c1", "c\\1"),
    ("AgentHeartbeat", "in_flight.0.container_id", "c1", "é"),
    ("RunLaunched", "container_id", "c" * 64, "c" * 65),
    ("LocationLoaded", "container_id", "c1", "c 1"),
    ("AgentHeartbeat", "in_flight", [HEARTBEAT_ENTRY] * 5000, [HEARTBEAT_ENTRY] * 5001),
    ("LocationSnapshot", "locations", [], [{"name": "a", "image": "a"}] * 1001),
    ("LocationLoaded", "jobs", [], [{"name": "a"}] * 1001),
    ("RunEnded", "state", "CANCELED", "LOST"),
    ("RunRetrying", "reason", "OOM", "GREMLINS"),
]


@pytest.mark.parametrize(
    ("kind", "path", "good", "bad"),
    BOUNDS,
    ids=[f"{kind}.{path}-{i}" for i, (kind, path, _, _) in enumerate(BOUNDS)],
)
def test_each_bound_accepts_its_limit_and_refuses_past_it_naming_the_field(
    kind: str, path: str, good: object, bad: object
) -> None:
    message = BY_KIND[kind]
    decoder = any_decoder()
    decoder.decode(_edited(message, path, good))
    with pytest.raises(InvalidMessage) as caught:
        decoder.decode(_edited(message, path, bad))
    # A map's keys are named by the map, its values as ``map[...]``.
    field = _field(path)
    assert caught.value.field in (field, f"{field}[...]")


def test_is_safe_name() -> None:
    assert is_safe_name("gpu-2_x")
    assert is_safe_name("9" * 64)
    for name in ("", "_control", "a.b", "a*", "a#", "a b", "a\n", "é", "x" * 65, None, 3):
        assert not is_safe_name(name)


# ---------------------------------------------------------------------------- topology


def _topic_matches(pattern: str, key: str) -> bool:
    """RabbitMQ's topic matching: ``*`` is one word, ``#`` zero or more."""
    words = [
        r"[^.]+" if w == "*" else r"(?:[^.]+(?:\.[^.]+)*)?" if w == "#" else re.escape(w)
        for w in pattern.split(".")
    ]
    regex = r"\.".join(words).replace(r"\.(?:[^.]+(?:\.[^.]+)*)?", r"(?:\.[^.]+)*")
    return re.fullmatch(regex, key) is not None


@pytest.mark.parametrize(
    ("message", "source", "key"),
    [
        (BY_KIND["RunLaunched"], None, f"run.launched.a1.{RUN}"),
        (BY_KIND["RunStarted"], None, f"run.started.a1.{RUN}"),
        (BY_KIND["RunSucceeded"], None, f"run.succeeded.a1.{RUN}"),
        (BY_KIND["RunFailed"], None, f"run.failed.a1.{RUN}"),
        (BY_KIND["RunLog"], None, f"run.log.a1.{RUN}"),
        (BY_KIND["RunProgress"], None, f"run.progress.a1.{RUN}"),
        (
            RunFailed(run_id=RUN, attempt=1, reason=FailureReason.AGENT_LOST),
            MONITOR_SOURCE,
            f"run.failed._monitor.{RUN}",
        ),
        (BY_KIND["RunAccepted"], CONTROL_SOURCE, f"run.accepted._control.{RUN}"),
        (BY_KIND["RunRejected"], CONTROL_SOURCE, f"run.rejected._control.{RUN}"),
        (BY_KIND["RunRetrying"], CONTROL_SOURCE, f"run.retrying._control.{RUN}"),
        (BY_KIND["RunEnded"], CONTROL_SOURCE, f"run.ended._control.{RUN}"),
        (BY_KIND["AgentHeartbeat"], None, "agent.heartbeat.a1"),
        (BY_KIND["LocationLoaded"], None, "location.loaded.a1"),
        (BY_KIND["LocationFailed"], None, "location.failed.a1"),
    ],
    ids=lambda v: kind_of(v) if isinstance(v, Message) else str(v),
)
def test_every_status_event_key_names_its_source(
    message: Message, source: str | None, key: str
) -> None:
    assert event_routing_key(message, source) == key
    patterns = (RUN_EVENTS, AGENT_EVENTS, LOCATION_EVENTS)
    assert [p for p in patterns if _topic_matches(p, key)] == [key.split(".")[0] + ".#"]


def test_a_waiter_follows_only_its_own_runs() -> None:
    other = uuid.uuid4()
    pattern = follow_pattern(RUN)
    assert _topic_matches(pattern, event_routing_key(BY_KIND["RunEnded"], CONTROL_SOURCE))
    assert _topic_matches(pattern, event_routing_key(BY_KIND["RunFailed"]))
    assert not _topic_matches(pattern, f"run.ended._control.{other}")
    assert not _topic_matches(pattern, "agent.heartbeat.a1")


def test_a_source_must_be_named_and_safe() -> None:
    lost = RunFailed(run_id=RUN, attempt=1, reason=FailureReason.AGENT_LOST)
    with pytest.raises(ValueError, match="no agent_id"):
        event_routing_key(lost)
    with pytest.raises(ValueError, match="no agent_id"):
        event_routing_key(RunAccepted(run_id=RUN))
    for source in ("a.b", "_other", "#", ""):
        with pytest.raises(ValueError, match="not a safe name"):
            event_routing_key(lost, source)
    with pytest.raises(ValueError, match="not a status event"):
        event_routing_key(BY_KIND["LaunchRun"], CONTROL_SOURCE)
    # A message built in Python is not validated: the key still refuses an unsafe agent id.
    with pytest.raises(ValueError, match="not a safe name"):
        event_routing_key(RunStarted(run_id=RUN, attempt=1, agent_id="h.x", container_id="c"))


def test_queue_names_and_heartbeat_keys_refuse_unsafe_names() -> None:
    assert instructions_queue("gpu") == "hd.instructions.gpu"
    assert control_queue("host-1") == "hd.control.host-1"
    assert heartbeat_routing_key("host-1") == "agent.heartbeat.host-1"
    for build in (instructions_queue, control_queue, heartbeat_routing_key):
        for name in ("", "a.b", "a*", "_control"):
            with pytest.raises(ValueError):
                build(name)


# ------------------------------------------------------------------------- JSON Schema


def test_the_json_schema_documents_the_bounds() -> None:
    definitions = msgspec.json.schema(SubmitRun)["$defs"]
    submit = definitions["SubmitRun"]["properties"]
    assert submit["queue"]["pattern"].startswith("^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    assert "routing key" in submit["queue"]["description"]
    assert "Docker's reference grammar" in submit["image"]["description"]
    assert submit["env"]["maxProperties"] == 1000
    assert submit["env"]["propertyNames"]["maxLength"] == 256
    assert "32 levels deep" in submit["config"]["description"]
    launch = msgspec.json.schema(LaunchRun)["$defs"]["LaunchRun"]["properties"]
    assert launch["attempt"] == {"type": "integer", "minimum": 1, "maximum": 1000}


@pytest.mark.parametrize(
    "run_id",
    ["not-a-uuid", "", "\x00", "a" * 100_000, 7, None, ["x"], {"a": {"b": {}}}],
)
def test_a_hostile_run_state_wanted_is_refused_by_the_decoder(run_id: object) -> None:
    valid = {"kind": "RunStateWanted", "schema_version": 1, "run_id": str(uuid.uuid4())}
    assert isinstance(request_decoder().decode(json.dumps(valid).encode()), RunStateWanted)
    body = json.dumps({**valid, "run_id": run_id})
    with pytest.raises(SchemaError):
        request_decoder().decode(body.encode())
