"""Hostile and unusual input against the control plane, on the real store (and the web API
in-process): each is refused in words (4xx, a rejection) and leaves no stuck run."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from dispatcher.settings import WebSettings
from dispatcher.states import RunState
from dispatcher.store import AgentLoss, Database, decision_id
from dispatcher.web.app import create_app
from schemas import (
    AgentHeartbeat,
    CancelRun,
    FailureReason,
    InvalidMessage,
    JobDefinition,
    LocationLoaded,
    LocationSnapshot,
    RunClaimed,
    RunLaunched,
    RunRejected,
    RunStarted,
    SubmitRun,
    encode,
    request_decoder,
)
from schemas.codec import Decoder
from transport.connection import connect
from transport.topology import declare_topology


@pytest.fixture
async def web(
    vhost_url: str, database_url: str, schema: str, store: Database
) -> AsyncIterator[tuple[AsyncTestClient, dict[str, str]]]:
    """The HTTP API in-process on the test's vhost and schema, with an admin token."""
    connection = await connect(vhost_url, "hostile-topology")
    async with connection.channel() as channel:
        await declare_topology(channel)
    await connection.close()
    secret = await store.api_tokens.add("operator", "admin", "test")
    app = create_app(
        WebSettings(amqp_url=vhost_url, database_url=database_url, database_schema=schema)
    )
    async with AsyncTestClient(app=app, base_url="http://testserver.local/api/v1") as client:
        yield client, {"Authorization": f"Bearer {secret}"}


def plain(**fields: object) -> SubmitRun:
    return SubmitRun(run_id=uuid.uuid4(), image="busybox", queue="q", **fields)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- web API


@pytest.mark.parametrize("name", ["my.loc", "abc\n"])
async def test_a_location_name_the_contract_refuses_is_a_400(
    web: tuple[AsyncTestClient, dict[str, str]], store: Database, name: str
) -> None:
    """A location's name travels as a Name in every snapshot of its queue: one the agents'
    decoder refuses takes every location of the queue down with it."""
    client, auth = web
    await store.locations.put("good", "busybox", queue="q", actor="test")
    answer = await client.post(
        f"/locations/{name.replace(chr(10), '%0A')}",
        json={"image": "busybox", "queue": "q"},
        headers=auth,
    )
    assert answer.status_code == 400, answer.text
    # Whatever happened, the queue's latest snapshot must still reach its agents.
    async with store.connections.connection() as connection:
        payload = await connection.fetchval(
            "SELECT payload FROM outbox WHERE kind = 'LocationSnapshot' ORDER BY id DESC LIMIT 1"
        )
    Decoder(LocationSnapshot).decode(payload)


@pytest.mark.parametrize(
    "body",
    [
        {"image": "busybox", "env": {"A": "x\u0000y"}},
        {"image": "busybox", "command": ["serve", "a\u0000b"]},
    ],
    ids=["nul-in-env-value", "nul-in-command"],
)
async def test_a_location_with_a_nul_character_is_a_400_not_a_500(
    web: tuple[AsyncTestClient, dict[str, str]], body: dict[str, object]
) -> None:
    client, auth = web
    answer = await client.post("/locations/loc1", json=body, headers=auth)
    assert answer.status_code == 400, answer.text


@pytest.mark.parametrize(
    "reason", ["x" * 20_000, "stop\u0000now"], ids=["reason-over-16-KiB", "nul-in-reason"]
)
async def test_a_cancel_the_intake_cannot_decode_is_refused_not_answered_202(
    web: tuple[AsyncTestClient, dict[str, str]], store: Database, reason: str
) -> None:
    """The CancelRun the API sends must be one the intake's decoder takes; otherwise it is
    dead-lettered and the run is never canceled, though the API said "cancel requested"."""
    client, auth = web
    submission = plain()
    await store.accept_submissions([submission])
    sent = encode(CancelRun(run_id=submission.run_id, grace_s=1, reason=reason))
    with pytest.raises(InvalidMessage):
        request_decoder().decode(sent)  # the intake dead-letters what the API would send
    answer = await client.post(
        f"/runs/{submission.run_id}/cancel", json={"grace_s": 1, "reason": reason}, headers=auth
    )
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text)


# ------------------------------------------------------------------------------ intake


async def test_an_idempotency_key_past_what_the_unique_index_takes_is_refused_at_the_door(
    store: Database,
) -> None:
    """1,024 characters of 3 bytes each pass btree's 2,704-byte limit of the unique index on
    idempotency_key, and would fail the whole intake transaction: the contract bounds the
    key in bytes too, and the longest key it takes is stored."""
    rng = random.Random(7)
    key = "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(1024))
    wire = encode(plain(idempotency_key="k")).replace(b'"k"', msgspec.json.encode(key))
    with pytest.raises(InvalidMessage, match="idempotency_key"):
        request_decoder().decode(wire)
    longest = plain(idempotency_key="\u00e9" * 512)  # 1,024 bytes
    assert await store.accept_submissions([longest]) == [longest.run_id]


