"""Preflight checks of what an agent needs on its host."""

from __future__ import annotations

from dataclasses import dataclass

import docker
import docker.errors

from transport.connection import probe
from transport.errors import BrokerUnavailable, BrokerUrlInvalid


@dataclass(frozen=True)
class CheckResult:
    """Whether a dependency answered, and what it said."""

    ok: bool
    detail: str


def check_docker() -> CheckResult:
    """The local Docker engine answers; report its version."""
    try:
        client = docker.from_env(timeout=10)
        try:
            info = client.version()
        finally:
            client.close()
    except (docker.errors.DockerException, ValueError) as exc:
        # A DOCKER_HOST that is no URL (a port that is no number) is a ValueError.
        return CheckResult(False, f"no Docker engine answers: {exc}")
    return CheckResult(True, f"engine {info.get('Version')} (API {info.get('ApiVersion')})")


async def check_broker(amqp_url: str) -> CheckResult:
    """A connection to the broker opens; report the server's product and version."""
    try:
        props = await probe(amqp_url)
    except (BrokerUnavailable, BrokerUrlInvalid) as exc:
        return CheckResult(False, str(exc))
    product = props.get("product", "broker")
    version = props.get("version", "?")
    return CheckResult(True, f"{product!s} {version!s}")
