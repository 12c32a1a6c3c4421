"""Operators' commands against the real services: agents, alerts, dead letters."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from dispatcher.states import RunState
from dispatcher.store import Database
from schemas.topology import REQUESTS_EXCHANGE, REQUESTS_ROUTING_KEY
from tests.integration.conftest import Stack
from tests.integration.test_crashes import publish_raw
from tests.integration.test_dispatch import wait_for_state
from tests.support import WebhookReceiver, eventually


async def dispatcher_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "dispatcher", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=stack._env_for_cli(),
    )


async def test_agents_alerts_and_dead_letters_are_listed(stack: Stack, store: Database) -> None:
    webhook = WebhookReceiver()
    try:
        await stack.start_control_plane()
        await stack.start_monitor(("--webhook", webhook.url))
        await stack.start_agent()
        async with stack.client() as client:
            run_id = await client.submit(stack.run_image, ["sh", "-c", "exit 2"], queue=stack.queue)
        await wait_for_state(store, run_id, RunState.FAILURE)
        await eventually(lambda: _now(bool(webhook.received)), 60, what="the alert delivered")
    finally:
        webhook.close()
    await publish_raw(stack.amqp_url, REQUESTS_EXCHANGE, REQUESTS_ROUTING_KEY, b"not a message")

    agents = await dispatcher_cli(stack, "agents", "list", "--json")
    assert agents.returncode == 0, agents.stderr
    [agent] = json.loads(agents.stdout)
    assert (agent["agent_id"], agent["status"], agent["queues"]) == (
        stack.agent_id(),
        "ALIVE",
        [stack.queue],
    )

    alerts = await dispatcher_cli(stack, "alerts", "list")
    assert alerts.returncode == 0, alerts.stderr
    assert f"run {run_id} failed on attempt 1: EXIT_CODE (exit code 2)" in alerts.stdout
    assert f"delivered to {webhook.url} after 1 try(s)" in alerts.stdout

    async def dead_letter_listed() -> str:
        listed = await dispatcher_cli(stack, "dead-letters", "list")
        return listed.stdout if "from hd.requests" in listed.stdout else ""

    text = await eventually(dead_letter_listed, 30, what="the dead letter listed")
    assert "not a message" in text
    # Listing leaves them where they are.
    again = await dispatcher_cli(stack, "dead-letters", "list", "--json")
    assert [d["body"] for d in json.loads(again.stdout)] == ["not a message"]


async def _now(value: object) -> object:
    return value
