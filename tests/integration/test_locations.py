"""Code locations: registered in the control plane, kept as code servers by agents."""

from __future__ import annotations

import asyncio
import signal
import urllib.parse

import docker
import pytest

from dispatcher.settings import ImageNames
from dispatcher.store import Database, Location
from dispatcher.store.locations import Locations
from tests.integration.conftest import Stack
from tests.integration.test_faults import close_connections
from tests.support import eventually, management_request
from worker_agent.code_servers import LABEL_LOCATION


@pytest.fixture
def locations(store: Database) -> Locations:
    return store.locations


def servers_of(stack: Stack, name: str) -> list[docker.models.containers.Container]:
    return stack.docker.containers.list(
        filters={"label": f"{LABEL_LOCATION}={name}"}, ignore_removed=True
    )


async def loaded(locations: Locations, name: str, after: object = None) -> Location | None:
    location = await locations.get(name)
    if location.status != "LOADED":
        return None
    if after is not None and location.loaded_at is not None and location.loaded_at <= after:
        return None
    return location


async def test_a_snapshot_asked_for_during_an_addition_is_not_sent_after_it_without_it(
    store: Database, locations: Locations, unique: str
) -> None:
    from dispatcher.store.locations import snapshot
    from schemas import AgentHeartbeat, Decoder, LocationSnapshot

    queue, name = f"q-{unique}", f"added-{unique}"
    # An agent of the queue (the snapshots of queues no agent has, nor any location, are
    # not sent when asked for).
    await store.apply_events([AgentHeartbeat(agent_id=f"a-{unique}", sequence=1, queues=(queue,))])
    async with store.connections.transaction() as adding:
        # An addition, written but not yet committed, with its snapshot in the outbox ...
        await adding.execute(
            "INSERT INTO code_locations (name, image, command, env, queue)"
            " VALUES ($1, 'busybox', '[]', '{}', $2)",
            name,
            queue,
        )
        await snapshot(adding, {queue})
        # ... while an agent of the queue asks for its snapshot.
        asking = asyncio.create_task(locations.wanted([queue]))
        await asyncio.sleep(0.5)
        assert not asking.done(), "the asked-for snapshot did not wait for the addition"
    await asking

    async with store.connections.connection() as connection:
        payloads = await connection.fetch(
            "SELECT payload FROM outbox WHERE kind = 'LocationSnapshot' AND routing_key = $1"
            " ORDER BY id",
            queue,
        )
    decoder = Decoder(LocationSnapshot)
    sent = [decoder.decode(row["payload"]) for row in payloads]
    assert len(sent) == 2
    # The one sent last is the newest, and it has the location.
    assert sent[0].revision < sent[1].revision
    assert [spec.name for spec in sent[1].locations] == [name]


async def test_a_location_is_served_kept_and_removed(
    stack: Stack, locations: Locations, images: ImageNames
) -> None:
    await stack.start_control_plane()
    agent = await stack.start_agent(extra=("--location-check-interval", "0.5"))
    name = f"hello-{stack.unique}"
    added = await locations.put(name, images.example_location, queue=stack.queue)
    assert added.status == "LOADING"

    # Its server runs on the agent's host and its definitions reach PostgreSQL.
    location = await eventually(lambda: loaded(locations, name), 60, what="LOADED")
    assert {job["name"] for job in location.jobs} == {"hello", "count", "broken"}
    hello = next(job for job in location.jobs if job["name"] == "hello")
    assert hello["config_schema"]["required"] == ["name"]
    [server] = servers_of(stack, name)

    # The agent restarts: the healthy server is adopted, not redeployed.
    assert agent.stop() == 0
    await stack.start_agent(extra=("--location-check-interval", "0.5"))
    before = location.loaded_at
    await eventually(lambda: loaded(locations, name, after=before), 60, what="reported again")
    assert [c.id for c in servers_of(stack, name)] == [server.id]

    # The server is killed: a new one is started and the location is loaded again.
    before = (await locations.get(name)).loaded_at
    server.kill()
    await eventually(lambda: loaded(locations, name, after=before), 60, what="redeployed")
    [replacement] = servers_of(stack, name)
    assert replacement.id != server.id

    # Removed: its server goes.
    await locations.remove(name)

    async def gone() -> bool:
        return servers_of(stack, name) == []

    await eventually(gone, 60, what="the code server removed")


