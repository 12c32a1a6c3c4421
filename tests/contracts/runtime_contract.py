"""The container runtime's contract: what the agent relies on from ``ContainerRuntime``.

``RuntimeContract`` holds the tests; a test module subclasses it and gives a ``harness``
fixture: ``tests/unit/test_runtime_fake_contract.py`` (the in-memory engine) and
``tests/integration/test_runtime_contract.py`` (``DockerRuntime`` on the real engine).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import pytest

from schemas import LaunchRun
from schemas.resources import Resources
from worker_agent.containers import (
    LABEL_AGENT,
    LABEL_ATTEMPT,
    LABEL_MANAGED_BY,
    LABEL_RUN,
    MANAGED_BY,
    ContainerInfo,
    container_name,
)
from worker_agent.errors import DockerUnavailable, ImageMissing, LaunchFailed
from worker_agent.ports import ContainerRuntime
from worker_agent.streams import Stream, read_on_thread

T = TypeVar("T")

#: Runs until stopped.
SLEEP = ("sleep", "3600")


@dataclass(frozen=True)
class Described:
    """What the engine says of a container, read behind the runtime's back."""

    name: str
    image: str
    labels: dict[str, str]
    env: dict[str, str]


class RuntimeHarness(Protocol):
    """One engine, and runtimes of several agents on it."""

    #: An image on the engine that has sh, echo, sleep, true and false.
    image: str
    #: An image not on the engine, and which no registry can give.
    unpullable_image: str

    def agent_id(self, n: int = 0) -> str: ...

    def runtime(self, n: int = 0, pull: str = "if-missing") -> ContainerRuntime:
        """The runtime of agent ``n`` with that pull policy (closed by the harness)."""
        ...

    async def describe(self, container_id: str) -> Described | None: ...

    async def containers_of(self, run_id: uuid.UUID) -> list[str]:
        """Ids of every container of the run on the engine, whatever agent made it."""
        ...

    def tick(self) -> None:
        """Let time pass for the engine's own doings (ready checks): a no-op on a real one."""
        ...

    async def cut(self) -> None:
        """Put the engine out of the runtimes' reach."""
        ...

    async def restore(self) -> None: ...


async def eventually(
    harness: RuntimeHarness,
    probe: Callable[[], Awaitable[T | None]],
    what: str,
    timeout: float = 20,
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        harness.tick()
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what} (last: {result!r})")
        await asyncio.sleep(0.05)


async def finished(harness: RuntimeHarness, runtime: ContainerRuntime, cid: str) -> ContainerInfo:
    async def probe() -> ContainerInfo | None:
        info = await runtime.inspect(cid)
        return info if info is not None and info.finished else None

    return await eventually(harness, probe, f"container {cid[:12]} finished")