async def test_a_second_submission_under_a_used_idempotency_key_is_answered(
    store: Database,
) -> None:
    """`dispatcher submit --idempotency-key K --wait` run twice: the second prints a run id
    that names no run and waits for an answer that never comes (an hour, by default). The
    intake must answer the new run id (naming the run the key belongs to)."""
    first = plain(idempotency_key="nightly-2024-01-01")
    again = plain(idempotency_key="nightly-2024-01-01")
    assert await store.accept_submissions([first]) == [first.run_id]
    assert await store.accept_submissions([again]) == []
    async with store.connections.connection() as connection:
        answers = await connection.fetchval(
            "SELECT count(*) FROM outbox WHERE run_id = $1", again.run_id
        )
    assert answers >= 1, "no answer at all for the second submission's run id"


@pytest.mark.parametrize(
    "config_schema",
    [{"type": "text"}, {"properties": {"n": {"minimum": "3"}}}, {"properties": ["n"]}],
    ids=["unknown-type", "string-minimum", "properties-a-list"],
)
async def test_a_job_whose_config_schema_is_malformed_refuses_submissions_in_words(
    store: Database, config_schema: dict[str, object]
) -> None:
    """A LocationLoaded's config schemas are free-form JSON, never checked by the control
    plane (hd_sdk.config.check_schema exists): every submission of such a job then makes the
    intake's handler raise (KeyError, TypeError, AttributeError) instead of a RunRejected."""
    await store.locations.put("loc", "busybox", queue="q", actor="test")
    loaded = LocationLoaded(
        location="loc",
        generation=1,
        agent_id="a1",
        container_id="c1",
        jobs=(JobDefinition(name="train", config_schema=config_schema),),
    )
    # From an agent of the location's queue: only its news counts.
    await store.apply_events([AgentHeartbeat(agent_id="a1", sequence=1, queues=("q",)), loaded])
    assert (await store.locations.get("loc")).status == "LOADED"
    submission = SubmitRun(run_id=uuid.uuid4(), location="loc", job="train", config={"n": 5})
    assert await store.accept_submissions([submission]) == []
    async with store.connections.connection() as connection:
        payloads = await connection.fetch(
            "SELECT payload FROM outbox WHERE run_id = $1 AND kind = 'RunRejected'",
            submission.run_id,
        )
    [rejected] = [Decoder(RunRejected).decode(row["payload"]) for row in payloads]
    assert rejected.reason.startswith(
        "job 'train' of location 'loc' has a config schema that cannot be applied"
    )
    assert rejected.reason.endswith("fix the job's definition")


# ------------------------------------------------------------------------------ status


async def test_an_agent_cannot_block_the_monitor_s_decision_by_taking_its_event_id(
    store: Database,
) -> None:
    """Decision ids are uuid5 of a namespace in the source, the run and the attempt: anyone
    can compute them. Any agent's event for any run is recorded in its history (a refused
    claim, a foreign or stale event), so an agent that sends one under the id of a decision
    to come makes that decision a "redelivery": the run's agent is lost, the run stays
    STARTED for ever."""
    submission = plain()
    await store.accept_submissions([submission])
    run_id = submission.run_id
    await store.apply_events([AgentHeartbeat(agent_id="holder", sequence=1, queues=("q",))])
    await store.apply_events(
        [
            RunClaimed(run_id=run_id, attempt=1, agent_id="holder"),
            RunLaunched(
                run_id=run_id,
                attempt=1,
                agent_id="holder",
                container_id="c1",
                container_name="hd-run-1",
            ),
            RunStarted(run_id=run_id, attempt=1, agent_id="holder", container_id="c1"),
        ]
    )
    # Another agent's claim (refused: the run is held), under the id of the decision to come.
    squat = RunClaimed(
        message_id=decision_id(run_id, 1, FailureReason.AGENT_LOST.value),
        run_id=run_id,
        attempt=1,
        agent_id="intruder",
    )
    await store.apply_events([squat])
    await store.supervision.declare_agents_lost([AgentLoss("holder", 30.0)])
    run = await store.runs.get(run_id)
    assert (run.state, run.attempt) == (RunState.QUEUED, 2), (run.state, run.attempt)


