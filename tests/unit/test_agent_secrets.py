"""Secrets by reference and the agent's launch policy: resolved and enforced on the host."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from schemas import FailureReason, RunFailed, RunLog, RunSucceeded
from tests.fakes.runtime import RUN_IMAGE, FakeEngine
from tests.unit.test_agent_launch import AgentUnderTest, launch_of, only_container
from worker_agent.containers import LABEL_SECRET_ENV, ContainerInfo
from worker_agent.errors import LaunchFailed
from worker_agent.logs import LineBatcher
from worker_agent.policy import LaunchPolicy, parse_capabilities
from worker_agent.secrets import REDACTED, MissingSecret, Redactor, Secrets
from worker_agent.settings import AgentConfigError, AgentSettings

pytestmark = pytest.mark.unit

VALUE = "s3cr3t-v4lue-9f2c"


# ----------------------------------------------------------------------- the store


def test_a_reference_resolves_from_the_environment_first_then_the_directory(
    tmp_path: Path,
) -> None:
    (tmp_path / "TOKEN").write_text("from-file\n")
    (tmp_path / "KEY").write_text("line one\nline two\n")
    secrets = Secrets({"HD_SECRET_TOKEN": "from-env"}, tmp_path)
    env, keys = secrets.resolve({"A": "secret:TOKEN", "B": "secret:KEY", "C": "plain"})
    assert env == {"A": "from-env", "B": "line one\nline two", "C": "plain"}
    assert keys == ("A", "B")
    assert Secrets({}, tmp_path).get("TOKEN") == "from-file"


def test_a_missing_or_unsafe_secret_is_named_without_any_value(tmp_path: Path) -> None:
    secrets = Secrets({"HD_SECRET_OTHER": VALUE}, tmp_path)
    with pytest.raises(MissingSecret, match="secret TOKEN is not set on this host") as missing:
        secrets.resolve({"A": "secret:TOKEN"})
    assert str(tmp_path) not in str(missing.value)  # the host's paths stay on the host
    assert isinstance(missing.value, LaunchFailed)
    with pytest.raises(MissingSecret, match="is not a secret name"):
        secrets.get("../etc/passwd")
    with pytest.raises(MissingSecret):
        secrets.get("")


def test_only_allowed_secret_names_can_be_referenced(tmp_path: Path) -> None:
    secrets = Secrets({"HD_SECRET_CI_TOKEN": "ci", "HD_SECRET_DEPLOY_KEY": VALUE}, allowed=["CI_*"])
    assert secrets.resolve({"T": "secret:CI_TOKEN"})[0] == {"T": "ci"}
    with pytest.raises(MissingSecret, match=r"secret DEPLOY_KEY is not allowed on this agent"):
        secrets.resolve({"K": "secret:DEPLOY_KEY"})


def test_redaction_replaces_every_value_whole_and_line_by_line() -> None:
    redact = Redactor([VALUE, "line one\nline two", "ab", VALUE[:8]])
    assert redact(f"token={VALUE}; again {VALUE}") == f"token={REDACTED}; again {REDACTED}"
    assert redact("got line two") == f"got {REDACTED}"
    # The longer value is replaced whole, not the shorter one inside it.
    assert redact(VALUE) == REDACTED
    # Two characters hide nothing and would destroy the output: left as they are.
    assert redact("abc") == "abc"
    assert not Redactor(["ab"])


def test_forwarded_lines_and_progress_frames_are_redacted() -> None:
    quoted = 'p"w\\d-é-9f2c'  # JSON escapes it: the raw line does not show it as it is
    batcher = LineBatcher(redact=Redactor([VALUE, quoted]))
    frame = "\x02hd1 " + json.dumps(
        {"event": "metadata", "message": f"using {VALUE}", "values": {"k": [quoted]}}
    )
    batcher.feed(f"the token is {VALUE}\n{frame}\n")
    _, lines = batcher.take()
    assert lines == (f"the token is {REDACTED}",)
    [item] = batcher.take_progress()
    assert item.message == f"using {REDACTED}"
    assert item.values == {"k": [REDACTED]}


def test_a_tail_is_redacted_before_it_is_cut() -> None:
    from worker_agent import limits

    long_line = "x" * (limits.MAX_LINE_BYTES - 5) + VALUE
    [line] = limits.tail(map(Redactor([VALUE]), [long_line]), 1)
    assert VALUE[:5] not in line and line.endswith(REDACTED)


def test_container_info_knows_its_secret_values_from_labels_and_env() -> None:
    attrs = {
        "Id": "c" * 64,
        "Name": "/hd-run-x-1",
        "Config": {
            "Labels": {
                "hybrid-dispatcher.run-id": "00000000-0000-0000-0000-000000000001",
                "hybrid-dispatcher.attempt": "1",
                LABEL_SECRET_ENV: '["TOKEN"]',
            },
            "Env": ["PATH=/bin", f"TOKEN={VALUE}", "MODE=a=b"],
        },
        "State": {"Status": "running"},
    }
    assert ContainerInfo.from_attrs(attrs).secrets == (VALUE,)


# ------------------------------------------------------------------------ policy


def test_the_policy_allows_images_by_prefix_and_confines_every_container() -> None:
    policy = LaunchPolicy(allowed_images=("registry.local/team/", "busybox"))
    policy.check_image("registry.local/team/job:1")
    policy.check_image("busybox:1.36")
    with pytest.raises(LaunchFailed, match="not allowed on this agent"):
        policy.check_image("registry.local/other/job:1")
    # A prefix ends at a boundary of the reference, never inside a name.
    team = LaunchPolicy(allowed_images=("registry.local/team",))
    team.check_image("registry.local/team/job:1")
    team.check_image("registry.local/team:1")
    for sneaky in ("registry.local/team-evil/job:1", "registry.local/teams:1"):
        with pytest.raises(LaunchFailed):
            team.check_image(sneaky)
    with pytest.raises(LaunchFailed):
        LaunchPolicy(allowed_images=("registry.local",)).check_image("registry.local.evil/x:1")
    # Nor in another registry: Docker reads "ubuntu:5000/x" as host ubuntu, port 5000.
    for prefix, other in [("ubuntu", "ubuntu:5000/x"), ("python:", "python:443/evil/x:1")]:
        hub = LaunchPolicy(allowed_images=(prefix,))
        hub.check_image(f"{prefix.rstrip(':')}:3.11")
        with pytest.raises(LaunchFailed):
            hub.check_image(other)
    # A registry named whole by the prefix, a port and no dot (a compose service's name).
    LaunchPolicy(allowed_images=("registry:5000",)).check_image("registry:5000/app:1")
    LaunchPolicy().check_image("anything:latest")
    options = LaunchPolicy(capabilities=("NET_BIND_SERVICE",), user="1000:1000").container_options()
    assert options == {
        "security_opt": ["no-new-privileges"],
        "pids_limit": 1024,
        "cap_drop": ["ALL"],
        "cap_add": ["NET_BIND_SERVICE"],
        "user": "1000:1000",
    }
    assert parse_capabilities(["cap_chown", " NET_RAW "]) == ("CHOWN", "NET_RAW")


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"pids_limit": 3}, "--pids-limit"),
        ({"capabilities": ("NOT A CAP",)}, "capability"),
        ({"capabilities": ("NOT_A_CAP",)}, "not a Linux capability"),
        ({"capabilities": ("ALL",)}, "every capability back"),
        ({"allowed_images": ("a\udcff",)}, "no UTF-8"),
        ({"control_plane_users": ("cp\x00",)}, "control character"),
        ({"run_as_user": "root; rm"}, "--run-as-user"),
        ({"allowed_images": ("has space",)}, "--allow-image"),
        ({"secrets_dir": Path("/no/such/dir")}, "--secrets-dir"),
        ({"allowed_secrets": ("A B",)}, "--allow-secret 'A B' is not a secret name"),
        ({"pull_policy": "sometimes"}, "pull policy 'sometimes' is not one of always"),
    ],
)
def test_bad_policy_settings_are_explained(override: dict[str, object], words: str) -> None:
    with pytest.raises(AgentConfigError, match=words):
        AgentSettings.from_env({"HD_AMQP_URL": "amqp://x/"}, **override)


# ---------------------------------------------------------------------- launches


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def agent(engine: FakeEngine) -> AsyncIterator[AgentUnderTest]:
    started = AgentUnderTest(engine)
    started.launcher.secrets = Secrets({"HD_SECRET_TOKEN": VALUE})
    await started.start()
    yield started
    await started.close()


async def test_a_secret_reaches_the_container_and_never_its_reports(
    engine: FakeEngine, agent: AgentUnderTest
) -> None:
    launch = launch_of(("sh", "-c", f"echo token {VALUE}; exit 3"), env={"TOKEN": "secret:TOKEN"})
    await agent.deliver(launch)
    container = only_container(engine)
    assert container.env == {"TOKEN": VALUE}
    assert container.labels[LABEL_SECRET_ENV] == '["TOKEN"]'
    final = await agent.reported(launch.run_id)
    assert isinstance(final, RunFailed) and final.exit_code == 3
    assert final.output_tail == (f"token {REDACTED}",)
    forwarded = [line for e in agent.events(RunLog) for line in e.lines]
    assert forwarded == [f"token {REDACTED}"]
    assert all(VALUE not in repr(e) for e in agent.events())


async def test_an_adopted_container_s_output_is_redacted_too(engine: FakeEngine) -> None:
    # The previous life of agent a1 launched it with its secret resolved, then died.
    launch = launch_of(("sh", "-c", f"echo done with {VALUE}; sleep 60"), env={"TOKEN": VALUE})
    info, _ = await engine.runtime("a1").launch(launch, ("TOKEN",))
    # The new life has no secret at all: it learns the values from the container itself.
    agent = AgentUnderTest(engine)
    await agent.start()
    try:
        engine.exit(info.id, 0)
        final = await agent.reported(launch.run_id)
        assert isinstance(final, RunSucceeded)
        assert final.output_tail == (f"done with {REDACTED}",)
        assert all(VALUE not in repr(e) for e in agent.events())
    finally:
        await agent.close()


async def test_a_missing_secret_fails_the_launch_naming_it(
    engine: FakeEngine, agent: AgentUnderTest
) -> None:
    launch = launch_of(env={"KEY": "secret:ABSENT"})
    delivery = await agent.deliver(launch)
    assert engine.containers == {}
    [failed] = agent.events(RunFailed)
    assert failed.reason == FailureReason.LAUNCH_ERROR
    assert "secret ABSENT is not set on this host" in failed.message
    assert delivery.settlements == ["ack"]


async def test_an_image_outside_the_allow_list_fails_with_the_reason(
    engine: FakeEngine, agent: AgentUnderTest
) -> None:
    agent.launcher.policy = LaunchPolicy(allowed_images=("registry.local/",))
    launch = launch_of(image=RUN_IMAGE)
    await agent.deliver(launch)
    assert engine.containers == {}
    [failed] = agent.events(RunFailed)
    assert failed.reason == FailureReason.LAUNCH_ERROR
    assert f"image {RUN_IMAGE!r} is not allowed on this agent" in failed.message
