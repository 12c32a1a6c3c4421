"""Settings are read in one place and bad values are refused with a clear message."""

from __future__ import annotations

import pytest

from dispatcher.errors import ConfigError
from dispatcher.settings import ControlPlaneSettings, ImageNames, MonitorSettings
from schemas import is_safe_name
from schemas.bounds import MAX_IN_FLIGHT
from worker_agent.settings import AgentConfigError, AgentSettings, default_agent_id
from worker_agent.slots import MAX_LISTED_REPORTED, MAX_SLOTS


def test_image_names_come_from_the_environment() -> None:
    names = ImageNames.from_env({"HD_IMAGE_POSTGRES": "postgres:15"})
    assert names.postgres == "postgres:15"
    assert names.rabbitmq == ImageNames().rabbitmq


def test_control_plane_needs_a_broker_and_a_database() -> None:
    with pytest.raises(ConfigError, match="--amqp-url"):
        ControlPlaneSettings.from_env({})
    with pytest.raises(ConfigError, match="--database-url"):
        ControlPlaneSettings.from_env({"HD_AMQP_URL": "amqp://x/"})


def test_control_plane_options_override_the_environment() -> None:
    settings = ControlPlaneSettings.from_env(
        {"HD_AMQP_URL": "amqp://env/", "HD_DATABASE_URL": "postgresql://env/"},
        amqp_url="amqp://option/",
        components=("relay",),
    )
    assert settings.amqp_url == "amqp://option/"
    assert settings.database_url == "postgresql://env/"
    assert settings.components == ("relay",)


def test_retention_is_off_unless_asked_for_and_bad_values_are_explained() -> None:
    env = {"HD_AMQP_URL": "amqp://x/", "HD_DATABASE_URL": "postgresql://x/"}
    assert ControlPlaneSettings.from_env(env).retention_days is None
    on = ControlPlaneSettings.from_env({**env, "HD_RETENTION_DAYS": "7.5"})
    assert (on.retention_days, on.retention_every_s) == (7.5, 3600.0)
    with pytest.raises(ConfigError, match="HD_RETENTION_DAYS='soon' is not a number"):
        ControlPlaneSettings.from_env({**env, "HD_RETENTION_DAYS": "soon"})
    for raw in ("-1", "nan"):
        with pytest.raises(ConfigError, match="HD_RETENTION_DAYS must be 0 to 36500 days"):
            ControlPlaneSettings.from_env({**env, "HD_RETENTION_DAYS": raw})


def test_broker_policies_are_on_unless_turned_off_in_words_it_takes() -> None:
    env = {"HD_AMQP_URL": "amqp://x/", "HD_DATABASE_URL": "postgresql://x/"}
    assert ControlPlaneSettings.from_env(env).broker_policies
    assert not ControlPlaneSettings.from_env({**env, "HD_BROKER_POLICIES": "off"}).broker_policies
    with pytest.raises(ConfigError, match="HD_BROKER_POLICIES='maybe' is neither yes nor no"):
        ControlPlaneSettings.from_env({**env, "HD_BROKER_POLICIES": "maybe"})


def test_unknown_components_are_refused() -> None:
    env = {"HD_AMQP_URL": "amqp://x/", "HD_DATABASE_URL": "postgresql://x/"}
    with pytest.raises(ConfigError, match="unknown component"):
        ControlPlaneSettings.from_env(env, components=("intake", "teleport"))


def test_agent_settings_from_environment() -> None:
    settings = AgentSettings.from_env(
        {
            "HD_AMQP_URL": "amqp://x/",
            "HD_AGENT_ID": "host-1",
            "HD_AGENT_QUEUES": "default, gpu",
            "HD_AGENT_MAX_CONCURRENT": "8",
            "HD_HEARTBEAT_INTERVAL_S": "0.5",
        }
    )
    assert settings.agent_id == "host-1"
    assert settings.queues == ("default", "gpu")
    assert settings.max_concurrent == 8
    assert settings.heartbeat_interval_s == 0.5


@pytest.mark.parametrize(
    ("env", "overrides", "words"),
    [
        ({}, {}, "--amqp-url"),
        ({"HD_AMQP_URL": "amqp://x/"}, {"queues": ("bad queue",)}, "queue name"),
        ({"HD_AMQP_URL": "amqp://x/"}, {"max_concurrent": 0}, "at least 1"),
        ({"HD_AMQP_URL": "amqp://x/", "HD_AGENT_MAX_CONCURRENT": "many"}, {}, "not a number"),
        ({"HD_AMQP_URL": "amqp://x/"}, {"heartbeat_interval_s": 0.0}, "positive"),
        ({"HD_AMQP_URL": "amqp://x/"}, {"location_check_interval_s": 0.0}, "0.1 to 3600"),
        ({"HD_AMQP_URL": "amqp://x/"}, {"location_startup_timeout_s": -5.0}, "1 to 86400"),
        # A narrowing list that lists nothing would mean any: refused, not widened.
        ({"HD_AMQP_URL": "amqp://x/", "HD_CONTROL_PLANE_USERS": ","}, {}, "lists nothing"),
        ({"HD_AMQP_URL": "amqp://x/", "HD_AGENT_ALLOW_IMAGES": " , "}, {}, "lists nothing"),
        ({"HD_AMQP_URL": "amqp://x/"}, {"control_plane_users": ("",)}, "must not be empty"),
        ({"HD_AMQP_URL": "amqp://x/"}, {"allowed_images": ("a", " ")}, "must not be empty"),
    ],
)
def test_bad_agent_settings_are_refused(
    env: dict[str, str], overrides: dict[str, object], words: str
) -> None:
    with pytest.raises(AgentConfigError, match=words):
        AgentSettings.from_env(env, **overrides)