async def test_what_is_not_utf8_nul_in_a_path_or_a_bad_host_is_4xx_never_a_500(
    web: tuple[AsyncTestClient, dict[str, str]],
) -> None:
    client, auth = web
    json_headers = {**auth, "content-type": "application/json"}
    for path, body in [
        ("/runs", b'{"run_id": "' + str(uuid.uuid4()).encode() + b'", "image": "\xff"}'),
        (f"/runs/{uuid.uuid4()}/cancel", b'{"grace_s": 1, "reason": "\xff"}'),
    ]:
        answer = await client.post(path, content=body, headers=json_headers)
        assert answer.status_code == 400, answer.text
        # In the app's words, or (msgspec 0.23 and later) the decoder's: said either way.
        assert "UTF-8" in answer.text
    for path in ("/ui/static/%00", "/ui/static/app.js%00"):
        answer = await client.get(f"http://testserver.local{path}")
        assert answer.status_code == 404, answer.text
    for host in ("x:abc", "x:-1", "a:b:c"):
        answer = await client.get("http://testserver.local/ui/login", headers={"Host": host})
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "text/html; charset=utf-8"
        answer = await client.get(
            "http://testserver.local/ui/runs", headers={"Host": host}, follow_redirects=False
        )
        assert answer.status_code == 303
        assert answer.headers["location"] == "/ui/login?next=/ui/runs"


async def test_a_cancel_needs_no_body_answers_are_never_cached_and_bodies_are_bounded(
    web: tuple[AsyncTestClient, dict[str, str]],
) -> None:
    client, auth = web
    answer = await client.post(f"/runs/{uuid.uuid4()}/cancel", headers=auth)
    assert answer.status_code == 404, answer.text  # no such run: the body was not asked for
    assert answer.headers["cache-control"] == "no-store"
    assert (await client.get("/runs", headers=auth)).headers["cache-control"] == "no-store"
    big = {"run_id": str(uuid.uuid4()), "image": "busybox", "env": {"X": "y" * 2_000_000}}
    answer = await client.post("/runs", json=big, headers=auth)
    assert answer.status_code == 413


async def test_a_query_parameter_given_twice_is_refused_unless_it_is_a_list(
    web: tuple[AsyncTestClient, dict[str, str]],
) -> None:
    client, auth = web
    for query in ("state=QUEUED&state=SUCCESS", "limit=5&limit=500", "queue=a&queue=b"):
        answer = await client.get(f"/runs?{query}", headers=auth)
        assert answer.status_code == 400, answer.text
        assert "given more than once" in answer.text
    answer = await client.get("/runs?tag=a%3D1&tag=b%3D2&state=QUEUED", headers=auth)
    assert answer.status_code == 200, answer.text
    assert answer.json()["runs"] == []


async def test_a_submission_under_another_s_run_id_or_key_is_refused_without_naming_it(
    web: tuple[AsyncTestClient, dict[str, str]], store: Database
) -> None:
    """Ids and keys may be guessed: a run of another token is never answered as this one's,
    nor named; this token's own is (a repeated submission)."""
    client, auth = web
    theirs = plain(idempotency_key="their-key", submitted_by="someone-else")
    mine = plain(idempotency_key="my-key", submitted_by="operator")
    assert await store.accept_submissions([theirs, mine]) == [theirs.run_id, mine.run_id]
    for body, what in [
        ({"run_id": str(theirs.run_id), "image": "busybox", "queue": "q"}, "its run_id"),
        (
            {"run_id": str(uuid.uuid4()), "image": "busybox", "idempotency_key": "their-key"},
            "its idempotency key",
        ),
    ]:
        answer = await client.post("/runs", json=body, headers=auth)
        assert answer.status_code == 409, answer.text
        assert f"{what} is an earlier submission's" in answer.text
        assert str(theirs.run_id) not in answer.text
    again = await client.post(
        "/runs", json={"run_id": str(mine.run_id), "image": "busybox"}, headers=auth
    )
    assert again.json() == {"run_id": str(mine.run_id), "status": "accepted"}
    keyed = {"run_id": str(uuid.uuid4()), "image": "busybox", "idempotency_key": "my-key"}
    again = await client.post("/runs", json=keyed, headers=auth)
    assert again.json() == {"run_id": str(mine.run_id), "status": "existing"}


async def test_odd_paths_and_bounds_are_4xx_never_a_500(
    web: tuple[AsyncTestClient, dict[str, str]],
) -> None:
    client, auth = web
    body = {"image": "busybox", "queue": "q"}
    answer = await client.post("/locations/a%00b", json=body, headers=auth)
    assert answer.status_code == 400, answer.text
    assert "location name" in answer.text
    for path in ("/ui/static/app.js/x", "/ui/static/" + "a" * 300):
        answer = await client.get(f"http://testserver.local{path}")
        assert answer.status_code == 404, (path, answer.text)
    answer = await client.get("/overview", params={"hours": "1e-12"}, headers=auth)
    assert answer.status_code == 400, answer.text
