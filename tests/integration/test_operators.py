"""Operators' commands against the real services: agents, alerts, dead letters."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

from dispatcher.states import RunState
from dispatcher.store import Database
from schemas.topology import REQUESTS_EXCHANGE, REQUESTS_ROUTING_KEY
from tests.integration.conftest import Stack
from tests.integration.test_crashes import publish_raw
from tests.integration.test_dispatch import wait_for_state
from tests.support import WebhookReceiver, eventually


async def dispatcher_cli(
    stack: Stack, *args: str, without: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``python -m dispatcher ARGS`` with the stack's settings, but the variables ``without``."""
    env = {k: v for k, v in stack._env_for_cli().items() if k not in without}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "dispatcher", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
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


async def test_a_location_update_keeps_what_it_is_not_given(stack: Stack, store: Database) -> None:
    name = f"kept-{uuid.uuid4().hex[:8]}"
    added = await dispatcher_cli(
        stack,
        *("locations", "add", name, "--image", stack.run_image, "--queue", stack.queue),
        *("--env", "TOKEN=secret:TOKEN", "--env", "MODE=fast", "--command", "hd-sdk"),
        *("--command", "serve"),
    )
    assert added.returncode == 0, added.stderr
    updated = await dispatcher_cli(stack, "locations", "update", name, "--image", "busybox:1")
    assert updated.returncode == 0, updated.stderr
    [location] = [loc for loc in await store.locations.all() if loc.name == name]
    assert (location.image, location.queue, location.generation) == ("busybox:1", stack.queue, 2)
    assert location.env == {"TOKEN": "secret:TOKEN", "MODE": "fast"}
    assert location.command == ["hd-sdk", "serve"]
    # What is given replaces what was: the queue, and the variables, all of them.
    updated = await dispatcher_cli(
        stack, "locations", "update", name, "--queue", "other", "--env", "MODE=slow"
    )
    assert updated.returncode == 0, updated.stderr
    [location] = [loc for loc in await store.locations.all() if loc.name == name]
    assert (location.image, location.queue, location.env) == (
        "busybox:1",
        "other",
        {"MODE": "slow"},
    )
    assert location.command == ["hd-sdk", "serve"]
    # Cleared on request: no variables, the image's own command.
    cleared = await dispatcher_cli(stack, "locations", "update", name, "--no-env", "--no-command")
    assert cleared.returncode == 0, cleared.stderr
    [location] = [loc for loc in await store.locations.all() if loc.name == name]
    assert (location.env, location.command, location.queue) == ({}, [], "other")
    both = await dispatcher_cli(stack, "locations", "update", name, "--env", "A=1", "--no-env")
    assert both.returncode == 2
    assert "give --env or --no-env, not both" in both.stderr
    missing = await dispatcher_cli(stack, "locations", "update", "nowhere", "--image", "busybox")
    assert missing.returncode != 0
    assert "no location 'nowhere'" in missing.stderr


async def test_database_mistakes_end_in_one_line(database_url: str) -> None:
    """A schema never upgraded, a database that does not exist, a URL that is not one: one
    line saying what is wrong, exit code 1, no traceback."""
    base, _, _ = database_url.rpartition("/")
    never = f"never_{uuid.uuid4().hex[:8]}"
    cases = [
        (("--database-url", database_url, "--database-schema", never), "dispatcher db upgrade"),
        (("--database-url", f"{base}/no_such_db_{never}"), "does not exist"),
        (
            ("--database-url", "postgresql://u:p@127.0.0.1:notaport/hd"),
            "database URL (postgresql://u:***@127.0.0.1:notaport/hd) is invalid",
        ),
        (
            ("--database-url", "postgresql://u:p@127.0.0.1:99999/hd"),
            "database URL (postgresql://u:***@127.0.0.1:99999/hd) is invalid",
        ),
    ]
    for options, words in cases:
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "dispatcher", "runs", "list", *options],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1, (options, result.stderr)
        assert words in result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