def test_monitor_settings_defaults_and_checks() -> None:
    env = {"HD_AMQP_URL": "amqp://x/", "HD_DATABASE_URL": "postgresql://x/"}
    settings = MonitorSettings.from_env(env)
    assert (settings.lost_after_beats, settings.start_timeout_s) == (3.0, 180.0)
    assert settings.webhook_urls == ()
    with_hooks = MonitorSettings.from_env({**env, "HD_WEBHOOK_URLS": "http://a/x, https://b/y"})
    assert with_hooks.webhook_urls == ("http://a/x", "https://b/y")
    with pytest.raises(ConfigError, match="must start with http"):
        MonitorSettings.from_env(env, webhook_urls=("ftp://nope",))
    with pytest.raises(ConfigError, match="not a number"):
        MonitorSettings.from_env({**env, "HD_START_TIMEOUT_S": "soon"})
    with pytest.raises(ConfigError, match="no database"):
        MonitorSettings.from_env({"HD_AMQP_URL": "amqp://x/"})
    # A NaN or a negative duration would never (or always) be past.
    for raw in ("nan", "-5", "inf"):
        with pytest.raises(
            ConfigError, match=r"--start-timeout \(or HD_START_TIMEOUT_S\) must be 0 to"
        ):
            MonitorSettings.from_env({**env, "HD_START_TIMEOUT_S": raw})
    with pytest.raises(ConfigError, match="HD_RETRY_BACKOFF_S"):
        MonitorSettings.from_env(env, retry_backoff_s=-5.0)
    with pytest.raises(ConfigError, match="lost-after-beats"):
        MonitorSettings.from_env(env, lost_after_beats=float("nan"))
    # At 0, every starting run would fail at once, or every run be alerted on.
    for name in ("HD_START_TIMEOUT_S", "HD_LONG_RUNNING_S", "HD_UNSERVED_AFTER_S"):
        with pytest.raises(ConfigError, match=f"{name}.*must be 1 s or more"):
            MonitorSettings.from_env({**env, name: "0"})


def test_yes_no_agent_settings_take_on_and_off_and_refuse_anything_else() -> None:
    """HD_LOG_FORWARDING=off must turn forwarding off, not be read as the default."""
    base = {"HD_AMQP_URL": "amqp://x/"}
    for off in ("off", "0", "false", "No"):
        assert not AgentSettings.from_env({**base, "HD_LOG_FORWARDING": off}).log_forwarding
    for on in ("on", "1", "true", "YES"):
        assert AgentSettings.from_env({**base, "HD_KEEP_FINISHED": on}).keep_finished
    assert AgentSettings.from_env(base).log_forwarding
    with pytest.raises(AgentConfigError, match="HD_LOG_FORWARDING='disabled' is neither"):
        AgentSettings.from_env({**base, "HD_LOG_FORWARDING": "disabled"})


@pytest.mark.parametrize(
    "hosts",
    [
        (
            "build.eu-west-1.example.com",
            "build-eu-west-1.example.com",
            "build-eu-west-1-example-com",
        ),
        ("a" * 64 + ".one", "a" * 64 + ".two", "a" * 64 + "x", "a" * 64),
        ("___", "-", "...", "", "é", "agent"),
        ("web_1", "_web_1", "-web_1", ".web_1"),
    ],
    ids=["dots", "long", "nothing usable", "leading characters"],
)
def test_default_agent_ids_of_different_hosts_differ(hosts: tuple[str, ...]) -> None:
    ids = [default_agent_id(host) for host in hosts]
    assert len(set(ids)) == len(ids), ids
    for agent_id in ids:
        assert is_safe_name(agent_id)
        assert len(agent_id) <= 64


def test_a_host_name_that_is_a_valid_id_is_the_default_id() -> None:
    assert default_agent_id("build-host-1") == "build-host-1"
    assert default_agent_id("h" * 64) == "h" * 64
    changed = default_agent_id("build.eu-west-1.example.com")
    assert changed.startswith("build-eu-west-1-example-com-")
    assert changed == default_agent_id("build.eu-west-1.example.com")  # the same every start


def test_an_explicit_agent_id_is_used_as_given_and_checked() -> None:
    env = {"HD_AMQP_URL": "amqp://x/"}
    assert AgentSettings.from_env({**env, "HD_AGENT_ID": "b1"}).agent_id == "b1"
    assert AgentSettings.from_env(env, agent_id="build-host-1").agent_id == "build-host-1"
    for bad in ("build.eu-west-1", "x" * 65, "_agent"):
        with pytest.raises(AgentConfigError, match="agent id"):
            AgentSettings.from_env(env, agent_id=bad)


def test_max_concurrent_leaves_room_in_a_heartbeat_for_every_run() -> None:
    env = {"HD_AMQP_URL": "amqp://x/"}
    assert AgentSettings.from_env(env, max_concurrent=MAX_SLOTS).max_concurrent == 4000
    assert MAX_SLOTS + MAX_LISTED_REPORTED <= MAX_IN_FLIGHT
    with pytest.raises(AgentConfigError, match="at most 4000"):
        AgentSettings.from_env(env, max_concurrent=MAX_SLOTS + 1)
    with pytest.raises(AgentConfigError, match="at most 4000"):
        AgentSettings.from_env({**env, "HD_AGENT_MAX_CONCURRENT": "100000"})