class Reader:
    """Reads a stream on its thread, as the agent does, keeping what it read."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.items: list[Any] = []
        self.task = asyncio.ensure_future(read_on_thread(stream, self._add, "contract-reader"))

    def _add(self, item: Any) -> None:
        self.items.append(item)

    async def until(self, harness: RuntimeHarness, seen: Callable[[list[Any]], bool]) -> None:
        async def probe() -> bool:
            if self.task.done() and not seen(self.items):
                self.task.result()  # raises what broke the stream
                raise AssertionError(f"the stream ended after {self.items!r}")
            return seen(self.items)

        await eventually(harness, probe, "items read from the stream")

    async def close(self) -> None:
        self.stream.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def launch_of(
    harness: RuntimeHarness,
    command: tuple[str, ...] = SLEEP,
    run_id: uuid.UUID | None = None,
    attempt: int = 1,
    **fields: Any,
) -> LaunchRun:
    return LaunchRun(
        run_id=run_id or uuid.uuid4(),
        attempt=attempt,
        image=fields.pop("image", harness.image),
        command=command,
        **fields,
    )


def sh(script: str) -> tuple[str, ...]:
    return ("sh", "-c", script)


class RuntimeContract:
    """What every ``ContainerRuntime`` does. Subclasses give the ``harness`` fixture."""

    # ------------------------------------------------------------------ launching

    async def test_a_launch_starts_one_container_named_and_labelled_for_its_attempt(
        self, harness: RuntimeHarness
    ) -> None:
        runtime = harness.runtime()
        launch = launch_of(harness, env={"HD_ANSWER": "42", "EMPTY": ""}, attempt=2)
        info, adopted = await runtime.launch(launch)
        assert not adopted
        assert (info.name, info.run_id, info.attempt) == (
            container_name(launch.run_id, 2),
            launch.run_id,
            2,
        )
        assert info.status == "running" and info.ready and info.exit_code is None
        described = await harness.describe(info.id)
        assert described is not None
        assert described.name == info.name
        assert described.image == harness.image
        assert (
            described.labels.items()
            >= {
                LABEL_MANAGED_BY: MANAGED_BY,
                LABEL_AGENT: harness.agent_id(),
                LABEL_RUN: str(launch.run_id),
                LABEL_ATTEMPT: "2",
            }.items()
        )
        assert described.env.items() >= {"HD_ANSWER": "42", "EMPTY": ""}.items()
        assert await harness.containers_of(launch.run_id) == [info.id]

    async def test_a_container_shows_the_resources_its_run_asked_for(
        self, harness: RuntimeHarness
    ) -> None:
        # What an agent that adopts the container after a restart counts it as holding.
        runtime = harness.runtime()
        launch = launch_of(harness, cpus=0.5, memory_limit_mb=64)
        info, _ = await runtime.launch(launch)
        assert info.resources == Resources(nano_cpus=500_000_000, memory_mb=64)
        [listed] = [c for c in await runtime.list_managed() if c.id == info.id]
        assert listed.resources == info.resources
        plain, _ = await runtime.launch(launch_of(harness))
        assert plain.resources == Resources()

    async def test_a_create_answers_what_the_engine_then_shows(
        self, harness: RuntimeHarness
    ) -> None:
        # The runtime answers a create without inspecting the container: what it answers
        # must be what an inspect shows, secrets and resources included.
        runtime = harness.runtime()
        launch = launch_of(
            harness, env={"TOKEN": "s3cret", "PLAIN": "1"}, cpus=0.25, memory_limit_mb=32
        )
        info, adopted = await runtime.create(launch, ["TOKEN"])
        assert not adopted and info.status == "created" and info.secrets == ("s3cret",)
        assert await runtime.inspect(info.id) == info
        again, adopted = await runtime.create(launch, ["TOKEN"])
        assert adopted and again == info

    async def test_launching_an_attempt_again_adopts_its_container(
        self, harness: RuntimeHarness
    ) -> None:
        launch = launch_of(harness)
        first, adopted = await harness.runtime().launch(launch)
        assert not adopted
        # Another agent's runtime, or the same one after a restart: the name is the attempt's.
        again, adopted = await harness.runtime(1).launch(launch)
        assert adopted
        assert again.id == first.id
        assert await harness.containers_of(launch.run_id) == [first.id]

    async def test_concurrent_launches_of_one_attempt_make_one_container(
        self, harness: RuntimeHarness
    ) -> None:
        launch = launch_of(harness)
        runtime = harness.runtime()
        results = await asyncio.gather(
            runtime.launch(launch), runtime.launch(launch), return_exceptions=True
        )
        # The loser of the race adopts the winner's container; on a real engine it may also
        # find the name taken but the container not there yet (Docker reserves the name
        # first): DockerUnavailable, which the launcher retries. Never a second container.
        returned = [r for r in results if not isinstance(r, BaseException)]
        for failed in (r for r in results if isinstance(r, BaseException)):
            assert isinstance(failed, DockerUnavailable), failed
        assert [adopted for _, adopted in returned].count(False) == 1
        [cid] = {info.id for info, _ in returned}
        again, adopted = await runtime.launch(launch)
        assert (again.id, adopted) == (cid, True)
        assert await harness.containers_of(launch.run_id) == [cid]

    async def test_an_image_that_is_missing_or_invalid_is_image_missing(
        self, harness: RuntimeHarness
    ) -> None:
        runtime = harness.runtime()
        for image in (harness.unpullable_image, "Upper/Case:1"):
            launch = launch_of(harness, image=image)
            with pytest.raises(ImageMissing):
                await runtime.launch(launch)
            assert await harness.containers_of(launch.run_id) == []

    async def test_the_pull_policy_decides_when_an_image_is_pulled(
        self, harness: RuntimeHarness
    ) -> None:
        # never: an image the engine lacks is not even tried, and the reason says so.
        launch = launch_of(harness, image=harness.unpullable_image)
        with pytest.raises(ImageMissing, match=r"never pulls \(--pull never\)"):
            await harness.runtime(0, pull="never").launch(launch)
        # ... and one it has runs.
        info, _ = await harness.runtime(0, pull="never").launch(launch_of(harness))
        assert info.id
        # always: pulled before every launch, even when the engine has it; an image no
        # registry gives then cannot run, although the engine holds it.
        local_only = launch_of(harness)
        with pytest.raises(ImageMissing, match=r"\(--pull always\) cannot be pulled"):
            await harness.runtime(1, pull="always").launch(local_only)
        assert await harness.containers_of(local_only.run_id) == []

    async def test_a_command_that_cannot_start_is_a_launch_failure_every_time(
        self, harness: RuntimeHarness
    ) -> None:
        runtime = harness.runtime()
        launch = launch_of(harness, command=("no-such-executable",))
        with pytest.raises(LaunchFailed, match="executable file not found"):
            await runtime.launch(launch)
        # The container stays, created and never started; launching again fails again.
        [cid] = await harness.containers_of(launch.run_id)
        info = await runtime.inspect(cid)
        assert info is not None
        assert (info.status, info.exit_code, info.finished) == ("created", None, False)
        assert not info.ready
        with pytest.raises(LaunchFailed):
            await runtime.launch(launch)
        assert await harness.containers_of(launch.run_id) == [cid]

    async def test_a_later_attempt_removes_an_earlier_running_one_whoever_started_it(
        self, harness: RuntimeHarness
    ) -> None:
        run_id = uuid.uuid4()
        older, _ = await harness.runtime(1).launch(launch_of(harness, run_id=run_id, attempt=1))
        newer, adopted = await harness.runtime().launch(
            launch_of(harness, run_id=run_id, attempt=2)
        )
        assert not adopted
        assert await harness.runtime().inspect(older.id) is None
        assert await harness.containers_of(run_id) == [newer.id]

    async def test_an_earlier_attempt_that_exited_0_is_left_in_place(
        self, harness: RuntimeHarness
    ) -> None:
        runtime = harness.runtime()
        run_id = uuid.uuid4()
        older, _ = await runtime.launch(launch_of(harness, sh("exit 0"), run_id=run_id))
        await finished(harness, runtime, older.id)
        newer, _ = await runtime.launch(launch_of(harness, run_id=run_id, attempt=2))
        assert sorted(await harness.containers_of(run_id)) == sorted([older.id, newer.id])
        kept = await runtime.inspect(older.id)
        assert kept is not None and kept.exit_code == 0

    # --------------------------------------------------------------- their lives

    @pytest.mark.parametrize("code", [0, 3])
    async def test_an_exit_shows_its_code_its_time_and_the_output_tail(
        self, harness: RuntimeHarness, code: int
    ) -> None:
        runtime = harness.runtime()
        info, _ = await runtime.launch(launch_of(harness, sh(f"echo one; echo two; exit {code}")))
        ended = await finished(harness, runtime, info.id)
        assert ended.status == "exited"
        assert ended.exit_code == code
        assert not ended.oom_killed
        assert ended.finished_at is not None and abs(ended.finished_at - time.time()) < 60
        assert await runtime.output_tail(info.id, 10) == ("one", "two")
        assert await runtime.output_tail(info.id, 1) == ("two",)

    async def test_stop_kills_a_process_that_ignores_sigterm(self, harness: RuntimeHarness) -> None:
        runtime = harness.runtime()
        info, _ = await runtime.launch(launch_of(harness))
        await runtime.stop(info.id, 0)
        ended = await finished(harness, runtime, info.id)
        assert ended.exit_code == 137
        await runtime.stop(info.id, 0)  # stopping a stopped container does nothing
        assert (await finished(harness, runtime, info.id)).exit_code == 137

    async def test_remove_takes_a_container_away_running_or_not(
        self, harness: RuntimeHarness
    ) -> None:
        runtime = harness.runtime()
        running, _ = await runtime.launch(launch_of(harness))
        exited, _ = await runtime.launch(launch_of(harness, sh("exit 1")))
        await finished(harness, runtime, exited.id)
        for cid in (running.id, exited.id):
            await runtime.remove(cid)
            assert await runtime.inspect(cid) is None
            assert await harness.describe(cid) is None
        assert await runtime.list_managed() == []

    async def test_a_container_that_is_gone_is_answered_quietly(
        self, harness: RuntimeHarness
    ) -> None:
        runtime = harness.runtime()
        gone = "f" * 64
        assert await runtime.inspect(gone) is None
        assert await runtime.output_tail(gone, 5) == ()
        await runtime.stop(gone, 0)
        await runtime.remove(gone)
        with pytest.raises(DockerUnavailable):
            await runtime.open_log_stream(gone)

    async def test_list_managed_lists_this_agents_run_containers_in_any_state(
        self, harness: RuntimeHarness
    ) -> None:
        mine, other = harness.runtime(), harness.runtime(1)
        running, _ = await mine.launch(launch_of(harness))
        exited, _ = await mine.launch(launch_of(harness, sh("exit 7")))
        await finished(harness, mine, exited.id)
        await other.launch(launch_of(harness))
        listed = {info.id: info for info in await mine.list_managed()}
        assert set(listed) == {running.id, exited.id}
        assert listed[running.id].status == "running"
        assert (listed[exited.id].status, listed[exited.id].exit_code) == ("exited", 7)

    async def test_a_ready_check_holds_readiness_until_it_passes(
        self, harness: RuntimeHarness
    ) -> None:
        runtime = harness.runtime()
        passing, _ = await runtime.launch(launch_of(harness, ready_check=("true",)))
        failing, _ = await runtime.launch(launch_of(harness, ready_check=("false",)))
        for info in (passing, failing):
            assert info.status == "running"
            assert (info.health, info.ready) == ("starting", False)

        async def health(cid: str) -> str | None:
            info = await runtime.inspect(cid)
            assert info is not None
            return info.health if info.health != "starting" else None

        assert await eventually(harness, lambda: health(passing.id), "healthy") == "healthy"
        assert await eventually(harness, lambda: health(failing.id), "unhealthy") == "unhealthy"
        ready = await runtime.inspect(passing.id)
        assert ready is not None and ready.ready

    # ---------------------------------------------------------------- following

    async def test_the_output_is_followed_from_the_start_until_the_container_ends(
        self, harness: RuntimeHarness
    ) -> None:
        runtime = harness.runtime()
        info, _ = await runtime.launch(launch_of(harness, sh("echo one; echo two; sleep 3600")))
        reader = Reader(await runtime.open_log_stream(info.id))
        try:
            await reader.until(harness, lambda items: b"".join(items) == b"one\ntwo\n")
            await runtime.stop(info.id, 0)
            await asyncio.wait_for(reader.task, 20)  # the stream ends with the container
            assert b"".join(reader.items) == b"one\ntwo\n"
        finally:
            await reader.close()

    async def test_events_tell_this_agents_starts_and_exits_only(
        self, harness: RuntimeHarness
    ) -> None:
        mine, other = harness.runtime(), harness.runtime(1)
        reader = Reader(await mine.open_events(None))
        try:
            theirs, _ = await other.launch(launch_of(harness, sh("exit 4")))
            await finished(harness, other, theirs.id)
            ours, _ = await mine.launch(launch_of(harness, sh("exit 5")))

            def died(items: list[Any]) -> bool:
                return any(_action(e) == "die" and _id(e) == ours.id for e in items)

            await reader.until(harness, died)
            assert {_id(e) for e in reader.items} == {ours.id}
            actions = [_action(e) for e in reader.items]
            assert actions.index("start") < actions.index("die")
            [die] = [e for e in reader.items if _action(e) == "die"]
            assert die["Actor"]["Attributes"]["exitCode"] == "5"
        finally:
            await reader.close()

    async def test_events_since_a_time_replay_what_happened_before_the_stream_opened(
        self, harness: RuntimeHarness
    ) -> None:
        runtime = harness.runtime()
        since = int(time.time()) - 1
        info, _ = await runtime.launch(launch_of(harness, sh("exit 6")))
        await finished(harness, runtime, info.id)
        reader = Reader(await runtime.open_events(since))
        try:
            await reader.until(harness, lambda items: any(_action(e) == "die" for e in items))
            assert [_action(e) for e in reader.items] == ["start", "die"]
        finally:
            await reader.close()

    async def test_a_ready_container_is_told_by_a_health_event(
        self, harness: RuntimeHarness
    ) -> None:
        runtime = harness.runtime()
        reader = Reader(await runtime.open_events(None))
        try:
            info, _ = await runtime.launch(launch_of(harness, ready_check=("true",)))
            await reader.until(
                harness,
                lambda items: any(
                    _action(e).replace(" ", "") == "health_status:healthy" and _id(e) == info.id
                    for e in items
                ),
            )
        finally:
            await reader.close()

    # --------------------------------------------------------------- the engine

    async def test_an_engine_out_of_reach_is_docker_unavailable_until_it_is_back(
        self, harness: RuntimeHarness
    ) -> None:
        runtime = harness.runtime()
        info, _ = await runtime.launch(launch_of(harness))
        reader = Reader(await runtime.open_events(None))
        await harness.cut()
        try:
            for call in (
                lambda: runtime.inspect(info.id),
                lambda: runtime.list_managed(),
                lambda: runtime.launch(launch_of(harness)),
                lambda: runtime.open_events(None),
            ):
                with pytest.raises(DockerUnavailable):
                    await call()
            # The open events stream ends, or breaks with DockerUnavailable (the watcher
            # opens it again either way).
            await asyncio.wait([reader.task], timeout=20)
            assert reader.task.done()
            error = reader.task.exception()
            assert error is None or isinstance(error, DockerUnavailable), error
        finally:
            await harness.restore()
            await reader.close()
        back = await runtime.inspect(info.id)
        assert back is not None and back.status == "running"


def _action(event: dict[str, Any]) -> str:
    return str(event.get("Action") or event.get("status") or "")


def _id(event: dict[str, Any]) -> str:
    return str(event.get("id") or event.get("Actor", {}).get("ID"))
