"""Settings: one frozen object per process, built from the environment in one place.

Every tunable of the project is read here and nowhere else; modules receive a settings
object instead of calling ``os.getenv``. Environment variables use the ``HD_`` prefix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from transport.errors import BrokerUrlInvalid
from transport.process import yes_or_no
from transport.urls import broker_urls, user_of


def _get(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip()
    return value or default


@dataclass(frozen=True)
class ImageNames:
    """Names of the container images the project builds or uses.

    A user with a registry may point these at the official images instead, e.g.
    ``HD_IMAGE_RABBITMQ=rabbitmq:3.10-management`` and ``HD_IMAGE_POSTGRES=postgres:15``.
    """

    base: str = "hybrid-dispatcher/base:bookworm"
    rabbitmq: str = "hybrid-dispatcher/rabbitmq:3.10"
    postgres: str = "hybrid-dispatcher/postgres:15"
    app: str = "hybrid-dispatcher/app:latest"
    agent: str = "hybrid-dispatcher/agent:latest"
    run_tiny: str = "hybrid-dispatcher/run-tiny:latest"
    example_location: str = "hybrid-dispatcher/example-location:latest"
    host: str = "hybrid-dispatcher/host:latest"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ImageNames:
        env = os.environ if env is None else env
        d = cls()
        return cls(
            base=_get(env, "HD_IMAGE_BASE", d.base),
            rabbitmq=_get(env, "HD_IMAGE_RABBITMQ", d.rabbitmq),
            postgres=_get(env, "HD_IMAGE_POSTGRES", d.postgres),
            app=_get(env, "HD_IMAGE_APP", d.app),
            agent=_get(env, "HD_IMAGE_AGENT", d.agent),
            run_tiny=_get(env, "HD_IMAGE_RUN_TINY", d.run_tiny),
            example_location=_get(env, "HD_IMAGE_EXAMPLE_LOCATION", d.example_location),
            host=_get(env, "HD_IMAGE_HOST", d.host),
        )


@dataclass(frozen=True)
class Settings:
    """Settings shared by every process of the project."""

    images: ImageNames = field(default_factory=ImageNames)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(images=ImageNames.from_env(env))


def _connections(env: Mapping[str, str]) -> dict[str, object]:
    """The broker and database settings every control-plane process reads."""
    return {
        "amqp_url": env.get("HD_AMQP_URL", ""),
        "database_url": env.get("HD_DATABASE_URL", ""),
        "database_schema": env.get("HD_DATABASE_SCHEMA") or None,
    }


def trusted_broker_users(amqp_url: str, env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Broker identities whose messages may speak for any agent: the process's own user and
    those named in ``HD_TRUSTED_BROKER_USERS`` (comma-separated; an operator's, say)."""
    env = os.environ if env is None else env
    own = user_of(amqp_url)
    named = [u.strip() for u in env.get("HD_TRUSTED_BROKER_USERS", "").split(",") if u.strip()]
    return tuple(dict.fromkeys([own, *named] if own else named))


def _require_connections(amqp_url: str, database_url: str) -> None:
    from .errors import ConfigError

    if not amqp_url:
        raise ConfigError("no broker: pass --amqp-url or set HD_AMQP_URL")
    try:
        broker_urls(amqp_url)
    except BrokerUrlInvalid as exc:
        raise ConfigError(f"HD_AMQP_URL / --amqp-url: {exc}") from None
    if not database_url:
        raise ConfigError("no database: pass --database-url or set HD_DATABASE_URL")


#: Components ``dispatcher serve`` runs by default.
CONTROL_PLANE_COMPONENTS = ("intake", "relay", "status")
#: ... and those it can run when asked (the HTTP API listens on a port: opt in).
OPTIONAL_COMPONENTS = ("web",)


