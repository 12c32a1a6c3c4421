"""The ``worker-agent`` command: the long-lived agent on a user's host."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated

import typer

from transport.process import LogLevel, version_option

app = typer.Typer(
    name="worker-agent",
    help=(
        "Agent of the hybrid work dispatcher. It runs on your host, connects out to the broker "
        "only, takes launch instructions from its queues and starts containers through the "
        "local Docker engine. Your code, data and secrets stay on this host."
    ),
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root(
    version: Annotated[bool, version_option("worker-agent")] = False,
) -> None:
    """Hybrid work dispatcher: agent."""


@app.command()
def check(
    amqp_url: Annotated[
        str | None,
        typer.Option(envvar="HD_AMQP_URL", help="Broker to try as well (amqp://user:pass@host/)."),
    ] = None,
) -> None:
    """Check that this host can run an agent: Docker answers (and the broker, if given)."""
    from .checks import check_broker, check_docker

    ok = True
    for name, result in [("docker", check_docker())] + (
        [("broker", asyncio.run(check_broker(amqp_url)))] if amqp_url else []
    ):
        typer.echo(f"{name:8} {'ok  ' if result.ok else 'FAIL'} {result.detail}")
        ok = ok and result.ok
    if not ok:
        raise typer.Exit(1)


@app.command()
def run(
    amqp_url: Annotated[
        str,
        typer.Option(
            envvar="HD_AMQP_URL",
            help="Broker URL, amqp://user:pass@host:5672/ (a cluster's nodes: comma-separated).",
        ),
    ] = "",
    queue: Annotated[
        list[str] | None,
        typer.Option(
            "--queue",
            "-q",
            help="Agent queue to consume; repeatable (default: default; HD_AGENT_QUEUES, "
            "comma-separated).",
        ),
    ] = None,
    max_concurrent: Annotated[
        int | None,
        typer.Option(help="Runs at once on this host (default 4; HD_AGENT_MAX_CONCURRENT).", min=1),
    ] = None,
    cpus: Annotated[
        float | None,
        typer.Option(
            help="CPUs this host offers runs (HD_AGENT_CPUS): a run is taken only while the "
            "CPUs asked by its running ones leave room for it (default: not counted)."
        ),
    ] = None,
    memory_mb: Annotated[
        int | None,
        typer.Option(
            help="Memory in MB this host offers runs (HD_AGENT_MEMORY_MB), counted as --cpus "
            "is (default: not counted)."
        ),
    ] = None,
    gpus: Annotated[
        int | None,
        typer.Option(
            help="GPUs this host offers runs (HD_AGENT_GPUS); a run asking for more never runs "
            "here (default 0)."
        ),
    ] = None,
    agent_id: Annotated[
        str | None, typer.Option(envvar="HD_AGENT_ID", help="This agent's id (default: hostname).")
    ] = None,
    heartbeat_interval: Annotated[
        float | None,
        typer.Option(help="Seconds between heartbeats (default 2; HD_HEARTBEAT_INTERVAL_S)."),
    ] = None,
    engine_timeout: Annotated[
        float | None,
        typer.Option(
            help="A ping of the Docker engine not answered in this long makes it unhealthy: "
            "no new work, and heartbeats say so; past the monitor's loss threshold the runs "
            "fail over (default 5 s; HD_AGENT_ENGINE_TIMEOUT_S)."
        ),
    ] = None,
    run_network: Annotated[
        str | None,
        typer.Option(
            help="Docker network of run containers: none, host or a network's name "
            "(default: the engine's; HD_AGENT_RUN_NETWORK). An engine started with "
            "--bridge=none needs none or host."
        ),
    ] = None,
    keep_finished: Annotated[
        bool,
        typer.Option(
            "--keep-finished", help="Keep finished containers (default: remove; HD_KEEP_FINISHED)."
        ),
    ] = False,
    no_log_forwarding: Annotated[
        bool,
        typer.Option(
            "--no-log-forwarding",
            help="Send no output line of any run: only states and metadata leave this host "
            "(HD_LOG_FORWARDING=off).",
        ),
    ] = False,
    location_check_interval: Annotated[
        float | None, typer.Option(help="Seconds between code-server health checks (10).")
    ] = None,
    location_startup_timeout: Annotated[
        float | None,
        typer.Option(help="Seconds a code server may take to answer before ERROR (180)."),
    ] = None,
    secrets_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="HD_SECRETS_DIR",
            help="Secret files: `secret:NAME` reads the file NAME (after $HD_SECRET_NAME).",
        ),
    ] = None,
    trust_control_plane: Annotated[
        list[str] | None,
        typer.Option(
            "--trust-control-plane",
            help="Take instructions and location snapshots only from this broker user (the "
            "control plane's); repeatable (HD_CONTROL_PLANE_USERS; default: any user the "
            "broker lets publish them).",
        ),
    ] = None,
    allow_secret: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-secret",
            help="Only secrets whose name matches this pattern (CI_*) may be referenced by "
            "runs and locations; repeatable (default: any the host has; HD_AGENT_ALLOW_SECRETS, "
            "comma-separated).",
        ),
    ] = None,
    allow_image: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-image",
            help="Only images starting with this prefix may run here; repeatable (default: any; "
            "HD_AGENT_ALLOW_IMAGES, comma-separated).",
        ),
    ] = None,
    pids_limit: Annotated[
        int | None, typer.Option(help="Processes a container may have at once (1024).")
    ] = None,
    allow_capability: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-capability",
            help="Linux capability containers keep (all are dropped otherwise); repeatable.",
        ),
    ] = None,
    run_as_user: Annotated[
        str | None, typer.Option(help="UID[:GID] containers run as (default: the image's user).")
    ] = None,
    pull: Annotated[
        str | None,
        typer.Option(
            "--pull",
            help="When to pull an image: always, if-missing (default) or never (HD_PULL_POLICY). "
            "Registry "
            "credentials come from this host's Docker config (`docker login`, $DOCKER_CONFIG).",
        ),
    ] = None,
    drain: Annotated[
        bool,
        typer.Option(
            "--drain",
            help="SIGTERM drains (as SIGUSR1 and `worker-agent drain` always do): no new work, "
            "running containers finish and are reported, then the agent exits 0.",
        ),
    ] = False,
    drain_timeout: Annotated[
        float | None,
        typer.Option(help="A drain waits at most this long for running containers (3600 s)."),
    ] = None,
    metrics_port: Annotated[
        int, typer.Option(envvar="HD_METRICS_PORT", help="Serve /metrics here; 0: no metrics.")
    ] = 9466,
    log_level: Annotated[
        LogLevel, typer.Option(case_sensitive=False, help="What to log, from DEBUG up.")
    ] = LogLevel.INFO,
) -> None:
    """Run the agent: consume launch instructions, run containers, report their status.

    SIGTERM or Ctrl-C stops consuming, finishes what is being published and exits 0;
    running containers keep running and are adopted by the agent's next start. SIGUSR1 (and
    SIGTERM with --drain) drains instead: no new work, the running containers finish and are
    reported (the agent shows DRAINING meanwhile), then it exits 0. If a part of
    the agent fails, it shuts down the same way, then exits 1 with the reason in its log.
    """
    import logging

    from transport.errors import PortUnavailable, TransportError
    from transport.metrics import serve_metrics
    from transport.process import run_until_signalled, setup_logging

    from .agent import Agent
    from .errors import AgentError
    from .policy import parse_capabilities
    from .settings import AgentSettings

    try:
        settings = AgentSettings.from_env(
            amqp_url=amqp_url or None,
            queues=tuple(queue) if queue else None,
            max_concurrent=max_concurrent,
            cpus=cpus,
            memory_mb=memory_mb,
            gpus=gpus,
            agent_id=agent_id,
            heartbeat_interval_s=heartbeat_interval,
            engine_timeout_s=engine_timeout,
            run_network=run_network,
            keep_finished=keep_finished or None,
            log_forwarding=False if no_log_forwarding else None,
            location_check_interval_s=location_check_interval,
            location_startup_timeout_s=location_startup_timeout,
            secrets_dir=secrets_dir,
            allowed_images=tuple(allow_image) if allow_image else None,
            allowed_secrets=tuple(allow_secret) if allow_secret else None,
            control_plane_users=tuple(trust_control_plane) if trust_control_plane else None,
            pids_limit=pids_limit,
            capabilities=parse_capabilities(allow_capability) if allow_capability else None,
            run_as_user=run_as_user,
            pull_policy=pull,
            drain_on_sigterm=drain or None,
            drain_timeout_s=drain_timeout,
        )
    except AgentError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    setup_logging(log_level)
    try:
        serve_metrics(metrics_port)
    except PortUnavailable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2 if not 0 <= metrics_port <= 65535 else 1) from None
    log = logging.getLogger("worker_agent")
    if settings.control_plane_users:
        log.info("taking instructions only from %s", ", ".join(settings.control_plane_users))
    else:
        log.warning(
            "taking instructions from any broker user allowed to publish them; "
            "--trust-control-plane USER narrows it to the control plane's"
        )
    try:
        agent = Agent(settings)
        drain_on = (
            (signal.SIGUSR1, signal.SIGTERM) if settings.drain_on_sigterm else (signal.SIGUSR1,)
        )
        run_until_signalled(
            agent.run,
            drain=agent.drain_requested.set,
            drain_on=drain_on,
            # The shutdown's grace, its bounded closes, and a margin.
            exit_within=settings.shutdown_grace_s + 30,
        )
        _without_hung_calls()
    except (AgentError, TransportError) as exc:
        log.error("worker-agent %s exits: %s", settings.agent_id, exc)
        raise typer.Exit(1) from None
    except Exception:
        log.exception("worker-agent %s crashed", settings.agent_id)
        raise typer.Exit(1) from None


@app.command()
def drain(
    pid: Annotated[int, typer.Argument(help="The process id of the agent to drain.")],
) -> None:
    """Drain a running agent on this host: it takes no new work, lets its running containers
    finish and reports them, then exits 0 (SIGUSR1; for an agent in a container,
    `docker kill --signal USR1 CONTAINER` does the same)."""
    import os

    if pid <= 0:
        typer.echo(f"error: {pid} is not a process id (a positive number)", err=True)
        raise typer.Exit(2)
    # SIGUSR1 ends most other programs: only an agent is signalled.
    if not os.path.isdir("/proc/self"):
        typer.echo(
            "error: cannot tell which program a process runs here (no /proc): send the "
            "agent SIGUSR1 yourself (kill -USR1 PID)",
            err=True,
        )
        raise typer.Exit(1)
    if not os.path.exists(f"/proc/{pid}"):
        typer.echo(f"error: no process {pid}", err=True)
        raise typer.Exit(1)
    if not _is_agent(pid):
        typer.echo(f"error: process {pid} is not a running `worker-agent run`", err=True)
        raise typer.Exit(1)
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        typer.echo(f"error: no process {pid}", err=True)
        raise typer.Exit(1) from None
    except PermissionError:
        typer.echo(f"error: not allowed to signal process {pid}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"agent {pid}: draining")


def _is_agent(pid: int) -> bool:
    """Whether ``pid`` runs ``worker-agent run`` (the console script or ``-m worker_agent``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            args = [a.decode(errors="replace") for a in cmdline.read().split(b"\0")]
    except OSError:
        return False
    for index, arg in enumerate(args):
        if arg.rsplit("/", 1)[-1] == "worker-agent" or (
            arg == "worker_agent" and index > 0 and args[index - 1] == "-m"
        ):
            return "run" in args[index + 1 :]
    return False


def main() -> None:
    """Entry point of the ``worker-agent`` console script."""
    app()


def _without_hung_calls() -> None:
    """The agent has stopped; a call to an engine that accepts and never answers may still
    hold a pool thread, which the interpreter would wait for (a minute) at its exit: the
    process ends without it."""
    import logging
    import os
    import threading

    log = logging.getLogger("worker_agent")
    calls = [t for t in threading.enumerate() if t.name.startswith("docker") and t.is_alive()]
    for thread in calls:
        thread.join(timeout=1.0)  # an idle pool thread ends by itself
    if any(thread.is_alive() for thread in calls):
        log.warning("a call to the Docker engine has not returned; exiting without it")
        logging.shutdown()
        os._exit(0)
