"""The HTTP API against a real control plane, database, broker and engine: every endpoint,
pagination, filters, token scopes, bad input answered 4xx with the field named, and live
events resumable with Last-Event-ID across a restart of the web process."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest

from dispatcher.errors import RunNotFound
from dispatcher.settings import ImageNames
from dispatcher.states import RunState
from dispatcher.store import Database
from dispatcher.store.alerts import raise_alert
from schemas.topology import REQUESTS_EXCHANGE, REQUESTS_ROUTING_KEY
from tests.integration.conftest import Stack
from tests.integration.test_crashes import publish_raw
from tests.integration.test_dispatch import wait_for_state
from tests.integration.test_operators import dispatcher_cli
from tests.support import eventually


async def token(stack: Stack, name: str, scope: str, *limits: str) -> str:
    done = await dispatcher_cli(stack, "api-tokens", "add", name, "--scope", scope, *limits)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def submission(stack: Stack, **fields: Any) -> dict[str, Any]:
    return {
        "run_id": str(uuid.uuid4()),
        "image": stack.run_image,
        "command": ["sh", "-c", "echo one; echo two; echo three"],
        "queue": stack.queue,
        **fields,
    }


async def test_a_limited_token_submits_and_cancels_only_on_its_queues_and_locations(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    _, base = await stack.start_web()
    other_queue = f"{stack.queue}-other"
    team = bearer(await token(stack, "team-bot", "operate", "--queue", stack.queue))
    jobs_only = bearer(await token(stack, "jobs-bot", "admin", "--location", "etl"))
    anywhere = bearer(await token(stack, "ops-bot", "operate"))
    listed = await dispatcher_cli(stack, "api-tokens", "list", "--json")
    by_name = {t["name"]: t for t in json.loads(listed.stdout)}
    assert by_name["team-bot"]["queues"] == [stack.queue] and by_name["team-bot"]["locations"] == []
    assert by_name["jobs-bot"]["locations"] == ["etl"]
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        # Its own queue: accepted. Another: refused with the reason, and no run exists.
        mine = submission(stack, command=["sleep", "300"])
        accepted = await http.post("/runs", json=mine, headers=team)
        assert accepted.status_code == 202, accepted.text
        elsewhere = submission(stack, queue=other_queue)
        refused = await http.post("/runs", json=elsewhere, headers=team)
        assert refused.status_code == 403, refused.text
        assert f"may not submit to queue '{other_queue}'" in refused.text
        # A token limited to locations submits no run of an image, whatever its scope.
        plain = await http.post("/runs", json=submission(stack), headers=jobs_only)
        assert plain.status_code == 403 and "only jobs of its locations" in plain.text

        # Cancel: only runs it could have submitted; another is no run of its, as one that
        # does not exist.
        theirs = submission(stack, queue=other_queue, command=["sleep", "300"])
        assert (await http.post("/runs", json=theirs, headers=anywhere)).status_code == 202
        denied = await http.post(f"/runs/{theirs['run_id']}/cancel", json={}, headers=team)
        assert denied.status_code == 404 and f"no run {theirs['run_id']}" in denied.text
        denied = await http.post(f"/runs/{mine['run_id']}/cancel", json={}, headers=jobs_only)
        assert denied.status_code == 404 and f"no run {mine['run_id']}" in denied.text
        canceled = await http.post(f"/runs/{mine['run_id']}/cancel", json={}, headers=team)
        assert canceled.status_code == 202, canceled.text
    await wait_for_state(store, uuid.UUID(mine["run_id"]), RunState.CANCELED, timeout=60)
    assert (await store.runs.get(uuid.UUID(theirs["run_id"]))).state == RunState.QUEUED

    # Reading too: a limited token sees only the runs it could have submitted. Another's
    # run is not listed, its page and output are "no run", and its events are not streamed
    # (theirs came between mine's first events and its cancel).
    mine_id, theirs_id = uuid.UUID(mine["run_id"]), uuid.UUID(theirs["run_id"])
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        listed_ids = {r["run_id"] for r in (await http.get("/runs", headers=team)).json()["runs"]}
        assert listed_ids == {mine["run_id"]}
        everyone = {r["run_id"] for r in (await http.get("/runs", headers=anywhere)).json()["runs"]}
        assert {mine["run_id"], theirs["run_id"]} <= everyone
        assert (await http.get(f"/runs/{mine_id}", headers=team)).status_code == 200
        for path in (f"/runs/{theirs_id}", f"/runs/{theirs_id}/output"):
            hidden = await http.get(path, headers=team)
            assert hidden.status_code == 404 and f"no run {theirs_id}" in hidden.text, path
        none_of_theirs = await http.get("/runs", params={"queue": other_queue}, headers=team)
        assert none_of_theirs.json()["runs"] == []
        # Jobs only: no run of an image is its to read.
        assert (await http.get("/runs", headers=jobs_only)).json()["runs"] == []
        assert (await http.get(f"/runs/{mine_id}", headers=jobs_only)).status_code == 404
        mine_seqs = [e.seq for e in await store.runs.events(mine_id)]
        theirs_seqs = [e.seq for e in await store.runs.events(theirs_id)]
        assert min(theirs_seqs) < max(mine_seqs)
        streamed = await asyncio.wait_for(
            read_events(http, team, len(mine_seqs), last_event_id=0), 30
        )
        assert [seq for seq, _, _ in streamed] == mine_seqs
        assert {data["run_id"] for _, _, data in streamed} == {mine["run_id"]}
        theirs_only = await http.get("/events", params={"run_id": str(theirs_id)}, headers=team)
        assert theirs_only.status_code == 404
        # Nor through the agents' runs in flight, the alerts, or the dead letters.
        async with store.connections.connection() as connection:
            await connection.execute(
                "INSERT INTO agents (agent_id, in_flight) VALUES ('host-x', $1::jsonb)",
                json.dumps(
                    [
                        {"run_id": str(r), "attempt": 1, "state": "running"}
                        for r in (mine_id, theirs_id)
                    ]
                ),
            )
            for run_id in (mine_id, theirs_id):
                await raise_alert(connection, f"run-failed:{run_id}", "run_failed", "r", "x", {})
        [host] = [
            a for a in (await http.get("/agents", headers=team)).json() if a["agent_id"] == "host-x"
        ]
        assert [r["run_id"] for r in host["in_flight"]] == [mine["run_id"]]
        keys = {a["dedupe_key"] for a in (await http.get("/alerts", headers=team)).json()}
        assert f"run-failed:{mine_id}" in keys and f"run-failed:{theirs_id}" not in keys
        everyone_s = {a["dedupe_key"] for a in (await http.get("/alerts", headers=anywhere)).json()}
        assert f"run-failed:{theirs_id}" in everyone_s
        assert (await http.get("/dead-letters", headers=team)).status_code == 403
    with pytest.raises(RunNotFound):  # a refused submission makes no run
        await store.runs.get(uuid.UUID(elsewhere["run_id"]))


async def test_runs_are_submitted_listed_read_and_canceled_through_the_api(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_agent(0)
    _, base = await stack.start_web()
    operate = bearer(await token(stack, "ops-bot", "operate"))
    read = bearer(await token(stack, "viewer", "read"))
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        # Health needs no token; everything else does.
        assert (await http.get("/health")).json() == {"status": "ok"}
        # Every answer, a page's and its script's too, is never framed nor sniffed, and a
        # page runs only its own script.
        root = base.removesuffix("/api/v1")
        for url in (f"{base}/health", f"{root}/ui/login", f"{root}/ui/static/app.js"):
            headers = (await http.get(url)).headers
            assert headers["x-frame-options"] == "DENY", url
            assert headers["x-content-type-options"] == "nosniff", url
            assert "frame-ancestors 'none'" in headers["content-security-policy"], url
            assert "script-src" not in headers["content-security-policy"]  # default-src 'self'

        for path in ("/runs", "/agents", "/locations", "/alerts", "/limits", "/openapi.json"):
            answer = await http.get(path)
            assert answer.status_code == 401, (path, answer.text)
        assert (await http.get("/runs", headers=bearer("hdw_not-a-token"))).status_code == 401

        # The OpenAPI document describes the API.
        spec = (await http.get("/openapi.json", headers=read)).json()
        assert {"/api/v1/runs", "/api/v1/runs/{run_id}", "/api/v1/events"} <= set(spec["paths"])

        # Submit: a read token may not; an operate token may, and the run records who.
        body = submission(stack, tags={"team": "ml"}, env={"GREETING": "hello there"})
        refused = await http.post("/runs", json=body, headers=read)
        assert refused.status_code == 403 and "needs 'operate'" in refused.text
        accepted = await http.post("/runs", json=body, headers=operate)
        assert accepted.status_code == 202, accepted.text
        run_id = uuid.UUID(accepted.json()["run_id"])
        assert run_id == uuid.UUID(body["run_id"])
        await wait_for_state(store, run_id, RunState.SUCCESS, timeout=60)
        assert (await store.runs.get(run_id)).submitted_by == "ops-bot"

        # Read it back: the run, its history and its output, a page at a time.
        detail = (await http.get(f"/runs/{run_id}", headers=read)).json()
        assert detail["run"]["state"] == "SUCCESS" and detail["run"]["submitted_by"] == "ops-bot"
        assert [e["to_state"] for e in detail["events"] if e["to_state"]][-1] == "SUCCESS"
        # The submission's env: its names for a read token, its values from operate up.
        submitted = next(e for e in detail["events"] if "env" in e["payload"])
        assert submitted["payload"]["env"] == {"GREETING": "(hidden)"}
        as_operator = (await http.get(f"/runs/{run_id}", headers=operate)).json()
        submitted = next(e for e in as_operator["events"] if "env" in e["payload"])
        assert submitted["payload"]["env"] == {"GREETING": "hello there"}
        streamed = await asyncio.wait_for(
            read_events(http, read, 1, last_event_id=0, run_id=str(run_id)), 30
        )
        assert streamed[0][2]["payload"]["env"] == {"GREETING": "(hidden)"}

        async def output_lines() -> list[str]:
            lines, after = [], None
            while True:
                params = {"limit": 2, **({"after": after} if after else {})}
                page = (
                    await http.get(f"/runs/{run_id}/output", params=params, headers=read)
                ).json()
                lines += [line["line"] for line in page["lines"]]
                after = page["next_after"]
                if after is None:
                    return lines

        for _ in range(600):
            if await output_lines() == ["one", "two", "three"]:
                break
            await asyncio.sleep(0.1)
        assert await output_lines() == ["one", "two", "three"]

        # Cancel: a read token may not; a running run is canceled; a finished one says so.
        long = submission(stack, command=["sleep", "300"])
        await http.post("/runs", json=long, headers=operate)
        long_id = uuid.UUID(long["run_id"])
        await wait_for_state(store, long_id, RunState.STARTED, timeout=60)
        denied = await http.post(f"/runs/{long_id}/cancel", json={}, headers=read)
        assert denied.status_code == 403
        canceled = await http.post(f"/runs/{long_id}/cancel", json={"grace_s": 1}, headers=operate)
        assert canceled.status_code == 202 and canceled.json()["state"] in ("CANCELING", "CANCELED")
        await wait_for_state(store, long_id, RunState.CANCELED, timeout=60)
        finished = await http.post(f"/runs/{run_id}/cancel", json={}, headers=operate)
        assert finished.status_code == 409 and "has ended already: SUCCESS" in finished.text

        # The other listings answer.
        agents = (await http.get("/agents", headers=read)).json()
        assert [a["agent_id"] for a in agents] == [stack.agent_id(0)]
        assert (await http.get("/locations", headers=read)).json() == []
        assert (await http.get("/limits", headers=read)).json() == []
        assert isinstance((await http.get("/alerts", headers=read)).json(), list)
        missing = await http.get(f"/runs/{uuid.uuid4()}", headers=read)
        assert missing.status_code == 404

        # The same idempotency key again: answered with the run it named first.
        keyed = submission(stack, idempotency_key=f"nightly-{stack.unique}")
        first = (await http.post("/runs", json=keyed, headers=operate)).json()
        again = (
            await http.post("/runs", json={**keyed, "run_id": str(uuid.uuid4())}, headers=operate)
        ).json()
        assert first["status"] == "accepted"
        assert again == {"run_id": first["run_id"], "status": "existing"}

        # A revoked token is refused at once, and its open event stream ends.
        async with http.stream("GET", "/events", headers=read) as stream:
            assert stream.status_code == 200
            done = await dispatcher_cli(stack, "api-tokens", "revoke", "viewer")
            assert done.returncode == 0, done.stderr
            assert (await http.get("/runs", headers=read)).status_code == 401

            async def drained() -> None:
                async for _ in stream.aiter_lines():
                    pass

            await asyncio.wait_for(drained(), 30)  # the server ends it


async def test_bad_input_is_answered_4xx_with_the_field_named(stack: Stack) -> None:
    await stack.start_control_plane()
    _, base = await stack.start_web()
    operate = bearer(await token(stack, "ops", "operate"))
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        cases: list[tuple[str, str, Any, str]] = [
            ("post", "/runs", {"image": "busybox"}, "run_id"),
            ("post", "/runs", {**submission(stack), "queue": "no.dots"}, "queue"),
            ("post", "/runs", {**submission(stack), "memory_limit_mb": "lots"}, "memory_limit_mb"),
            ("post", "/runs", {**submission(stack), "priority": 5000}, "priority"),
            ("post", "/runs", {**submission(stack), "cpus": -1}, "cpus"),
            ("post", "/runs", "not json", ""),
            ("get", "/runs?state=SLEEPING", None, "state"),
            ("get", "/runs?limit=0", None, "limit"),
            ("get", "/runs?cursor=%%%", None, "cursor"),
            ("get", "/runs?since=yesterday", None, "since"),
            ("get", "/runs?tag=team", None, "tag"),
            ("get", "/runs?tag=k=%00", None, "tag"),
            ("get", "/runs?queue=%00", None, "queue"),
            ("get", "/runs?location=no.dots", None, "location"),
            ("get", "/runs?since=0001-01-01T00:00:00%2B05:00", None, "since"),
            ("get", f"/runs/{uuid.uuid4()}/output?attempt=99999999999", None, "attempt"),
            ("get", f"/runs/{uuid.uuid4()}/output?after=99999999999:1", None, "after"),
            ("get", "/events?last_event_id=9223372036854775808", None, "last_event_id"),
            ("get", "/events?last_event_id=-1", None, "last_event_id"),
            ("get", "/overview?hours=100000", None, "hours"),
            ("post", "/runs", "[" * 100_000, ""),
            ("get", f"/runs/{uuid.uuid4()}/output?after=x", None, ""),
            ("get", "/runs/not-a-uuid", None, ""),
        ]
        for method, path, body, field in cases:
            if method == "post":
                content = body if isinstance(body, str) else json.dumps(body)
                answer = await http.post(
                    path, content=content, headers={**operate, "content-type": "application/json"}
                )
            else:
                answer = await http.get(path, headers=operate)
            assert 400 <= answer.status_code < 500, (path, answer.status_code, answer.text)
            assert answer.headers["content-type"].startswith("application/json"), answer.text
            assert field in answer.text, (path, answer.text)
        for header in ("-7", "x", "99999999999999999999"):
            answer = await http.get("/events", headers={**operate, "Last-Event-ID": header})
            assert answer.status_code == 400 and "Last-Event-ID" in answer.text, answer.text


async def test_runs_are_filtered_and_paged(stack: Stack, store: Database) -> None:
    await stack.start_control_plane()  # no agent: the runs stay QUEUED
    _, base = await stack.start_web()
    read = bearer(await token(stack, "viewer", "read"))
    async with stack.client() as client:
        ml = [
            await client.submit(stack.run_image, ["true"], queue=stack.queue, tags={"team": "ml"})
            for _ in range(5)
        ]
        other = [
            await client.submit(stack.run_image, ["true"], queue=stack.queue) for _ in range(2)
        ]
    for run_id in [*ml, *other]:
        await wait_for_state(store, run_id, RunState.QUEUED, timeout=30)
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"tag": "team=ml", "limit": 2, "state": "queued"}
            if cursor:
                params["cursor"] = cursor
            page = (await http.get("/runs", params=params, headers=read)).json()
            assert len(page["runs"]) <= 2
            seen += [r["run_id"] for r in page["runs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == sorted(str(r) for r in ml) and len(seen) == len(set(seen))
        everything = (await http.get("/runs", params={"queue": stack.queue}, headers=read)).json()
        assert len(everything["runs"]) == 7 and everything["next_cursor"] is None
        created = [r["created_at"] for r in everything["runs"]]
        assert created == sorted(created, reverse=True)
        none = (await http.get("/runs", params={"queue": "elsewhere"}, headers=read)).json()
        assert none == {"runs": [], "next_cursor": None}


async def read_events(
    http: httpx.AsyncClient, headers: dict[str, str], count: int, **params: Any
) -> list[tuple[int, str, dict[str, Any]]]:
    """The first ``count`` events of the stream: (id, kind, data)."""
    found: list[tuple[int, str, dict[str, Any]]] = []
    async with http.stream("GET", "/events", params=params, headers=headers) as stream:
        assert stream.status_code == 200
        frame: dict[str, str] = {}
        async for line in stream.aiter_lines():
            if line == "":
                if "id" in frame:
                    found.append((int(frame["id"]), frame["event"], json.loads(frame["data"])))
                    if len(found) == count:
                        return found
                frame = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                frame[key] = value
    return found


async def test_events_resume_after_last_event_id_across_a_web_restart(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_agent(0)
    web, base = await stack.start_web()
    read = bearer(await token(stack, "viewer", "read"))
    async with stack.client() as client:
        first = await client.submit(stack.run_image, ["true"], queue=stack.queue)
    await wait_for_state(store, first, RunState.SUCCESS, timeout=60)
    history = await store.runs.events(first)
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        got = await asyncio.wait_for(
            read_events(http, read, 2, last_event_id=0, run_id=str(first)), 30
        )
    assert [seq for seq, _, _ in got] == [e.seq for e in history[:2]]
    last_seen = got[-1][0]

    # The web process goes away; runs go on; a new one serves whatever came since.
    web.stop()
    async with stack.client() as client:
        second = await client.submit(stack.run_image, ["true"], queue=stack.queue)
    await wait_for_state(store, second, RunState.SUCCESS, timeout=60)
    _, base = await stack.start_web()
    everything = [e.seq for e in await store.runs.events(first)] + [
        e.seq for e in await store.runs.events(second)
    ]
    missed = sorted(seq for seq in everything if seq > last_seen)
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        resumed = await asyncio.wait_for(
            read_events(http, {**read, "Last-Event-ID": str(last_seen)}, len(missed)),
            30,
        )
    assert [seq for seq, _, _ in resumed] == missed
    assert {data["run_id"] for _, _, data in resumed} == {str(first), str(second)}


async def test_locations_dead_letters_and_the_overview_through_the_api(
    stack: Stack, store: Database, images: ImageNames
) -> None:
    await stack.start_control_plane()
    await stack.start_agent(0, extra=("--location-check-interval", "0.5"))
    _, base = await stack.start_web()
    admin = bearer(await token(stack, "admin", "admin"))
    operate = bearer(await token(stack, "ops", "operate"))
    name = f"api-{stack.unique}"
    spec = {"image": images.example_location, "queue": stack.queue}
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        # Changing locations takes an admin token; bad specs are 4xx naming the field.
        denied = await http.post(f"/locations/{name}", json=spec, headers=operate)
        assert denied.status_code == 403 and "needs 'admin'" in denied.text
        bad = await http.post(f"/locations/{name}", json={**spec, "image": "UPPER:"}, headers=admin)
        assert bad.status_code == 400 and "image" in bad.text, bad.text
        added = await http.post(f"/locations/{name}", json=spec, headers=admin)
        assert added.status_code == 201, added.text
        assert (added.json()["status"], added.json()["generation"]) == ("LOADING", 1)
        again = await http.post(f"/locations/{name}", json=spec, headers=admin)
        assert again.status_code == 409 and "exists already" in again.text

        async def loaded() -> dict[str, Any] | None:
            found: dict[str, Any] = (await http.get(f"/locations/{name}", headers=operate)).json()
            return found if found["status"] == "LOADED" else None

        location = await eventually(loaded, 90, what="the location LOADED")
        assert {job["name"] for job in location["jobs"]} == {"hello", "count", "broken"}
        changed = await http.put(
            f"/locations/{name}", json={**spec, "env": {"GREETING": "hi"}}, headers=admin
        )
        assert changed.status_code == 200 and changed.json()["generation"] == 2
        # Its env: values from operate up, names only for a read token.
        viewer = bearer(await token(stack, "viewer", "read"))
        elsewhere = bearer(await token(stack, "elsewhere", "operate", "--location", "etl"))
        hidden = (await http.get(f"/locations/{name}", headers=elsewhere)).json()["env"]
        assert hidden == {"GREETING": "(hidden)"}  # not its location
        assert (await http.get(f"/locations/{name}", headers=operate)).json()["env"] == {
            "GREETING": "hi"
        }
        for listed in (
            (await http.get(f"/locations/{name}", headers=viewer)).json(),
            *(await http.get("/locations", headers=viewer)).json(),
        ):
            assert listed["env"] == {"GREETING": "(hidden)"}
        redeployed = await http.post(f"/locations/{name}/redeploy", headers=admin)
        assert redeployed.status_code == 202 and redeployed.json()["generation"] == 3
        audit = [(e["action"], e["actor"]) for e in await store.audit.recent(10)]
        assert ("location.add", "api:admin") in audit and (
            "location.redeploy",
            "api:admin",
        ) in audit
        assert (await http.delete(f"/locations/{name}", headers=admin)).status_code == 204
        assert (await http.get(f"/locations/{name}", headers=operate)).status_code == 404
        assert (await http.delete(f"/locations/{name}", headers=admin)).status_code == 404

        # A poison message shows among the dead letters, with its queue and reason.
        await publish_raw(stack.amqp_url, REQUESTS_EXCHANGE, REQUESTS_ROUTING_KEY, b"not a message")

        async def dead_letters() -> list[dict[str, Any]]:
            answer = await http.get("/dead-letters", headers=operate)
            assert answer.status_code == 200, answer.text
            found: list[dict[str, Any]] = answer.json()
            return found

        letters = await eventually(dead_letters, 30, what="the dead letter listed")
        assert [(d["source_queue"], d["body"]) for d in letters] == [
            ("hd.requests", "not a message")
        ]
        assert letters[0]["reason"]

        # The overview counts runs by state and their launch latency, from the stored events.
        async with stack.client() as client:
            run_id = await client.submit(stack.run_image, ["true"], queue=stack.queue)
        await wait_for_state(store, run_id, RunState.SUCCESS, timeout=60)
        overview = (await http.get("/overview", params={"hours": 1}, headers=operate)).json()
        assert sum(b["states"].get("SUCCESS", 0) for b in overview["buckets"]) == 1
        assert overview["launched"] == 1 and overview["launch_latency_s"]["p50"] > 0


async def test_a_webhook_s_url_is_shown_whole_to_an_admin_only(
    stack: Stack, store: Database
) -> None:
    """A Slack-style hook's path is its secret: anyone who has it may post."""
    hook = "https://hooks.example.com/services/T000/B000/XXXXSECRETXXXX"
    async with store.connections.transaction() as connection:
        assert await raise_alert(connection, f"test:{stack.unique}", "test", "x", "a test", {})
    await store.alerts.log_new([hook])
    _, base = await stack.start_web()
    admin = bearer(await token(stack, "admin", "admin"))
    operate = bearer(await token(stack, "ops", "operate"))
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        [seen] = (await http.get("/alerts", headers=admin)).json()
        assert [d["url"] for d in seen["deliveries"]] == [hook]
        answer = await http.get("/alerts", headers=operate)
        assert "SECRET" not in answer.text
        [seen] = answer.json()
        assert [d["url"] for d in seen["deliveries"]] == ["https://hooks.example.com/…"]


async def test_a_session_of_a_revoked_token_never_comes_back_with_its_name(store: Database) -> None:
    """A sign-in that raced a revoke left its session behind the revoke's delete; once a new
    token took the name, the old session read as the new token's (an admin's here)."""
    secret = await store.api_tokens.add("alice", "operate", "test")
    opened = await store.api_tokens.open_session(secret, 12.0)
    assert opened is not None
    session, _, _ = opened
    async with store.connections.connection() as connection:
        row = await connection.fetchrow("SELECT * FROM web_sessions WHERE token_name = 'alice'")
        assert await store.api_tokens.revoke("alice", "test")
        # What the race leaves: the session written after the revoke's delete.
        await connection.execute(
            "INSERT INTO web_sessions (digest, token_name, csrf, created_at, expires_at)"
            " VALUES ($1, $2, $3, $4, $5)",
            *(row[k] for k in ("digest", "token_name", "csrf", "created_at", "expires_at")),
        )
    assert await store.api_tokens.session(session) is None
    assert await store.api_tokens.open_session(secret, 12.0) is None
    await store.api_tokens.add("alice", "admin", "test")
    assert await store.api_tokens.session(session) is None
