"""Claims on a real PostgreSQL: the first claim of an attempt holds it, every other claimant
is answered with a TerminateRun, and the failure monitor fails over what a lost agent held."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from dispatcher.states import RunState
from dispatcher.store import Database, OutboxItem, events
from schemas import (
    AgentHeartbeat,
    CancelRun,
    ContainerState,
    FailureReason,
    LaunchGranted,
    RunClaimed,
    RunFailed,
    RunLaunched,
    RunStarted,
    SubmitRun,
    TerminateRun,
    any_decoder,
)
from schemas.topology import CONTROL_EXCHANGE
from tests.support import eventually


async def submitted(store: Database) -> uuid.UUID:
    submission = SubmitRun(run_id=uuid.uuid4(), image="busybox", command=("true",))
    assert await store.accept_submissions([submission]) == [submission.run_id]
    return submission.run_id


async def answers(store: Database, run_id: uuid.UUID) -> list[tuple[str, object]]:
    """(agent, answer) for every claim answer written for the run, oldest first."""
    async with store.connections.connection() as connection:
        rows = await connection.fetch(
            """
            SELECT routing_key, payload FROM outbox
            WHERE run_id = $1 AND exchange = $2 AND kind IN ('LaunchGranted', 'TerminateRun')
            ORDER BY id
            """,
            run_id,
            CONTROL_EXCHANGE,
        )
    decoder = any_decoder()
    return [(r["routing_key"], decoder.decode(bytes(r["payload"]))) for r in rows]


def launched(run_id: uuid.UUID, agent_id: str) -> RunLaunched:
    """Attempt 1's RunLaunched from ``agent_id``, its container id made of its first letter
    after the host- prefix."""
    return RunLaunched(
        run_id=run_id,
        attempt=1,
        agent_id=agent_id,
        container_id=agent_id[-1] * 64,
        container_name=f"hd-run-{run_id}-1",
    )


def claim(run_id: uuid.UUID, agent_id: str, attempt: int = 1) -> RunClaimed:
    return RunClaimed(run_id=run_id, attempt=attempt, agent_id=agent_id)


async def test_the_first_claim_holds_the_attempt_and_later_claimants_are_told_to_stop(
    store: Database,
) -> None:
    run_id = await submitted(store)
    first = claim(run_id, "host-a")
    await store.apply_events([first, claim(run_id, "host-b")])
    run = await store.runs.get(run_id)
    assert (run.state, run.agent_id) == (RunState.QUEUED, "host-a")
    [(to_a, granted), (to_b, refused)] = await answers(store, run_id)
    assert to_a == "host-a" and isinstance(granted, LaunchGranted)
    assert (granted.attempt, granted.agent_id) == (1, "host-a")
    assert to_b == "host-b" and isinstance(refused, TerminateRun)
    assert refused.attempt == 1
    assert refused.reason == "claim refused: attempt 1 is held by agent host-a"
    # A redelivered claim is answered once; the holder claiming again is granted again.
    await store.apply_events([first])
    assert len(await answers(store, run_id)) == 2
    await store.apply_events([claim(run_id, "host-a")])
    assert [type(a).__name__ for _, a in await answers(store, run_id)] == [
        "LaunchGranted",
        "TerminateRun",
        "LaunchGranted",
    ]
    # Both claims are in the run's history; the refused one changed nothing.
    kinds = [e.kind for e in await store.runs.events(run_id)]
    assert kinds.count("RunClaimed") == 3
    # The other agent's events of the attempt are recorded and change nothing.
    await store.apply_events([launched(run_id, "host-b")])
    assert (await store.runs.get(run_id)).state == RunState.QUEUED
    await store.apply_events([launched(run_id, "host-a")])
    run = await store.runs.get(run_id)
    assert (run.state, run.agent_id, run.container_id) == (RunState.STARTING, "host-a", "a" * 64)


async def test_claims_of_ended_runs_superseded_attempts_and_unknown_runs_are_refused(
    store: Database,
) -> None:
    ended = await submitted(store)
    await store.apply_events([claim(ended, "host-a")])
    await store.apply_events(
        [RunFailed(run_id=ended, attempt=1, agent_id="host-a", reason=FailureReason.LAUNCH_ERROR)]
    )
    await store.apply_events([claim(ended, "host-b"), claim(ended, "host-a", attempt=2)])
    refusals = [a.reason for _, a in await answers(store, ended) if isinstance(a, TerminateRun)]
    assert refusals == [
        "claim refused: the run ended FAILURE",
        "claim refused: attempt 2 was superseded by attempt 1",
    ]
    unknown = uuid.uuid4()
    await store.apply_events([claim(unknown, "host-a")])
    [(to, refused)] = await answers(store, unknown)
    assert to == "host-a" and isinstance(refused, TerminateRun)
    assert refused.reason == "claim refused: no such run"


async def test_a_lost_agent_gives_up_the_attempts_it_claimed_and_a_stray_is_fenced(
    store: Database,
) -> None:
    held = await submitted(store)
    await store.apply_events(
        [
            AgentHeartbeat(agent_id="host-a", sequence=1, queues=("default",)),
            AgentHeartbeat(agent_id="host-b", sequence=1, queues=("default",)),
            claim(held, "host-a"),
        ]
    )
    # A claimed attempt (its container being created) is watched like a started one.
    assert [(r.run_id, r.state) for r in await store.supervision.active_runs()] == [
        (held, RunState.QUEUED)
    ]
    failed = await store.supervision.declare_agent_lost(
        "host-a", 9.0, "its Docker engine has not answered for 9.0 s"
    )
    assert failed == [held]
    run = await store.runs.get(held)
    assert run.failure_reason == FailureReason.AGENT_LOST.value
    events = await store.runs.events(held)
    [decision] = [e for e in events if e.kind == "RunFailed"]
    assert "its Docker engine has not answered" in decision.payload["message"]
    # Host b lists the current attempt of a run host a holds: it is told to stop it.
    other = await submitted(store)
    await store.apply_events([claim(other, "host-a")])
    fenced = await store.supervision.fence(
        "host-b",
        [ContainerState(run_id=other, attempt=1, container_id="c" * 64, state="running")],
    )
    assert fenced == 1
    [stop] = [a for to, a in await answers(store, other) if to == "host-b"]
    assert isinstance(stop, TerminateRun)
    assert stop.reason == "fenced: this attempt is held by agent host-a"


async def stops(store: Database, run_id: uuid.UUID, agent_id: str) -> list[str]:
    """The reasons of every TerminateRun written for ``agent_id`` about the run, oldest first."""
    async with store.connections.connection() as connection:
        rows = await connection.fetch(
            "SELECT payload FROM outbox WHERE run_id = $1 AND exchange = $2"
            " AND kind = 'TerminateRun' AND routing_key = $3 ORDER BY id",
            run_id,
            CONTROL_EXCHANGE,
            agent_id,
        )
    decoder = any_decoder()
    return [decoder.decode(bytes(r["payload"])).reason for r in rows]


async def test_a_claimant_is_stopped_when_the_attempt_it_holds_ends_or_is_superseded(
    store: Database,
) -> None:
    """A draining claimant is no live agent of its queue: a cancel used to tell only those,
    and a retry no one, while the claimant went on to start what it was granted."""
    await store.apply_events(
        [AgentHeartbeat(agent_id="host-a", sequence=1, queues=("default",), draining=True)]
    )
    canceled, retried = await submitted(store), await submitted(store)
    await store.apply_events([claim(canceled, "host-a"), claim(retried, "host-a")])
    [outcome] = await store.cancel([CancelRun(run_id=canceled, reason="not needed")])
    assert outcome.state == RunState.CANCELED
    assert await stops(store, canceled, "host-a") == ["not needed"]
    # Its launch, come anyway, is stopped too.
    await store.apply_events([launched(canceled, "host-a")])
    assert (await stops(store, canceled, "host-a"))[1:] == ["the run ended before this launch"]

    # Attempt 1 failed over without a word to its holder (a decision with no one to tell):
    # its launch of the superseded attempt is stopped when it is heard of.
    assert await store.supervision.fail_attempt(
        retried, 1, FailureReason.UNEXPECTED_TERMINATION, "gone"
    )
    assert (await store.runs.get(retried)).attempt == 2
    assert await stops(store, retried, "host-a") == []
    await store.apply_events([launched(retried, "host-a")])
    assert await stops(store, retried, "host-a") == ["the run ended before this launch"]


async def test_the_status_consumer_takes_claim_answers_to_publish_itself(store: Database) -> None:
    """``serve`` publishes answers right after the commit, not through the outbox."""
    run_id = await submitted(store)
    answered: list[OutboxItem] = []
    await store.apply_events([claim(run_id, "host-a"), claim(run_id, "host-b")], answered)
    assert [(i.routing_key, type(i.message).__name__) for i in answered] == [
        ("host-a", "LaunchGranted"),
        ("host-b", "TerminateRun"),
    ]
    assert await answers(store, run_id) == []
    assert (await store.runs.get(run_id)).agent_id == "host-a"


async def test_a_lone_claim_is_granted_at_once_and_others_as_in_a_transaction(
    store: Database,
) -> None:
    """A claim alone in its batch (a launch's) takes two round trips and no transaction; what
    it decides is what the transaction decides."""
    run_id = await submitted(store)
    answered: list[OutboxItem] = []
    await store.apply_events([claim(run_id, "host-a")], answered)
    await store.apply_events([claim(run_id, "host-b")], answered)
    await store.apply_events([claim(run_id, "host-a")], answered)  # the holder again
    assert [(i.routing_key, type(i.message).__name__) for i in answered] == [
        ("host-a", "LaunchGranted"),
        ("host-b", "TerminateRun"),
        ("host-a", "LaunchGranted"),
    ]
    run = await store.runs.get(run_id)
    assert (run.state, run.agent_id) == (RunState.QUEUED, "host-a")
    assert [e.kind for e in await store.runs.events(run_id)].count("RunClaimed") == 3
    # A redelivered claim is granted again (the same answer id) and recorded once.
    first = claim(run_id, "host-a")
    again: list[OutboxItem] = []
    await store.apply_events([first], again)
    await store.apply_events([first], again)
    assert [i.message.message_id for i in again] == [uuid.uuid5(first.message_id, "granted")] * 2
    assert [e.kind for e in await store.runs.events(run_id)].count("RunClaimed") == 4


async def test_a_lone_claim_that_races_a_change_of_its_run_is_decided_in_a_transaction(
    store: Database,
) -> None:
    """The run is canceled between the claim's read and its write: the write changes nothing,
    and the claim is then refused as the run now is."""
    run_id = await submitted(store)
    async with store.connections.connection() as canceling:
        async with canceling.transaction():
            await canceling.execute("UPDATE runs SET state = 'CANCELED' WHERE run_id = $1", run_id)
            async with store.connections.connection() as connection:
                pid = connection.get_server_pid()
                granting = asyncio.create_task(
                    events.grant_at_once(connection, claim(run_id, "host-a"))
                )

                async def waits_on_the_lock() -> bool:
                    event = await canceling.fetchval(
                        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid
                    )
                    return bool(event == "Lock")

                await eventually(waits_on_the_lock, what="the claim's write waiting on the run")
        assert await granting is None
    run = await store.runs.get(run_id)
    assert (run.state, run.agent_id) == (RunState.CANCELED, None)
    assert "RunClaimed" not in [e.kind for e in await store.runs.events(run_id)]
    answered: list[OutboxItem] = []
    await store.apply_events([claim(run_id, "host-a")], answered)
    [refused] = [i.message for i in answered]
    assert isinstance(refused, TerminateRun)
    assert refused.reason == "claim refused: the run ended CANCELED"


async def test_output_and_location_news_count_only_from_the_agent_they_concern(
    store: Database,
) -> None:
    """Any agent may publish output and a code server's news: a run's lines and progress
    are taken only from the agent that holds (or ran) its attempt, and a location's news only
    from an agent of its queue."""
    from schemas import LocationLoaded, ProgressItem, RunLog, RunProgress

    run_id = await submitted(store)
    await store.apply_events(
        [
            AgentHeartbeat(agent_id="host-a", sequence=1, queues=("default",)),
            AgentHeartbeat(agent_id="host-b", sequence=1, queues=("elsewhere",)),
            claim(run_id, "host-a"),
        ]
    )

    def output(agent: str, line: str) -> list[RunLog | RunProgress]:
        item = ProgressItem(line_no=0, event="log", message=line)
        return [
            RunLog(run_id=run_id, attempt=1, agent_id=agent, first_line=0, lines=(line,)),
            RunProgress(run_id=run_id, attempt=1, agent_id=agent, items=(item,)),
        ]

    await store.apply_events([*output("host-b", "forged"), *output("host-a", "real")])
    assert await store.output.lines(run_id) == [(1, 0, "real")]
    assert [p["message"] for p in await store.output.progress(run_id)] == ["real"]
    # Once the attempt is over, its lines come from the agent whose launch moved the run,
    # not from one whose claim was refused (refused claims are recorded too).
    launched = RunLaunched(
        run_id=run_id, attempt=1, agent_id="host-a", container_id="c" * 64, container_name="n"
    )
    await store.apply_events([launched, claim(run_id, "host-b")])
    await store.apply_events(
        [RunFailed(run_id=run_id, attempt=1, agent_id="host-a", reason=FailureReason.AGENT_LOST)]
    )
    assert (await store.runs.get(run_id)).attempt == 2  # retried: attempt 1 is over
    late = [
        RunLog(run_id=run_id, attempt=1, agent_id=agent, first_line=1, lines=(f"{agent} late",))
        for agent in ("host-b", "host-a")
    ]
    await store.apply_events(late)
    assert [line for _, _, line in await store.output.lines(run_id, attempt=1)] == [
        "real",
        "host-a late",
    ]

    location = await store.locations.put("loc", "img", queue="default")
    news = {"location": "loc", "generation": location.generation, "container_id": "c" * 64}
    await store.apply_events([LocationLoaded(agent_id="host-b", jobs=(), **news)])
    assert (await store.locations.get("loc")).status == "LOADING"
    await store.apply_events([LocationLoaded(agent_id="host-a", jobs=(), **news)])
    assert (await store.locations.get("loc")).status == "LOADED"


async def test_a_run_is_found_by_a_prefix_of_its_id_and_by_nothing_else(store: Database) -> None:
    """LIKE's wildcards are no prefix: '%abc' used to find the one run whose id held it."""
    from dispatcher.errors import RunNotFound

    run_id = await submitted(store)
    text = str(run_id)
    assert (await store.runs.find(text[:8])).run_id == run_id
    assert (await store.runs.find(text[:13].upper())).run_id == run_id
    for wild in ("%", f"%{text[9:13]}", f"{text[:3]}_", "_" * 8, text[:8] + "\\"):
        try:
            found = await store.runs.find(wild)
        except RunNotFound as exc:
            assert "is no run id, nor the start of one" in str(exc)
        else:
            raise AssertionError(f"{wild!r} found run {found.run_id}")


async def test_a_refused_second_publish_of_a_running_attempt_s_launch_fails_nothing(
    store: Database,
) -> None:
    """The LaunchRun of an attempt that runs is published again (its relay died before
    marking it sent) and the broker refuses it: the row is set aside, the run runs on."""
    running, waiting = await submitted(store), await submitted(store)
    await store.apply_events([claim(running, "host-a"), launched(running, "host-a")])
    await store.apply_events(
        [RunStarted(run_id=running, attempt=1, agent_id="host-a", container_id="a" * 64)]
    )
    async with store.connections.connection() as connection:
        await connection.execute("UPDATE outbox SET sent_at = NULL WHERE kind = 'LaunchRun'")

    async def refuse_all(rows: list[Any]) -> dict[int, str]:
        return {row.id: "NOT_FOUND - no queue" for row in rows}

    assert await store.publish_outbox(refuse_all) >= 2
    assert (await store.runs.get(running)).state == RunState.STARTED
    # A launch still waiting for its first publish fails as before.
    refused = await store.runs.get(waiting)
    assert (refused.state, refused.failure_reason) == (RunState.FAILURE, "LAUNCH_ERROR")
