"""The web process's way to the broker: one client connection that publishes submissions and
cancels; their answers are read back from PostgreSQL, never from the status stream (the web
process needs no queue of its own on the broker)."""

from __future__ import annotations

import uuid

from schemas import SubmitRun
from transport.dead_letters import DeadLetter

from ..client import Client


class Broker:
    def __init__(self, client: Client) -> None:
        self._client = client

    async def submit(self, submission: SubmitRun) -> None:
        await self._client.send(submission)

    async def cancel(self, run_id: uuid.UUID, grace_s: float, reason: str) -> None:
        await self._client.cancel(run_id, grace_s, reason)

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        return await self._client.dead_letters(limit)