async def test_a_snapshot_sent_while_the_agent_was_cut_off_is_asked_for_again(
    stack: Stack,
    store: Database,
    locations: Locations,
    images: ImageNames,
    broker: tuple[str, str],
) -> None:
    """The agent's snapshot queue goes with its connection; a location added while the
    connection is down reaches the agent all the same: it asks again once back."""
    management = broker[1]
    assert management, "this test needs the broker's management API"
    vhost = urllib.parse.urlsplit(stack.amqp_url).path.lstrip("/")
    await stack.start_control_plane()
    agent = await stack.start_agent(extra=("--location-check-interval", "0.5"))

    async def agents() -> list[str]:
        listing = management_request(management, "GET", "/api/connections")
        return [
            c["name"]
            for c in listing
            if c.get("vhost") == vhost
            and str((c.get("client_properties") or {}).get("connection_name", "")).startswith(
                "worker-agent "
            )
        ]

    cut = await eventually(agents, 30, what="the agent's connection listed")
    # Frozen, the agent cannot reconnect while the location is added: its snapshot goes out
    # while the agent has no snapshot queue.
    agent.signal(signal.SIGSTOP)
    try:
        close_connections(management, cut)

        async def gone() -> bool:
            return not set(cut) & set(await agents())

        await eventually(gone, 30, what="the agent's connection closed")
        name = f"late-{stack.unique}"
        await locations.put(name, images.example_location, queue=stack.queue)

        async def sent() -> bool:
            async with store.connections.connection() as connection:
                unsent = await connection.fetchval(
                    "SELECT count(*) FROM outbox WHERE kind = 'LocationSnapshot'"
                    " AND sent_at IS NULL"
                )
            return unsent == 0

        await eventually(sent, 30, what="the snapshot published")
    finally:
        agent.signal(signal.SIGCONT)
    await agent.wait_for_output("asking for the snapshots again", timeout=60)
    await eventually(lambda: loaded(locations, name), 90, what="LOADED")
    assert len(servers_of(stack, name)) == 1


async def test_a_redeploy_replaces_the_server_blue_green(
    stack: Stack, locations: Locations, images: ImageNames
) -> None:
    await stack.start_control_plane()
    await stack.start_agent(extra=("--location-check-interval", "0.5"))
    name = f"bg-{stack.unique}"
    await locations.put(name, images.example_location, queue=stack.queue)
    first = await eventually(lambda: loaded(locations, name), 60, what="LOADED")
    [old] = servers_of(stack, name)
    redeployed = await locations.redeploy(name)
    assert redeployed.generation == first.generation + 1
    second = await eventually(lambda: loaded(locations, name), 60, what="LOADED again")
    assert second.generation == redeployed.generation

    async def one_new_server() -> bool:
        running = servers_of(stack, name)
        return len(running) == 1 and running[0].id != old.id

    await eventually(one_new_server, 60, what="one server, the new one")


async def test_a_location_that_cannot_serve_is_in_error_with_the_reason(
    stack: Stack, locations: Locations, images: ImageNames
) -> None:
    await stack.start_control_plane()
    await stack.start_agent(extra=("--location-check-interval", "0.5"))
    crashing, secretive = f"crash-{stack.unique}", f"secret-{stack.unique}"
    # A code server for a module that does not exist exits at once, each time.
    await locations.put(
        crashing,
        images.example_location,
        command=["python3", "-m", "hd_sdk", "serve", "--module", "no_such_module"],
        queue=stack.queue,
    )
    # A secret this host does not have: the server is not even started.
    await locations.put(
        secretive, images.example_location, env={"TOKEN": "secret:NOT_HERE"}, queue=stack.queue
    )

    async def errored(name: str) -> Location | None:
        location = await locations.get(name)
        return location if location.status == "ERROR" else None

    crashed = await eventually(lambda: errored(crashing), 90, what="the crash loop in ERROR")
    assert "exited 3 times before becoming healthy" in (crashed.error or "")
    assert "cannot import no_such_module" in (crashed.error or "")
    secret = await eventually(lambda: errored(secretive), 60, what="the missing secret in ERROR")
    assert "secret NOT_HERE is not set on this host" in (secret.error or "")
    assert servers_of(stack, crashing) == [] and servers_of(stack, secretive) == []


