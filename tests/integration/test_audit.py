"""The audit log: operator actions on locations and agent identities, with who and when."""

from __future__ import annotations

import getpass
import json
import socket

from dispatcher.store import Database
from tests.integration.conftest import Stack
from tests.integration.test_operators import dispatcher_cli


async def test_operator_actions_are_recorded_with_who_and_never_a_secret(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    agent_id = stack.agent_id(0)
    steps = [
        ("locations", "add", "audited", "--image", stack.run_image, "--queue", stack.queue),
        ("locations", "redeploy", "audited"),
        ("agents", "add", agent_id, "--queue", stack.queue),
        ("agents", "rotate", agent_id),
        ("agents", "revoke", agent_id),
        ("locations", "remove", "audited"),
    ]
    secrets = []
    for args in steps:
        done = await dispatcher_cli(stack, *args)
        assert done.returncode == 0, (args, done.stderr)
        if args[:2] in (("agents", "add"), ("agents", "rotate")):
            secrets.append(done.stdout.strip().split(":")[2].split("@")[0])
    listed = await dispatcher_cli(stack, "audit", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = list(reversed(json.loads(listed.stdout)))
    assert [(e["action"], e["subject"]) for e in entries] == [
        ("location.add", "audited"),
        ("location.redeploy", "audited"),
        ("agent.add", agent_id),
        ("agent.rotate", agent_id),
        ("agent.revoke", agent_id),
        ("location.remove", "audited"),
    ]
    assert {e["actor"] for e in entries} == {f"{getpass.getuser()}@{socket.gethostname()}"}
    assert entries[0]["details"]["image"] == stack.run_image
    assert entries[2]["details"] == {"queues": [stack.queue]}
    assert len(secrets) == 2 and all(len(s) >= 24 for s in secrets)
    assert not any(s in listed.stdout for s in secrets)
    assert [e["action"] for e in await store.audit.recent(2)] == ["location.remove", "agent.revoke"]