@dataclass(frozen=True)
class ControlPlaneSettings:
    """Settings of ``dispatcher serve``."""

    amqp_url: str
    database_url: str
    #: Run only some components (e.g. the relay in a process of its own).
    components: tuple[str, ...] = CONTROL_PLANE_COMPONENTS
    #: Table schema to use (tests isolate themselves so); None is the database's default.
    database_schema: str | None = None
    intake_prefetch: int = 512
    relay_batch: int = 500
    #: How long a graceful shutdown waits for in-flight work.
    shutdown_grace_s: float = 10.0
    #: Set the broker policies (delivery limit, bounded dead letters) at start-up.
    broker_policies: bool = True
    #: RabbitMQ's management API (http://user:pass@host:15672); "": the broker's host, 15672.
    management_url: str = ""
    #: Deliveries of one message before the broker dead-letters it (a crash-loop backstop).
    delivery_limit: int = 20
    #: Dead letters kept for operators; older ones are dropped (and counted).
    dead_letter_max_length: int = 100_000
    #: Prune what runs finished more than this many days ago left (None: keep everything).
    retention_days: float | None = None
    #: How often the retention runs, when it is on.
    retention_every_s: float = 3600.0

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, **overrides: object
    ) -> ControlPlaneSettings:
        """Environment first (HD_AMQP_URL, HD_DATABASE_URL, ...), then explicit overrides."""
        from .errors import ConfigError

        env = os.environ if env is None else env
        values = _connections(env)
        if components := env.get("HD_COMPONENTS"):
            values["components"] = tuple(c.strip() for c in components.split(",") if c.strip())
        values["management_url"] = env.get("HD_AMQP_MANAGEMENT_URL", "")
        try:
            policies = yes_or_no(env, "HD_BROKER_POLICIES")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if policies is not None:
            values["broker_policies"] = policies
        for name, key in (
            ("HD_DELIVERY_LIMIT", "delivery_limit"),
            ("HD_DEAD_LETTER_MAX_LENGTH", "dead_letter_max_length"),
        ):
            if raw := env.get(name):
                try:
                    values[key] = int(raw)
                except ValueError:
                    raise ConfigError(f"{name}={raw!r} is not a whole number") from None
        for name, key in (
            ("HD_RETENTION_DAYS", "retention_days"),
            ("HD_RETENTION_EVERY_S", "retention_every_s"),
        ):
            if raw := env.get(name):
                try:
                    values[key] = float(raw)
                except ValueError:
                    raise ConfigError(f"{name}={raw!r} is not a number") from None

        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]
        _require_connections(settings.amqp_url, settings.database_url)
        if settings.retention_days is not None and not 0 <= settings.retention_days <= 36500:
            raise ConfigError("HD_RETENTION_DAYS must be 0 to 36500 days")
        if not 1 <= settings.retention_every_s <= 365 * 86400:
            raise ConfigError("HD_RETENTION_EVERY_S must be at least 1 (seconds)")
        if settings.delivery_limit < 2:
            raise ConfigError("the delivery limit must be at least 2")
        if settings.dead_letter_max_length < 1:
            raise ConfigError("the dead-letter queue must keep at least one message")
        known = (*CONTROL_PLANE_COMPONENTS, *OPTIONAL_COMPONENTS)
        unknown = set(settings.components) - set(known)
        if unknown or not settings.components:
            raise ConfigError(
                f"unknown component(s) {', '.join(sorted(unknown)) or '(none given)'}; "
                f"choose from {', '.join(known)}"
            )
        return settings


@dataclass(frozen=True)
class WebSettings:
    """Settings of ``dispatcher web`` (and of ``serve``'s web component)."""

    amqp_url: str
    database_url: str
    database_schema: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> WebSettings:
        """HD_AMQP_URL, HD_DATABASE_URL, HD_WEB_HOST, HD_WEB_PORT, then explicit overrides."""
        from .errors import ConfigError

        env = os.environ if env is None else env
        values = _connections(env)
        values["host"] = env.get("HD_WEB_HOST", "").strip() or cls.host
        if raw := env.get("HD_WEB_PORT"):
            try:
                values["port"] = int(raw)
            except ValueError:
                raise ConfigError(f"HD_WEB_PORT={raw!r} is not a port number") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]
        _require_connections(settings.amqp_url, settings.database_url)
        if not 0 <= settings.port <= 65535:
            raise ConfigError(f"the web port must be 0 to 65535, not {settings.port}")
        return settings