async def test_the_locations_command(stack: Stack, images: ImageNames) -> None:
    from tests.integration.test_operators import dispatcher_cli

    await stack.start_control_plane()
    await stack.start_agent(extra=("--location-check-interval", "0.5"))
    name = f"cli-{stack.unique}"
    added = await dispatcher_cli(
        stack,
        "locations",
        "add",
        name,
        "--image",
        images.example_location,
        "--queue",
        stack.queue,
    )
    assert added.returncode == 0, added.stderr
    assert f"{name}: LOADING (generation 1)" in added.stdout
    again = await dispatcher_cli(
        stack,
        "locations",
        "add",
        name,
        "--image",
        images.example_location,
    )
    assert again.returncode == 1
    assert "exists already" in again.stderr

    async def listed_loaded() -> str:
        listing = await dispatcher_cli(stack, "locations", "list")
        return listing.stdout if f"{name}: LOADED" in listing.stdout else ""

    text = await eventually(listed_loaded, 60, what="listed as LOADED")
    assert "job hello: Greet someone, in one step." in text
    missing = await dispatcher_cli(stack, "locations", "remove", "no-such-location")
    assert (missing.returncode, missing.stderr.strip()) == (
        1,
        "error: no location 'no-such-location'",
    )
    bad = await dispatcher_cli(stack, "locations", "add", "Bad Name", "--image", "x")
    assert bad.returncode == 1
    assert "location name 'Bad Name' is invalid" in bad.stderr


async def test_a_job_runs_by_name_and_bad_submissions_are_rejected(
    stack: Stack, locations: Locations, store: Database, images: ImageNames
) -> None:
    from dispatcher.errors import SubmissionRejected
    from dispatcher.states import RunState
    from tests.integration.test_dispatch import wait_for_state
    from tests.integration.test_operators import dispatcher_cli

    await stack.start_control_plane()
    await stack.start_agent(extra=("--location-check-interval", "0.5"))
    name = f"jobs-{stack.unique}"
    await locations.put(name, images.example_location, queue=stack.queue)
    await eventually(lambda: loaded(locations, name), 60, what="LOADED")

    # End to end from the command line, with progress and logs in `runs show`.
    ran = await dispatcher_cli(
        stack,
        "submit",
        "--location",
        name,
        "--job",
        "count",
        "--config",
        '{"to": 2}',
        "--wait",
        "--timeout",
        "120",
    )
    assert ran.returncode == 0, ran.stderr
    run_id = ran.stdout.strip().splitlines()[0]
    shown = await dispatcher_cli(stack, "runs", "show", run_id, "--logs")
    assert "step count-2 succeeded" in shown.stdout
    assert "metadata counted=2" in shown.stdout
    assert "1:0     | 1" in shown.stdout

    # Refused with the problem named, and no run row.
    async with stack.client() as client:
        for job, config, words in [
            ("nope", {}, "no job 'nope' in location"),
            ("hello", {}, "config.name is required"),
            ("hello", {"name": 7}, "config.name must be of type string"),
            # A few problems named, not all 3,000: a reason past the contract's bound was an
            # answer no reader would take, and the submitter waited in vain.
            (
                "hello",
                {"name": "x", **{f"x{i}": i for i in range(3000)}},
                "x19 is not a known field; and more",
            ),
        ]:
            with pytest.raises(SubmissionRejected, match=words):
                await client.submit_job(name, job, config)
        with pytest.raises(SubmissionRejected, match="no location 'elsewhere'"):
            await client.submit_job("elsewhere", "hello", {"name": "x"})
        accepted = await client.submit_job(name, "hello", {"name": "Ada"})
    run = await wait_for_state(store, accepted, RunState.SUCCESS, RunState.FAILURE, timeout=90)
    assert run.state == RunState.SUCCESS
    assert run.output_tail == ["hello, Ada!"]
    assert len(await store.runs.recent()) == 2  # the two accepted, none of the refused

    refused = await dispatcher_cli(
        stack,
        "submit",
        "--location",
        name,
        "--job",
        "hello",
        "--config",
        '{"name": 1}',
    )
    assert refused.returncode == 2
    assert "submission rejected: invalid config for job 'hello'" in refused.stderr


