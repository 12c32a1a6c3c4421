"""Properties of the codec: any payload gives a message within the bounds, or a SchemaError.

Nothing else may escape a decoder: a consumer dead-letters a SchemaError and goes on, while
any other exception would crash it. And whatever a decoder accepts, a consumer can store and
route: it survives a second round trip, holds no NUL and no lone surrogate, its names are
safe, its free-form JSON is shallow and small.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from datetime import UTC
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import (
    AgentHeartbeat,
    CancelRun,
    ContainerState,
    FailureReason,
    LaunchRun,
    Message,
    RunFailed,
    RunLog,
    SchemaError,
    SubmitRun,
    any_decoder,
    encode,
    event_decoder,
    instruction_decoder,
    request_decoder,
)

DECODERS = {
    "request": request_decoder(),
    "instruction": instruction_decoder(),
    "event": event_decoder(),
    "any": any_decoder(),
}

# No example database: the suite writes nothing into the working tree.
FAST = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

# Written out here rather than imported, so that the property checks the rule, not the code.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
NAME_FIELDS = ("agent_id", "queue", "location", "job", "name")
NAME_LISTS = ("queues",)
FREE_FORM = {"config": 64 * 1024, "config_schema": 64 * 1024, "values": 16 * 1024}

# ------------------------------------------------------------------------- strategies

characters = st.characters(codec="utf-8", exclude_characters="\x00")
text = st.text(characters, max_size=40)
non_empty = st.text(characters, min_size=1, max_size=40)
names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True)
path_components = st.from_regex(
    r"[a-z0-9]{1,8}(?:(?:[._]|__|-{1,2})[a-z0-9]{1,8}){0,2}", fullmatch=True
)
images = st.builds(
    lambda domain, path, tag, digest: f"{domain}{'/'.join(path)}{tag}{digest}",
    st.sampled_from(["", "localhost:5000/", "registry.example.com/", "[::1]:443/", "Reg-1.io/"]),
    st.lists(path_components, min_size=1, max_size=3),
    st.one_of(st.just(""), st.from_regex(r":[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)),
    st.sampled_from(["", "@sha256:" + "ab" * 32, "@sha512:" + "0F" * 64]),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=10,
)
configs = st.dictionaries(text, json_values, max_size=5)
env = st.dictionaries(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00="), min_size=1, max_size=20),
    text,
    max_size=5,
)
argv = st.lists(text, max_size=5).map(tuple)
lines = st.lists(text, max_size=20).map(tuple)
positive = st.floats(min_value=0.001, max_value=315_360_000)
cpus = st.floats(min_value=0.01, max_value=4096)

submit_runs = st.builds(
    SubmitRun,
    run_id=st.uuids(),
    image=st.one_of(st.just(""), images),
    location=st.none() | names,
    job=st.none() | names,
    config=configs,
    command=argv,
    env=env,
    queue=names,
    idempotency_key=st.none() | non_empty,
    tags=st.dictionaries(non_empty, text, max_size=5),
    max_runtime_s=st.none() | positive,
    start_timeout_s=st.none() | positive,
    max_retries=st.none() | st.integers(0, 100),
    retry_on=st.none() | st.lists(st.sampled_from(FailureReason), max_size=4).map(tuple),
    memory_limit_mb=st.none() | st.integers(6, 1_048_576),
    cpus=st.none() | cpus,
    gpus=st.integers(0, 256),
    priority=st.integers(-1000, 1000),
    ready_check=argv,
)
cancel_runs = st.builds(
    CancelRun,
    run_id=st.uuids(),
    reason=text,
    grace_s=st.floats(min_value=0, max_value=3600),
)
launch_runs = st.builds(
    LaunchRun,
    run_id=st.uuids(),
    attempt=st.integers(1, 1000),
    image=images,
    location=st.none() | names,
    job=st.none() | names,
    config=configs,
    command=argv,
    env=env,
    max_runtime_s=st.none() | positive,
    memory_limit_mb=st.none() | st.integers(6, 1_048_576),
    cpus=st.none() | cpus,
    gpus=st.integers(0, 256),
)
run_faileds = st.builds(
    RunFailed,
    run_id=st.uuids(),
    attempt=st.integers(1, 1000),
    reason=st.sampled_from(FailureReason),
    agent_id=st.none() | names,
    exit_code=st.none() | st.integers(-1, 255),
    output_tail=lines,
    message=text,
    finished_at=st.none() | st.datetimes(timezones=st.just(UTC)),
)
heartbeats = st.builds(
    AgentHeartbeat,
    agent_id=names,
    sequence=st.integers(0, 2**63 - 1),
    queues=st.lists(names, max_size=5).map(tuple),
    max_concurrent=st.integers(0, 100_000),
    interval_s=st.floats(min_value=0.05, max_value=300),
    in_flight=st.lists(
        st.builds(
            ContainerState,
            run_id=st.uuids(),
            attempt=st.integers(1, 1000),
            container_id=st.none() | st.from_regex(r"[0-9a-f]{1,64}", fullmatch=True),
            state=st.sampled_from(["created", "running", "exited"]),
            exit_code=st.none() | st.integers(-1, 255),
        ),
        max_size=3,
    ).map(tuple),
    draining=st.booleans(),
    cpus=st.none() | cpus,
    memory_mb=st.none() | st.integers(6, 1_048_576),
    gpus=st.integers(0, 256),
)
run_logs = st.builds(
    RunLog,
    run_id=st.uuids(),
    attempt=st.integers(1, 1000),
    agent_id=names,
    first_line=st.integers(0, 2**31 - 1 - 1000),  # the batch's lines numbered within int32
    lines=lines,
    truncated=st.booleans(),
)
messages = st.one_of(submit_runs, cancel_runs, launch_runs, run_faileds, heartbeats, run_logs)


class Raw:
    """JSON text put into a payload as is: what json.dumps cannot or will not write."""

    def __init__(self, text: str) -> None:
        self.text = text


def _deep(depth: int, as_object: bool) -> Raw:
    if as_object:
        return Raw('{"a":' * depth + "0" + "}" * depth)
    return Raw("[" * depth + "]" * depth)


# Depths around the free-form limit (32) and around the interpreter's recursion limit.
deep_values = st.builds(
    _deep, st.sampled_from([31, 32, 33, 200, 990, 1000, 1010, 3000]), st.booleans()
)
nasty_values = st.one_of(
    json_values,
    deep_values,
    st.sampled_from(
        [
            Raw("1e400"),
            Raw("-1e400"),
            Raw("9" * 30),
            Raw("9" * 5000),
            Raw('"a\\u0000b"'),
            Raw('"\\\\u0000"'),
            Raw('"\\ud800"'),
            Raw('"\\udc00x"'),
            Raw('"\\ud800\\u0041"'),
            Raw('"\\ud83d\\ude00"'),
            Raw('"busybox\\n"'),
            Raw('"a.b"'),
            Raw('"_control"'),
            Raw('["a.b"]'),
            Raw("NaN"),
            2**63,
            -(2**63) - 1,
            2**31,
            1001,
            -2,
            0,
            0.04,
            3601,
        ]
    ),
    st.integers(1_000, 70_000).map(lambda n: "x" * n),
    st.lists(st.just("x"), min_size=999, max_size=1002),
)
#: Escapes no decoder may accept anywhere: NUL, and surrogates that are not in a pair.
forbidden_escapes = st.sampled_from(
    ["\\u0000", "\\\\\\u0000", "\\ud800", "\\udbff", "\\udc00", "\\udfff", "\\ud800\\u0041"]
)
#: Candidate names: the safe alphabet, plus what a routing key or queue name must not hold.
name_candidates = st.one_of(
    st.text(st.sampled_from("aZ09_-.*# /:\né"), max_size=70),
    names.map(lambda name: name + "\n"),
    names.map(lambda name: "_" + name),
)


def _with(message: Message, field: str, value: Any) -> bytes:
    body = json.loads(encode(message))
    body[field] = "RAW" if isinstance(value, Raw) else value
    payload = json.dumps(body, ensure_ascii=False).encode()
    return payload.replace(b'"RAW"', value.text.encode()) if isinstance(value, Raw) else payload


# ------------------------------------------------------------------------- the checks


def _decode_everywhere(payload: bytes) -> list[Message]:
    """What each decoder accepts; a decoder raising anything but SchemaError fails the test."""
    accepted = []
    for decoder in DECODERS.values():
        with contextlib.suppress(SchemaError):
            accepted.append(decoder.decode(payload))
    return accepted


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _objects(value: Any) -> list[dict[str, Any]]:
    """Every JSON object of a message that is itself a message or a struct in one."""
    if isinstance(value, dict):
        return [value, *(o for v in value.values() if isinstance(v, list) for o in _objects(v))]
    if isinstance(value, list):
        return [o for item in value for o in _objects(item)]
    return []


def assert_within_bounds(message: Message) -> None:
    payload = encode(message)
    assert any_decoder().decode(payload) == message
    body = msgspec.to_builtins(message)
    for string in _strings(body):
        assert "\x00" not in string
        string.encode("utf-8")  # no lone surrogate
    for obj in _objects(body):
        for field in NAME_FIELDS:
            if isinstance(obj.get(field), str):
                assert SAFE_NAME.fullmatch(obj[field]), (field, obj[field])
        for field in NAME_LISTS:
            for name in obj.get(field) or ():
                assert SAFE_NAME.fullmatch(name), (field, name)
        for field, limit in FREE_FORM.items():
            if isinstance(obj.get(field), dict):
                assert _depth(obj[field]) <= 32
                assert len(msgspec.json.encode(obj[field])) <= limit


# ------------------------------------------------------------------------- properties


@FAST
@given(messages)
def test_valid_messages_round_trip_within_bounds(message: Message) -> None:
    assert_within_bounds(message)
    accepted = _decode_everywhere(encode(message))
    assert message in accepted


@settings(FAST, max_examples=300)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_give_a_schema_error_or_a_bounded_message(payload: bytes) -> None:
    for message in _decode_everywhere(payload):
        assert_within_bounds(message)


@FAST
@given(messages, st.data())
def test_truncated_payloads_are_refused(message: Message, data: st.DataObject) -> None:
    payload = encode(message)
    cut = data.draw(st.integers(0, len(payload) - 1))
    assert _decode_everywhere(payload[:cut]) == []


@FAST
@given(messages, st.data())
def test_flipped_bytes_give_a_schema_error_or_a_bounded_message(
    message: Message, data: st.DataObject
) -> None:
    payload = bytearray(encode(message))
    for _ in range(data.draw(st.integers(1, 4))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    for decoded in _decode_everywhere(bytes(payload)):
        assert_within_bounds(decoded)


@settings(FAST, max_examples=120)
@given(messages, st.data(), nasty_values)
def test_any_field_set_to_anything_gives_a_schema_error_or_a_bounded_message(
    message: Message, data: st.DataObject, value: Any
) -> None:
    fields = sorted(json.loads(encode(message)))
    field = data.draw(st.sampled_from([*fields, "added_in_a_later_version"]))
    for decoded in _decode_everywhere(_with(message, field, value)):
        assert_within_bounds(decoded)


@FAST
@given(messages, nasty_values, st.sampled_from(["config", "env", "values", "lines"]))
def test_nested_values_set_to_anything_give_a_schema_error_or_a_bounded_message(
    message: Message, value: Any, field: str
) -> None:
    body = json.loads(encode(message))
    nested: dict[str, Any] = {"k": "RAW" if isinstance(value, Raw) else value}
    body[field] = nested if field != "lines" else [nested["k"]]
    payload = json.dumps(body, ensure_ascii=False).encode()
    if isinstance(value, Raw):
        payload = payload.replace(b'"RAW"', value.text.encode())
    for decoded in _decode_everywhere(payload):
        assert_within_bounds(decoded)


@FAST
@given(messages, st.data(), forbidden_escapes)
def test_a_forbidden_escape_in_any_string_is_refused_by_every_decoder(
    message: Message, data: st.DataObject, escape: str
) -> None:
    body = json.loads(encode(message))
    body["added_in_a_later_version"] = "unknown fields count too"
    field = data.draw(st.sampled_from(sorted(k for k, v in body.items() if isinstance(v, str))))
    at = data.draw(st.integers(0, len(body[field])))
    body[field] = f"{body[field][:at]}ESCAPE-HERE{body[field][at:]}"
    payload = json.dumps(body, ensure_ascii=False).encode()
    assert _decode_everywhere(payload.replace(b"ESCAPE-HERE", escape.encode())) == []


@FAST
@given(messages.filter(lambda m: not isinstance(m, CancelRun)), st.data(), name_candidates)
def test_a_name_is_accepted_exactly_when_it_is_safe(
    message: Message, data: st.DataObject, name: str
) -> None:
    body = json.loads(encode(message))
    field = data.draw(st.sampled_from([f for f in (*NAME_FIELDS, *NAME_LISTS) if f in body]))
    body[field] = [name] if field in NAME_LISTS else name
    payload = json.dumps(body, ensure_ascii=False).encode()
    accepted = _decode_everywhere(payload)
    assert bool(accepted) == bool(SAFE_NAME.fullmatch(name))
    for decoded in accepted:
        assert_within_bounds(decoded)


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def _count(value: Any) -> int:
    children = (
        value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    )
    return sum(1 + _count(child) for child in children)


configs_near_the_bounds = st.one_of(
    configs,
    st.integers(28, 36).map(_nested),
    st.integers(9_990, 10_010).map(lambda n: {"k": [0] * (n - 1)}),
    st.integers(65_500, 65_560).map(lambda n: {"k": "x" * (n - 8)}),
)


@settings(FAST, max_examples=100)
@given(st.sampled_from([submit_runs, launch_runs]).flatmap(lambda s: s), configs_near_the_bounds)
def test_free_form_config_is_accepted_exactly_within_its_bounds(
    message: Message, config: dict[str, Any]
) -> None:
    body = json.loads(encode(message))
    body["config"] = config
    within = (
        _depth(config) <= 32
        and _count(config) <= 10_000
        and len(msgspec.json.encode(config)) <= 64 * 1024
    )
    accepted = _decode_everywhere(json.dumps(body, ensure_ascii=False).encode())
    assert bool(accepted) == within
    for decoded in accepted:
        assert_within_bounds(decoded)


def test_the_strategies_reach_the_interesting_cases() -> None:
    # A property that never meets a refusal proves little: check that refusals happen.
    base = LaunchRun(run_id=uuid.uuid4(), attempt=1, image="busybox")
    for value in (Raw("[" * 3000 + "]" * 3000), Raw('"a\\u0000b"'), Raw('"\\ud800"'), 2**63):
        assert _decode_everywhere(_with(base, "attempt", value)) == []
    assert _decode_everywhere(_with(base, "config", Raw('{"a":' * 40 + "0" + "}" * 40))) == []


@pytest.mark.parametrize("decoder", DECODERS.values(), ids=DECODERS.keys())
def test_no_decoder_lets_a_recursion_error_out(decoder: Any) -> None:
    for deep in ("[" * 100_000, '{"a":' * 100_000, '{"kind": "LaunchRun", "x": ' + "[" * 5000):
        with pytest.raises(SchemaError):
            decoder.decode(deep.encode())
