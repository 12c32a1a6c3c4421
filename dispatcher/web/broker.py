"""The web process's way to the broker: one client connection that publishes submissions and
cancels, and nothing else; their answers, like everything the web shows, are read back from
PostgreSQL (the web process reads no queue on the broker)."""

from __future__ import annotations

import uuid

from schemas import SubmitRun

from ..client import Client


class Broker:
    def __init__(self, client: Client) -> None:
        self._client = client

    async def submit(self, submission: SubmitRun) -> None:
        await self._client.send(submission)

    async def cancel(self, run_id: uuid.UUID, grace_s: float, reason: str) -> None:
        await self._client.cancel(run_id, grace_s, reason)
