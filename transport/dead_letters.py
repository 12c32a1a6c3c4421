"""Reading the operators' dead-letter queue without taking anything out of it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import aio_pika.abc

from schemas.topology import DEAD_LETTER_QUEUE, DEAD_LETTER_QUEUE_HEADER, DEAD_LETTER_REASON_HEADER

from .connection import TRANSIENT
from .errors import BrokerUnavailable


@dataclass(frozen=True)
class DeadLetter:
    """A message in the dead-letter queue, as an operator sees it."""

    source_queue: str
    reason: str
    message_id: str | None
    body: bytes


async def peek_dead_letters(
    connection: aio_pika.abc.AbstractConnection, limit: int
) -> list[DeadLetter]:
    """Up to ``limit`` dead letters, oldest first, left in the queue."""
    channel = await connection.channel()
    try:
        # Looked up, not declared: a reader needs no configure permission (the web's
        # identity has none), and this channel is closed before any reconnect.
        queue = await channel.get_queue(DEAD_LETTER_QUEUE, ensure=True)
        found: list[DeadLetter] = []
        # Taken without acking, then all returned at once: nothing is lost or reordered.
        while len(found) < limit:
            message = await queue.get(no_ack=False, fail=False, timeout=5)
            if message is None:
                break
            headers = message.headers or {}
            found.append(
                DeadLetter(
                    str(headers.get(DEAD_LETTER_QUEUE_HEADER, "?")),
                    str(headers.get(DEAD_LETTER_REASON_HEADER, "")),
                    message.message_id,
                    message.body,
                )
            )
        return found
    except TRANSIENT as exc:
        raise BrokerUnavailable(f"cannot read the dead-letter queue: {exc!r}") from exc
    finally:
        with contextlib.suppress(*TRANSIENT):
            await channel.close()  # unacked messages go back to the queue, in order