@dataclass(frozen=True)
class MonitorSettings:
    """Settings of ``dispatcher monitor``; each rule's threshold is here, with its default."""

    amqp_url: str
    database_url: str
    database_schema: str | None = None
    #: An agent is lost after this many heartbeat intervals without one (2 s x 3 = 6 s).
    lost_after_beats: float = 3.0
    #: STARTING longer than this (unless the run says otherwise) → START_TIMEOUT.
    start_timeout_s: float = 180.0
    #: A run missing from this many complete heartbeats of its agent in a row → vanished.
    vanished_after_beats: int = 3
    #: A run its live agent lists as exited, with no final event after this long → vanished.
    exited_grace_s: float = 30.0
    #: A CANCELING run whose agent has not confirmed the stop this long after the grace it
    #: was given → CANCELED with CANCEL_TIMEOUT.
    cancel_confirm_s: float = 30.0
    #: Alert when runs have waited QUEUED this long on a queue no live agent consumes.
    unserved_after_s: float = 60.0
    #: Alert once when a run has been STARTED for longer than this.
    long_running_s: float = 3600.0
    #: How often the rules are evaluated.
    sweep_interval_s: float = 0.5
    #: How often a standby monitor tries to become the active one.
    standby_poll_s: float = 1.0
    #: Webhooks that receive every alert as a JSON POST.
    webhook_urls: tuple[str, ...] = ()
    #: Delay before the first retry of a failed attempt (doubles each time, with jitter).
    retry_backoff_s: float = 1.0
    metrics_port: int = 9465

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> MonitorSettings:
        """Environment first (HD_AMQP_URL, HD_DATABASE_URL, HD_WEBHOOK_URLS...), then overrides."""
        from .errors import ConfigError

        env = os.environ if env is None else env
        values = _connections(env)
        if urls := env.get("HD_WEBHOOK_URLS"):
            values["webhook_urls"] = tuple(u.strip() for u in urls.split(",") if u.strip())

        def named(name: str, key: str) -> str:
            """A setting as errors name it: its option too, which the field's name gives
            (``start_timeout_s``: ``--start-timeout``), but for the one without an option."""
            if key == "unserved_after_s":
                return name
            return f"--{key.removesuffix('_s').replace('_', '-')} (or {name})"

        numbers = {
            "HD_LOST_AFTER_BEATS": "lost_after_beats",
            "HD_START_TIMEOUT_S": "start_timeout_s",
            "HD_CANCEL_CONFIRM_S": "cancel_confirm_s",
            "HD_UNSERVED_AFTER_S": "unserved_after_s",
            "HD_LONG_RUNNING_S": "long_running_s",
            "HD_RETRY_BACKOFF_S": "retry_backoff_s",
        }
        for name, key in numbers.items():
            if raw := env.get(name):
                try:
                    values[key] = float(raw)
                except ValueError:
                    raise ConfigError(f"{name}={raw!r} is not a number") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]
        _require_connections(settings.amqp_url, settings.database_url)
        from .webhooks import webhook_problem

        for url in settings.webhook_urls:
            if problem := webhook_problem(url):
                raise ConfigError(problem)
        if not 1 <= settings.lost_after_beats <= 1000:
            raise ConfigError("--lost-after-beats must be 1 to 1000")
        # A NaN or a negative time would never (or always) be past: every one is a duration.
        for name, key in numbers.items():
            value = getattr(settings, key)
            if not 0 <= value <= 10 * 365 * 86400:
                raise ConfigError(
                    f"{named(name, key)} must be 0 to 315360000 seconds (ten years), got {value!r}"
                )
        # At 0 these would fail every starting run at once, or alert on every run.
        for name, key in (
            ("HD_START_TIMEOUT_S", "start_timeout_s"),
            ("HD_LONG_RUNNING_S", "long_running_s"),
            ("HD_UNSERVED_AFTER_S", "unserved_after_s"),
        ):
            if getattr(settings, key) < 1:
                raise ConfigError(f"{named(name, key)} must be 1 s or more")
        return settings