async def test_redeploying_to_a_new_tag_while_runs_launch_fails_no_launch(
    stack: Stack,
    locations: Locations,
    store: Database,
    images: ImageNames,
    docker_client: docker.DockerClient,
) -> None:
    import asyncio

    from dispatcher.states import RunState

    repository = images.example_location.rsplit(":", 1)[0]
    new_tag = f"{repository}:test-{stack.unique}"
    docker_client.images.get(images.example_location).tag(new_tag)
    try:
        await stack.start_control_plane()
        await stack.start_agent(max_concurrent=4, extra=("--location-check-interval", "0.5"))
        name = f"rd-{stack.unique}"
        await locations.put(name, images.example_location, queue=stack.queue)
        await eventually(lambda: loaded(locations, name), 60, what="LOADED")

        async with stack.client() as client:

            async def submit(i: int) -> object:
                await asyncio.sleep(i * 0.2)
                return await client.submit_job(name, "hello", {"name": f"n{i}"}, timeout=60)

            runs = asyncio.gather(*(submit(i) for i in range(12)))
            await asyncio.sleep(0.5)
            await locations.put(name, new_tag, queue=stack.queue, create=False)
            run_ids = await runs

        async def all_done() -> bool:
            states = [(await store.runs.get(r)).state for r in run_ids]  # type: ignore[arg-type]
            return all(s in (RunState.SUCCESS, RunState.FAILURE) for s in states)

        await eventually(all_done, 120, interval=0.5, what="12 runs ended")
        for run_id in run_ids:
            assert (await store.runs.get(run_id)).state == RunState.SUCCESS  # type: ignore[arg-type]
        location = await eventually(lambda: loaded(locations, name), 60, what="LOADED again")
        assert location.generation == 2

        async def one_server_on_the_new_tag() -> bool:
            running = servers_of(stack, name)
            return len(running) == 1 and new_tag in running[0].image.tags

        await eventually(one_server_on_the_new_tag, 60, what="one server, on the new tag")
    finally:
        docker_client.images.remove(new_tag, noprune=True)


async def test_a_hung_server_is_replaced_and_a_silent_one_times_out(
    stack: Stack, locations: Locations, images: ImageNames
) -> None:
    await stack.start_control_plane()
    await stack.start_agent(
        extra=("--location-check-interval", "0.5", "--location-startup-timeout", "5")
    )
    hung, silent = f"hung-{stack.unique}", f"silent-{stack.unique}"
    await locations.put(hung, images.example_location, queue=stack.queue)
    # This one runs but never answers: no code server listens in it.
    await locations.put(
        silent, images.example_location, command=["sleep", "600"], queue=stack.queue
    )
    first = await eventually(lambda: loaded(locations, hung), 60, what="LOADED")
    [server] = servers_of(stack, hung)
    # Paused, it keeps running but fails its health checks: it is redeployed.
    server.pause()
    again = await eventually(
        lambda: loaded(locations, hung, after=first.loaded_at), 90, what="redeployed"
    )
    assert again.status == "LOADED"
    assert [c.id for c in servers_of(stack, hung)] != [server.id]

    async def timed_out() -> Location | None:
        location = await locations.get(silent)
        return location if location.status == "ERROR" else None

    location = await eventually(timed_out, 60, what="the silent server in ERROR")
    assert "not healthy within" in (location.error or "")

    async def removed() -> bool:
        return servers_of(stack, silent) == []

    await eventually(removed, 30, what="the silent server removed")


