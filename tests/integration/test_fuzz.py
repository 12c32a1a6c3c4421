"""Live fuzzing: thousands of hostile payloads into every exchange the system consumes.

Each payload must be dead-lettered once per queue it reached, with a reason; no process may
stop; and a normal run must still succeed afterwards.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter

import aio_pika
import aio_pika.exceptions

from dispatcher.states import RunState
from dispatcher.store import Database
from schemas import (
    AgentHeartbeat,
    ContainerState,
    LaunchRun,
    LocationSnapshot,
    LocationSpec,
    Message,
    RunFailed,
    RunLog,
    SubmitRun,
    TerminateRun,
    encode,
)
from schemas.topology import (
    CONTROL_EXCHANGE,
    INSTRUCTIONS_EXCHANGE,
    LOCATIONS_EXCHANGE,
    REQUESTS_EXCHANGE,
    REQUESTS_QUEUE,
    REQUESTS_ROUTING_KEY,
    STATUS_EXCHANGE,
    STATUS_MONITOR_QUEUE,
    STATUS_STORE_QUEUE,
    control_queue,
    instructions_queue,
)
from tests.integration.conftest import Stack
from tests.integration.test_dispatch import wait_for_state
from tests.support import eventually

PAYLOADS = 2100
#: Changes that make any message of the contract invalid, whatever its kind (only fields
#: every message has: an unknown field is ignored, by the forward-compatibility rule).
BREAKERS: list[dict[str, object]] = [
    {"message_id": 5},
    {"message_id": None},
    {"message_id": "x" * 5000},
    {"sent_at": "yesterday"},
    {"sent_at": "2026-11-27T10:00:00\ud800"},
    {"schema_version": 0},
    {"schema_version": 2**70},
    {"schema_version": 99},
    {"kind": 7},
    {"kind": "LaunchRocket"},
    {"zzz": "a\u0000b"},
]


def valid_messages(stack: Stack, agent_id: str) -> dict[str, list[Message]]:
    """One valid message of each family, to break or to send to the wrong place."""
    run_id = uuid.uuid4()
    return {
        "request": [SubmitRun(run_id=run_id, image=stack.run_image, queue=stack.queue)],
        "instruction": [
            LaunchRun(run_id=run_id, attempt=1, image=stack.run_image, command=("true",)),
            TerminateRun(run_id=run_id, attempt=1),
        ],
        "event": [
            RunFailed(run_id=run_id, attempt=1, reason="EXIT_CODE", agent_id=agent_id),  # type: ignore[arg-type]
            RunLog(run_id=run_id, attempt=1, agent_id=agent_id, first_line=0, lines=("x",)),
            AgentHeartbeat(
                agent_id=agent_id,
                sequence=1,
                in_flight=(ContainerState(run_id=run_id, attempt=1, state="running"),),
            ),
        ],
        "snapshot": [
            LocationSnapshot(
                queue=stack.queue,
                locations=(LocationSpec(name="loc", image=stack.run_image),),
            )
        ],
    }


def hostile_payloads(rng: random.Random, own: list[Message], foreign: list[Message]) -> bytes:
    """One hostile payload for a queue whose own messages are ``own``."""
    valid = json.loads(encode(rng.choice(own)))
    choice = rng.randrange(5)
    if choice == 0:  # noise
        return rng.randbytes(rng.randrange(0, 200))
    if choice == 1:  # a valid message cut short
        encoded = encode(rng.choice(own))
        return encoded[: rng.randrange(0, len(encoded))]
    if choice == 2:  # deep nesting, in a known field or an unknown one
        field = rng.choice(["config", "zzz", "in_flight", "command", "lines"])
        depth = rng.choice([5_000, 50_000])
        nested = "[" * depth + "]" * depth
        return (
            json.dumps({**valid, field: 0})
            .replace(f'"{field}": 0', f'"{field}": {nested}')
            .encode()
        )
    if choice == 3:  # a message of another family
        return encode(rng.choice(foreign))
    return json.dumps({**valid, **rng.choice(BREAKERS)}).encode()  # wrong types and values


async def test_thousands_of_hostile_payloads_are_each_dead_lettered_once(
    stack: Stack, store: Database
) -> None:
    processes = [
        await stack.start_control_plane(),
        await stack.start_monitor(),
        await stack.start_agent(),
    ]
    agent_id = stack.agent_id(0)
    messages = valid_messages(stack, agent_id)

    def family(name: str) -> tuple[list[Message], list[Message]]:
        foreign = [m for other, ms in messages.items() if other != name for m in ms]
        return messages[name], foreign

    run = uuid.uuid4()
    # (exchange, routing key, family, the queues that consume what it routes)
    targets: list[tuple[str, str, str, tuple[str, ...]]] = [
        (REQUESTS_EXCHANGE, REQUESTS_ROUTING_KEY, "request", (REQUESTS_QUEUE,)),
        (STATUS_EXCHANGE, f"run.failed.{agent_id}.{run}", "event", (STATUS_STORE_QUEUE,)),
        (
            STATUS_EXCHANGE,
            f"agent.heartbeat.{agent_id}",
            "event",
            (STATUS_STORE_QUEUE, STATUS_MONITOR_QUEUE),
        ),
        (STATUS_EXCHANGE, f"location.loaded.{agent_id}", "event", (STATUS_STORE_QUEUE,)),
        (INSTRUCTIONS_EXCHANGE, stack.queue, "instruction", (instructions_queue(stack.queue),)),
        (CONTROL_EXCHANGE, agent_id, "instruction", (control_queue(agent_id),)),
        (LOCATIONS_EXCHANGE, stack.queue, "snapshot", ("locations",)),
    ]
    rng = random.Random(20261127)
    expected: Counter[str] = Counter()
    unroutable = returned = 0
    connection = await aio_pika.connect(stack.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchanges = {
            name: await channel.get_exchange(name, ensure=False) for name in {t[0] for t in targets}
        }
        for n in range(PAYLOADS):
            exchange, key, name, queues = targets[n % len(targets)]
            body = hostile_payloads(rng, *family(name))
            await exchanges[exchange].publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), key
            )
            expected.update(queues)
        # Unroutable ones are returned by the broker, not lost quietly.
        strict = await connection.channel(publisher_confirms=True, on_return_raises=True)
        instructions = await strict.get_exchange(INSTRUCTIONS_EXCHANGE, ensure=False)
        for _ in range(20):
            unroutable += 1
            try:
                await instructions.publish(aio_pika.Message(b"{}"), "no-such-queue", mandatory=True)
            except aio_pika.exceptions.DeliveryError:
                returned += 1
    assert returned == unroutable

    named = set(expected) - {"locations"}

    async def counted() -> Counter[str]:
        found: Counter[str] = Counter()
        for row in await store.dead_letters.counts():
            source = row["source_queue"]
            found[source if source in named else "locations"] += row["total"]
        return found

    async def all_counted() -> bool:
        return await counted() == expected

    await eventually(all_counted, 240, interval=1.0, what=f"dead letters {expected}")
    print("dead letters by queue:", dict(await counted()), "unroutable:", unroutable)

    # Nothing stopped, and the system still works end to end.
    for proc in processes:
        assert proc.process is not None and proc.process.poll() is None, proc.output()[-2000:]
    async with stack.client() as client:
        run_id = await client.submit(stack.run_image, ["true"], queue=stack.queue)
    assert (await wait_for_state(store, run_id, RunState.SUCCESS)).state == RunState.SUCCESS
