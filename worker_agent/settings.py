"""The agent's settings: one frozen object, built from options and environment in one place."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import AgentError

_QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")


class AgentConfigError(AgentError):
    """An option or environment variable of the agent is invalid."""


@dataclass(frozen=True)
class AgentSettings:
    """Settings of ``worker-agent run``; every interval is a setting so tests run fast."""

    amqp_url: str
    agent_id: str
    queues: tuple[str, ...] = ("default",)
    max_concurrent: int = 4
    heartbeat_interval_s: float = 2.0
    #: Keep finished containers instead of removing them once reported.
    keep_finished: bool = False
    #: Lines of output sent with a run's final event.
    output_tail_lines: int = 50
    #: How long to try pulling an image that is not on this host.
    pull_timeout_s: float = 30.0
    #: How long a graceful shutdown waits for launches in progress.
    shutdown_grace_s: float = 10.0
    #: Forward runs' output lines as RunLog events. Off: only states and metadata (no output
    #: line, not even the tail of a failed run) leave the host.
    log_forwarding: bool = True
    log_batch_interval_s: float = 0.5
    log_max_line_chars: int = 4096
    log_max_lines_per_run: int = 10_000
    #: How often code servers are health-checked (and reconciled).
    location_check_interval_s: float = 10.0
    #: A code server not healthy after this long: the location is ERROR.
    location_startup_timeout_s: float = 180.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> AgentSettings:
        """Environment first (HD_AMQP_URL, HD_AGENT_ID, HD_AGENT_QUEUES...), then overrides."""
        env = os.environ if env is None else env
        values: dict[str, object] = {
            "amqp_url": env.get("HD_AMQP_URL", ""),
            "agent_id": env.get("HD_AGENT_ID", "") or socket.gethostname(),
        }
        if queues := env.get("HD_AGENT_QUEUES"):
            values["queues"] = tuple(q.strip() for q in queues.split(",") if q.strip())
        for key, name, kind in (
            ("max_concurrent", "HD_AGENT_MAX_CONCURRENT", int),
            ("heartbeat_interval_s", "HD_HEARTBEAT_INTERVAL_S", float),
        ):
            if raw := env.get(name):
                try:
                    values[key] = kind(raw)
                except ValueError:
                    raise AgentConfigError(f"{name}={raw!r} is not a number") from None
        if env.get("HD_KEEP_FINISHED", "").lower() in ("1", "true", "yes"):
            values["keep_finished"] = True
        if env.get("HD_LOG_FORWARDING", "").lower() in ("0", "false", "no"):
            values["log_forwarding"] = False
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        if not self.amqp_url:
            raise AgentConfigError("no broker: pass --amqp-url or set HD_AMQP_URL")
        if not self.agent_id or len(self.agent_id) > 200:
            raise AgentConfigError("the agent id must be 1 to 200 characters")
        if not self.queues:
            raise AgentConfigError("give at least one --queue")
        for queue in self.queues:
            if not _QUEUE_NAME.match(queue):
                raise AgentConfigError(
                    f"queue name {queue!r} is invalid: use letters, digits, '_', '.', ':', '-'"
                )
        if self.max_concurrent < 1:
            raise AgentConfigError("--max-concurrent must be at least 1")
        if self.heartbeat_interval_s <= 0:
            raise AgentConfigError("the heartbeat interval must be positive")
