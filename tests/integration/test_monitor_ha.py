"""Alerts once per incident, a standby monitor that takes over, and metrics."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator

import pytest

from dispatcher.states import RunState
from dispatcher.store import Database
from schemas.topology import (
    DEAD_LETTER_QUEUE_HEADER,
    INSTRUCTIONS_EXCHANGE,
    REQUESTS_EXCHANGE,
    REQUESTS_QUEUE,
    REQUESTS_ROUTING_KEY,
    instructions_queue,
)
from tests.integration.conftest import Stack
from tests.integration.test_crashes import publish_raw
from tests.integration.test_dispatch import wait_for_state
from tests.integration.test_load_and_poison import dead_letters
from tests.integration.test_monitor import runs_on
from tests.support import Proc, WebhookReceiver, eventually


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


async def test_one_alert_per_incident_across_a_monitor_restart(
    stack: Stack, store: Database, webhook: WebhookReceiver
) -> None:
    await stack.start_control_plane()
    monitor = await stack.start_monitor(("--webhook", webhook.url))
    agent = await stack.start_agent()
    async with stack.client() as client:
        failing = await client.submit(stack.run_image, ["sh", "-c", "exit 3"], queue=stack.queue)
    await wait_for_state(store, failing, RunState.FAILURE)
    # An agent goes down, and comes back.
    agent.kill()
    await eventually(
        lambda: _async(f"agent-down:{stack.agent_id()}" in " ".join(webhook.incidents())),
        60,
        what="the agent-down alert delivered",
    )
    await stack.start_agent()
    await eventually(
        lambda: _async(f"agent-back:{stack.agent_id()}" in " ".join(webhook.incidents())),
        60,
        what="the agent-back alert delivered",
    )
    # The monitor restarts; it must not alert again for what it already reported.
    assert monitor.stop() == 0
    await stack.start_monitor(("--webhook", webhook.url))
    async with stack.client() as client:
        marker = await client.submit(stack.run_image, ["sh", "-c", "exit 4"], queue=stack.queue)
    # Alerts go out in the order they were raised: once the new one is in, a repeat of an
    # old one would have been too.
    await eventually(
        lambda: _async(f"run-failed:{marker}" in webhook.incidents()), 60, what="the new alert"
    )
    counts = Counter(webhook.incidents())
    assert counts[f"run-failed:{failing}"] == 1
    assert [k for k, n in counts.items() if n > 1] == []
    kinds = Counter(alert["kind"] for alert in webhook.received)
    assert kinds == {"run_failed": 2, "agent_down": 1, "agent_back": 1}
    failed = next(a for a in webhook.received if a["incident"] == f"run-failed:{failing}")
    assert failed["details"]["exit_code"] == 3


async def test_a_standby_monitor_takes_over_when_the_active_one_dies(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    active = await stack.start_monitor()
    await stack.start_monitor(wait_active=False)
    standby = stack.processes[-1]
    agent = await stack.start_agent(0)
    async with stack.client() as client:
        run_id = await client.submit(stack.run_image, ["sleep", "60"], queue=stack.queue)
    await eventually(lambda: runs_on(store, [run_id], stack.agent_id(0), 1), 60, what="running")

    killed_at = time.monotonic()
    active.kill()
    await standby.wait_for_output("this monitor is active", timeout=60)
    print(f"standby active {time.monotonic() - killed_at:.2f} s after the kill")
    # And it acts: the agent's loss is detected and its run retried elsewhere.
    await stack.start_agent(1)
    agent.kill()
    await eventually(lambda: runs_on(store, [run_id], stack.agent_id(1), 2), 60, what="retried")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_every_process_serves_prometheus_metrics(stack: Stack, store: Database) -> None:
    ports = {name: _free_port() for name in ("serve", "monitor", "agent")}
    env = stack._env()
    procs = [
        Proc(
            "dispatcher",
            ["serve", "--metrics-port", str(ports["serve"])],
            stack.logs / "m-serve.log",
            env,
        ),
        Proc(
            "dispatcher",
            ["monitor", "--metrics-port", str(ports["monitor"])],
            stack.logs / "m-monitor.log",
            env,
        ),
        Proc(
            "worker_agent",
            [
                "run",
                "--queue",
                stack.queue,
                "--agent-id",
                stack.agent_id(),
                "--metrics-port",
                str(ports["agent"]),
                "--heartbeat-interval",
                "0.5",
            ],
            stack.logs / "m-agent.log",
            env,
        ),
    ]
    stack.agent_ids.add(stack.agent_id())
    for proc in procs:
        stack.processes.append(proc.start())
    await procs[1].wait_for_output("this monitor is active", 60)
    await procs[2].wait_for_output("consuming", 60)
    async with stack.client() as client:
        run_id = await client.submit(stack.run_image, ["true"], queue=stack.queue)
    await wait_for_state(store, run_id, RunState.SUCCESS)
    # One poison message for the control plane's intake, one for the agent's instructions:
    # each side counts the message it dead-lettered.
    await publish_raw(stack.amqp_url, REQUESTS_EXCHANGE, REQUESTS_ROUTING_KEY, b"not json")
    await publish_raw(stack.amqp_url, INSTRUCTIONS_EXCHANGE, stack.queue, b"not json")
    held: list[str] = []

    async def both_dead_lettered() -> bool:
        held.extend(
            str(m.headers[DEAD_LETTER_QUEUE_HEADER]) for m in await dead_letters(stack.amqp_url)
        )
        return len(held) >= 2

    await eventually(both_dead_lettered, 60, interval=0.3, what="two dead letters")
    assert sorted(held) == sorted([REQUESTS_QUEUE, instructions_queue(stack.queue)])

    def scrape(port: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return response.read().decode()

    async def agents_alive() -> bool:
        return "hd_agents_alive 1.0" in scrape(ports["monitor"])

    await eventually(agents_alive, 30, what="the monitor counting one live agent")
    assert "hd_launches_total 1.0" in scrape(ports["agent"])
    assert "hd_launches_total 1.0" in scrape(ports["serve"])
    assert 'hd_failure_detection_seconds_count{kind="container_exit"} 1.0' in scrape(ports["agent"])
    requests_dead = f'hd_messages_dead_lettered_total{{queue="{REQUESTS_QUEUE}"}} 1.0'
    assert requests_dead in scrape(ports["serve"])
    agent_dead = f'hd_messages_dead_lettered_total{{queue="{instructions_queue(stack.queue)}"}} 1.0'
    assert agent_dead in scrape(ports["agent"])

    async def runs_counted() -> bool:
        return 'hd_runs{state="SUCCESS"} 1.0' in scrape(ports["monitor"])

    await eventually(runs_counted, 30, what="runs by state")


async def _async(value: object) -> object:
    return value
