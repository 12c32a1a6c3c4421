"""Forgeries by identities with least privilege: what the broker cannot stop, the readers do
(real RabbitMQ and PostgreSQL)."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika

from dispatcher.store import Database
from dispatcher.submitters import Limits
from schemas import AgentHeartbeat, RunRejected, SubmitRun, encode
from schemas.topology import STATUS_EXCHANGE, STATUS_STORE_QUEUE
from tests.integration.conftest import Stack
from tests.integration.test_identities import add_identity
from tests.support import eventually


async def test_a_status_event_routed_around_the_topic_permissions_is_refused(
    stack: Stack, store: Database
) -> None:
    """An agent may configure ``amq_<hex>`` names (meant for its private queues) and write to
    hd.status: it can declare an exchange of that name, bind hd.status to it (exchange.bind
    checks topic permissions on the source only) and publish any routing key through it. The
    broker cannot stop that; the readers refuse what carries no user_id, or another's."""
    await stack.start_control_plane()
    attacker, victim = stack.agent_id(7), stack.agent_id(8)
    url = await add_identity(stack, attacker)

    operator = await aio_pika.connect(stack.amqp_url, timeout=10)
    evil = await aio_pika.connect(url, timeout=10)
    try:
        watch = await operator.channel()
        status = await watch.get_exchange(STATUS_EXCHANGE, ensure=False)
        seen = await watch.declare_queue(exclusive=True)
        await seen.bind(status, f"agent.heartbeat.{victim}")

        channel = await evil.channel(publisher_confirms=True)
        relay = await channel.declare_exchange(
            f"amq_{uuid.uuid4().hex}", aio_pika.ExchangeType.FANOUT, auto_delete=True
        )
        hd_status = await channel.get_exchange(STATUS_EXCHANGE, ensure=False)
        await hd_status.bind(relay, "")  # destination hd.status, source the agent's exchange
        forged = AgentHeartbeat(agent_id=victim, sequence=10**9, queues=(stack.queue,))
        await relay.publish(aio_pika.Message(encode(forged)), f"agent.heartbeat.{victim}")
        signed = AgentHeartbeat(agent_id=victim, sequence=10**9 + 1, queues=(stack.queue,))
        await relay.publish(
            aio_pika.Message(encode(signed), user_id=attacker), f"agent.heartbeat.{victim}"
        )
        # Both reach the status exchange under the victim's key ...
        assert await _next(seen) is not None and await _next(seen) is not None
    finally:
        await evil.close()
        await operator.close()

    # ... and the control plane refuses both, with the reason (each is counted as it comes:
    # wait for both).
    async def both_refused() -> dict[str, int] | None:
        counts = {
            str(c["source_queue"]): int(c["total"]) for c in await store.dead_letters.counts()
        }
        return counts if counts.get(STATUS_STORE_QUEUE, 0) >= 2 else None

    counts = await eventually(both_refused, 30, what="both forged heartbeats dead-lettered")
    assert counts.get(STATUS_STORE_QUEUE) == 2, counts
    reasons = [str(c["last_reason"]) for c in await store.dead_letters.counts()]
    assert any("no user_id" in r or f"not by agent '{victim}'" in r for r in reasons), reasons
    assert victim not in [a["agent_id"] for a in await store.agents.all()]


async def _next(queue: aio_pika.abc.AbstractQueue) -> object:
    for _ in range(300):
        message = await queue.get(fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.1)
    return None


async def test_a_refused_submission_does_not_answer_for_someone_elses_run(
    store: Database,
) -> None:
    """A token's job submission with another run's id and a job that does not exist: no
    RunRejected goes out for the victim's run, which a waiter would take for its own end."""
    await store.submitters.register("op", "team-a", Limits(queues=("default",)))
    await store.submitters.register("op", "team-b", Limits())
    victim = SubmitRun(run_id=uuid.uuid4(), image="busybox", command=("sleep", "9"))
    assert await store.accept_submissions([victim], ["team-a"]) == [victim.run_id]

    forged = SubmitRun(run_id=victim.run_id, location="nowhere", job="x")
    await store.accept_submissions([forged], ["team-b"])
    async with store.connections.connection() as connection:
        kinds = await connection.fetch(
            "SELECT kind FROM outbox WHERE run_id = $1 AND kind = 'RunRejected'", victim.run_id
        )
    assert kinds == [], "a RunRejected was queued for another submitter's existing run"

    # Nor when the forged submission cannot even be decoded (refused from its bare run id),
    # where a refusal for an unknown run is kept, once.
    assert not await store.runs.refuse_unknown(victim.run_id, "x")
    unknown = RunRejected(run_id=uuid.uuid4(), reason="undecodable")
    assert await store.runs.refuse_unknown(unknown.run_id, unknown.reason)
    # A sender repeating a poisoned submission adds no row: one refusal a run id.
    assert not await store.runs.refuse_unknown(unknown.run_id, "undecodable, again")
    async with store.connections.connection() as connection:
        counts = await connection.fetch(
            "SELECT run_id, count(*) AS n FROM outbox WHERE kind = 'RunRejected'"
            " AND run_id = ANY($1::uuid[]) GROUP BY run_id",
            [victim.run_id, unknown.run_id],
        )
    assert {(row["run_id"], row["n"]) for row in counts} == {(unknown.run_id, 1)}
