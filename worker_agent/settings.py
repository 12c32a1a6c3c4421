"""The agent's settings: one frozen object, built from options and environment in one place."""

from __future__ import annotations

import hashlib
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from schemas import is_safe_name
from schemas.bounds import MAX_IN_FLIGHT
from schemas.resources import Capacity
from transport.errors import BrokerUrlInvalid
from transport.process import yes_or_no
from transport.urls import broker_urls

from .errors import AgentError
from .policy import PULL_POLICIES, LaunchPolicy, parse_capabilities
from .slots import MAX_SLOTS

#: An agent id's length at most, and the hex digits of a host name's hash in a default one.
_MAX_ID = 64
_DIGEST = 8

#: Components of a running agent, as named by ``fault``.
COMPONENTS = ("heartbeat", "watcher", "locations", "consumer")


class AgentConfigError(AgentError):
    """An option or environment variable of the agent is invalid."""


#: The Linux capabilities (capabilities(7), without their ``CAP_``), as Docker takes them.
LINUX_CAPABILITIES = frozenset(
    [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ]
)
_SECRET_PATTERN = re.compile(r"^[A-Za-z0-9_*?][A-Za-z0-9_*?-]{0,63}$")
_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?$")


@dataclass(frozen=True)
class AgentSettings:
    """Settings of ``worker-agent run``; every interval is a setting so tests run fast.

    ``fault`` (``HD_AGENT_FAULT``) is for tests: make the named component (heartbeat, watcher,
    locations, consumer) fail once started, so that a test sees how the process fails.
    """

    amqp_url: str
    agent_id: str
    queues: tuple[str, ...] = ("default",)
    max_concurrent: int = 4
    #: The capacity this agent declares (``resources.Capacity``): a run is taken only while
    #: the runs holding its slots leave room for it. None: not counted; GPUs are always counted.
    cpus: float | None = None
    memory_mb: int | None = None
    gpus: int = 0
    heartbeat_interval_s: float = 2.0
    #: A ping of the Docker engine not answered in this long makes it unhealthy: the agent
    #: takes no new work and says so in its heartbeats (``engine``).
    engine_timeout_s: float = 5.0
    #: Docker network of run containers (``none``, ``host`` or a network's name); None: the
    #: engine's default (an engine without its default bridge needs one given).
    run_network: str | None = None
    #: Keep finished containers instead of removing them once reported.
    keep_finished: bool = False
    #: Lines of output sent with a run's final event.
    output_tail_lines: int = 50
    #: How long to try pulling an image that is not on this host.
    pull_timeout_s: float = 30.0
    #: How long a graceful shutdown waits for launches in progress.
    shutdown_grace_s: float = 10.0
    #: SIGTERM drains (as SIGUSR1 always does) instead of stopping at once.
    drain_on_sigterm: bool = False
    #: A drain waits at most this long for running containers to finish.
    drain_timeout_s: float = 3600.0
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
    #: How long a finished attempt stays in heartbeats, as "reported", after its final event
    #: was confirmed: a monitor reading a store that lags behind sees it reported, not gone.
    reported_for_s: float = 60.0
    #: Where secrets are files (``NAME`` holds ``secret:NAME``), after ``HD_SECRET_NAME``.
    secrets_dir: Path | None = None
    #: Broker users whose instructions and snapshots the agent takes (empty: any user the
    #: broker lets publish them); others are dead-lettered with the reason.
    control_plane_users: tuple[str, ...] = ()
    #: Secret names (glob patterns) a run or location may reference (empty: any).
    allowed_secrets: tuple[str, ...] = ()
    #: Image prefixes a run may use (empty: any); see ``policy.LaunchPolicy``.
    allowed_images: tuple[str, ...] = ()
    pids_limit: int = 1024
    capabilities: tuple[str, ...] = ()
    run_as_user: str | None = None
    #: When images are pulled: always, if-missing or never (see ``policy.PULL_POLICIES``).
    pull_policy: str = "if-missing"
    #: For tests only; see the class docstring.
    fault: str | None = None

    @property
    def policy(self) -> LaunchPolicy:
        return LaunchPolicy(
            allowed_images=self.allowed_images,
            pids_limit=self.pids_limit,
            capabilities=self.capabilities,
            user=self.run_as_user,
            pull=self.pull_policy,
            network=self.run_network,
        )

    @property
    def capacity(self) -> Capacity:
        return Capacity(cpus=self.cpus, memory_mb=self.memory_mb, gpus=self.gpus)

    @property
    def docker_threads(self) -> int:
        """Threads (and HTTP connections) for short Docker calls: some per slot, so that
        launches, inspections and output tails of every slot can be under way at once."""
        return max(8, self.max_concurrent + 4)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> AgentSettings:
        """Environment first (HD_AMQP_URL, HD_AGENT_ID, HD_AGENT_QUEUES...), then overrides."""
        env = os.environ if env is None else env
        values: dict[str, object] = {
            "amqp_url": env.get("HD_AMQP_URL", ""),
            "agent_id": env.get("HD_AGENT_ID", "") or default_agent_id(socket.gethostname()),
        }
        if queues := env.get("HD_AGENT_QUEUES"):
            values["queues"] = tuple(q.strip() for q in queues.split(",") if q.strip())
        for key, name, kind in (
            ("max_concurrent", "HD_AGENT_MAX_CONCURRENT", int),
            ("cpus", "HD_AGENT_CPUS", float),
            ("memory_mb", "HD_AGENT_MEMORY_MB", int),
            ("gpus", "HD_AGENT_GPUS", int),
            ("heartbeat_interval_s", "HD_HEARTBEAT_INTERVAL_S", float),
            ("engine_timeout_s", "HD_AGENT_ENGINE_TIMEOUT_S", float),
        ):
            if raw := env.get(name):
                try:
                    values[key] = kind(raw)
                except ValueError:
                    raise AgentConfigError(f"{name}={raw!r} is not a number") from None
        for name, key in (
            ("HD_KEEP_FINISHED", "keep_finished"),
            ("HD_LOG_FORWARDING", "log_forwarding"),
        ):
            try:
                flag = yes_or_no(env, name)
            except ValueError as exc:
                raise AgentConfigError(str(exc)) from None
            if flag is not None:
                values[key] = flag
        if secrets_dir := env.get("HD_SECRETS_DIR"):
            values["secrets_dir"] = Path(secrets_dir)
        for name, key in (
            ("HD_AGENT_ALLOW_IMAGES", "allowed_images"),
            ("HD_CONTROL_PLANE_USERS", "control_plane_users"),
            ("HD_AGENT_ALLOW_SECRETS", "allowed_secrets"),
        ):
            if listed := env.get(name):
                items = tuple(item.strip() for item in listed.split(",") if item.strip())
                if not items:
                    # "," would mean none listed, which means any: a narrowing setting that
                    # widens is refused (unset it for any).
                    raise AgentConfigError(f"{name}={listed!r} lists nothing; unset it for any")
                values[key] = items
        if pull := env.get("HD_PULL_POLICY"):
            values["pull_policy"] = pull
        if network := env.get("HD_AGENT_RUN_NETWORK"):
            values["run_network"] = network
        if fault := env.get("HD_AGENT_FAULT"):
            values["fault"] = fault
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        if not self.amqp_url:
            raise AgentConfigError("no broker: pass --amqp-url or set HD_AMQP_URL")
        try:
            broker_urls(self.amqp_url)
        except BrokerUrlInvalid as exc:
            raise AgentConfigError(f"HD_AMQP_URL / --amqp-url: {exc}") from None
        if not is_safe_name(self.agent_id):
            raise AgentConfigError(
                f"agent id {self.agent_id!r} is invalid: use 1 to 64 letters, digits, '_' "
                "and '-', starting with a letter or digit"
            )
        if not self.queues:
            raise AgentConfigError("give at least one --queue")
        for option, given in (
            ("--trust-control-plane", self.control_plane_users),
            ("--allow-image", self.allowed_images),
            ("--allow-secret", self.allowed_secrets),
        ):
            if any(not item.strip() for item in given):
                raise AgentConfigError(f"{option} must not be empty")
            for item in given:
                if not item.isprintable():  # a byte that was no UTF-8 is a surrogate: not
                    raise AgentConfigError(
                        f"{option} {item!r} has a control character or a byte that is no UTF-8"
                    )
        for queue in self.queues:
            if not is_safe_name(queue):
                raise AgentConfigError(
                    f"queue name {queue!r} is invalid: use 1 to 64 letters, digits, '_' and "
                    "'-', starting with a letter or digit"
                )
        if not 1 <= self.max_concurrent <= MAX_SLOTS:
            raise AgentConfigError(
                f"--max-concurrent must be at least 1 and at most {MAX_SLOTS}: a heartbeat "
                f"lists every run in flight and those just reported, at most {MAX_IN_FLIGHT} "
                "in one message"
            )
        # The contract's bounds (schemas.bounds): the heartbeat must carry what is declared.
        if self.cpus is not None and not 0.01 <= self.cpus <= 4096:
            raise AgentConfigError(
                f"--cpus {self.cpus:g} is out of range: give 0.01 to 4096 CPUs (fractions count), "
                "or leave it out not to count CPUs"
            )
        if self.memory_mb is not None and not 6 <= self.memory_mb <= 1_048_576:
            raise AgentConfigError(
                f"--memory-mb {self.memory_mb} is out of range: give 6 to 1048576 MB, or leave "
                "it out not to count memory"
            )
        if not 0 <= self.gpus <= 256:
            raise AgentConfigError(f"--gpus {self.gpus} is out of range: give 0 to 256 GPUs")
        if not 0.5 <= self.engine_timeout_s <= 300:
            raise AgentConfigError("--engine-timeout must be 0.5 to 300 seconds")
        if self.run_network is not None and not is_safe_name(self.run_network):
            raise AgentConfigError(
                f"--run-network {self.run_network!r} is invalid: give none, host or a network's "
                "name (letters, digits, '_' and '-')"
            )
        if not 0.05 <= self.heartbeat_interval_s <= 300:
            raise AgentConfigError("the heartbeat interval must be positive, 0.05 s to 300 s")
        if not 0.1 <= self.location_check_interval_s <= 3600:
            raise AgentConfigError("--location-check-interval must be 0.1 to 3600 seconds")
        if not 1 <= self.location_startup_timeout_s <= 86400:
            raise AgentConfigError("--location-startup-timeout must be 1 to 86400 seconds")
        if self.secrets_dir is not None and not self.secrets_dir.is_dir():
            raise AgentConfigError(f"--secrets-dir {self.secrets_dir} is not a directory")
        for pattern in self.allowed_secrets:
            if not _SECRET_PATTERN.match(pattern):
                raise AgentConfigError(
                    f"--allow-secret {pattern!r} is not a secret name or a pattern of one "
                    "(letters, digits, _ -, and * or ?)"
                )
        if self.pull_policy not in PULL_POLICIES:
            raise AgentConfigError(
                f"pull policy {self.pull_policy!r} is not one of {', '.join(PULL_POLICIES)}"
            )
        if not 0 <= self.drain_timeout_s <= 7 * 86400:
            raise AgentConfigError("--drain-timeout must be 0 to 604800 seconds (a week)")
        if not 16 <= self.pids_limit <= 4_194_304:
            raise AgentConfigError("--pids-limit must be at least 16 (and at most 4,194,304)")
        for cap in self.capabilities:
            if cap == "ALL":
                raise AgentConfigError(
                    "capability ALL would give containers every capability back: name each "
                    "one they need (NET_BIND_SERVICE...)"
                )
            if cap not in LINUX_CAPABILITIES or cap != parse_capabilities([cap])[0]:
                raise AgentConfigError(
                    f"capability {cap!r} is not a Linux capability name (NET_BIND_SERVICE...)"
                )
        if self.run_as_user is not None and not _USER.match(self.run_as_user):
            raise AgentConfigError(
                f"--run-as-user {self.run_as_user!r}: give UID[:GID] or a user name[:group]"
            )
        for prefix in self.allowed_images:
            if not prefix.strip() or any(c.isspace() for c in prefix):
                raise AgentConfigError(f"--allow-image {prefix!r}: give an image name prefix")
        if self.fault is not None and self.fault not in COMPONENTS:
            raise AgentConfigError(
                f"HD_AGENT_FAULT={self.fault!r}: name one of {', '.join(COMPONENTS)}"
            )


def default_agent_id(hostname: str) -> str:
    """An agent id from a host name, for an agent started without ``--agent-id``.

    A host name that is a valid id is used as it is. Any other has the characters an id
    cannot hold (a domain's dots) replaced by '-', is cut to leave room, and ends with '-' and
    8 hex digits of its SHA-256: host names that differ only in what had to change
    (``build.eu-west-1`` and ``build-eu-west-1``), or only past the 55th character, still
    get ids of their own.
    """
    if is_safe_name(hostname):
        return hostname
    digest = hashlib.sha256(hostname.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST]
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "-", hostname).lstrip("_-")
    return f"{cleaned[: _MAX_ID - _DIGEST - 1] or 'agent'}-{digest}"
