"""Settings are read in one place and bad values are refused with a clear message."""

from __future__ import annotations

import pytest

from dispatcher.errors import ConfigError
from dispatcher.settings import ControlPlaneSettings, ImageNames, MonitorSettings
from worker_agent.settings import AgentConfigError, AgentSettings


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