#: A code server that is healthy and describes three jobs, then answers each job's launch spec
#: badly: not a launch spec, a failure of its own, and no answer at all (a hang-up).
HOSTILE_SERVER = r"""
import json
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def _reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        jobs = [{"name": name} for name in ("malformed", "failing", "silent")]
        self._reply(200, {"status": "ok"} if self.path == "/health" else {"jobs": jobs})

    def do_POST(self):
        job = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["job"]
        if job == "malformed":
            self._reply(200, {"command": "echo hi", "env": ["A=1"]})
        elif job == "failing":
            self._reply(500, {"error": "boom"})
        else:
            self.close_connection = True

HTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
"""


async def test_a_code_server_answering_badly_fails_the_run_in_words_and_frees_its_slot(
    stack: Stack, locations: Locations, store: Database, images: ImageNames
) -> None:
    """A launch spec that is no launch spec, a server's own failure, and a server that never
    answers: each run fails (LAUNCH_ERROR, in words), none waits QUEUED for ever holding the
    agent's only slot, and the agent goes on."""
    from dispatcher.states import RunState
    from tests.integration.test_dispatch import wait_for_state

    await stack.start_control_plane()
    await stack.start_agent(
        extra=(
            *("--location-check-interval", "0.5", "--location-startup-timeout", "3"),
            *("--max-concurrent", "1"),
        )
    )
    name = f"hostile-{stack.unique}"
    await locations.put(
        name, images.example_location, command=["python3", "-c", HOSTILE_SERVER], queue=stack.queue
    )
    await eventually(lambda: loaded(locations, name), 60, what="LOADED")
    async with stack.client() as client:
        runs = {job: await client.submit_job(name, job, {}) for job in ("silent", "malformed")}
        runs["failing"] = await client.submit_job(name, "failing", {})
    for job, words in [
        ("silent", f"no code server of location {name!r} answers yet (waited"),
        ("malformed", "answered a launch spec that is not one (Expected `array`, got `str`"),
        ("failing", "answered HTTP 500: boom"),
    ]:
        run = await wait_for_state(store, runs[job], RunState.FAILURE, RunState.SUCCESS, timeout=90)
        assert (run.state, run.failure_reason) == (RunState.FAILURE, "LAUNCH_ERROR"), job
        assert words in (run.failure_message or ""), (job, run.failure_message)


async def test_locations_that_pass_alone_but_not_together_are_refused_the_last_one(
    locations: Locations, unique: str
) -> None:
    """Each location's snapshot alone is checked, and so is its queue's whole snapshot: four
    that each fit a message may not fit one together, and agents refuse a snapshot that does
    not, losing every location of the queue."""
    from dispatcher.errors import ConfigError

    queue = f"q-{unique}"
    env = {f"K{n}": "v" * 60_000 for n in range(5)}  # about 300 KB each
    for n in range(3):
        await locations.put(f"big-{n}-{unique}", "busybox", env=env, queue=queue)
    with pytest.raises(ConfigError, match=f"queue {queue}'s locations would not reach"):
        await locations.put(f"big-3-{unique}", "busybox", env=env, queue=queue)
    names = {loc.name for loc in await locations.all() if loc.queue == queue}
    assert names == {f"big-{n}-{unique}" for n in range(3)}


async def test_snapshots_asked_for_queues_no_agent_or_location_has_are_not_sent(
    store: Database, locations: Locations, unique: str
) -> None:
    """Any agent may ask, naming any queue: only queues that have (or had) locations, or an
    agent, are answered, so that invented names leave nothing behind."""
    from schemas import AgentHeartbeat

    served, invented = f"q-{unique}", [f"ghost-{n}-{unique}" for n in range(5)]
    await store.apply_events([AgentHeartbeat(agent_id=f"a-{unique}", sequence=1, queues=(served,))])
    # A location named as its queue (whose name a careless query would take for the queue's).
    await locations.put(served, "busybox", queue=served)
    await locations.wanted([served, *invented])
    async with store.connections.connection() as connection:
        answered = await connection.fetch(
            "SELECT DISTINCT routing_key FROM outbox WHERE kind = 'LocationSnapshot'"
            " AND routing_key = ANY($1::text[])",
            [served, *invented],
        )
        kept = await connection.fetchval(
            "SELECT count(*) FROM location_snapshot_revisions WHERE queue = ANY($1::text[])",
            invented,
        )
    assert [row["routing_key"] for row in answered] == [served]
    assert kept == 0
