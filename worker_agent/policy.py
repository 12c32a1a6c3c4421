"""What this agent lets a run be: the images it may start, and how every container is confined.

The host's owner sets the policy on the agent (options of ``worker-agent run``); the control
plane cannot loosen it. A launch that breaks it fails with LAUNCH_ERROR and the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from .errors import LaunchFailed

#: When the agent pulls a run's image: before every launch, only when the engine lacks it,
#: or never (the host's owner puts images there).
PULL_POLICIES: Final = ("always", "if-missing", "never")


@dataclass(frozen=True)
class LaunchPolicy:
    #: Image references a run may use, by prefix (``registry.example/team/``); empty: any.
    allowed_images: tuple[str, ...] = ()
    #: Processes (and threads) a container may have at once.
    pids_limit: int = 1024
    #: Linux capabilities kept; every other one is dropped.
    capabilities: tuple[str, ...] = ()
    #: ``UID[:GID]`` the containers run as instead of their image's user; None: the image's.
    user: str | None = None
    #: One of PULL_POLICIES.
    pull: str = "if-missing"
    #: Docker network mode of run containers; None: the engine's default.
    network: str | None = None

    def check_image(self, image: str) -> None:
        """Raise LaunchFailed when ``image`` is not allowed on this agent."""
        if self.allowed_images and not any(_within(image, p) for p in self.allowed_images):
            allowed = ", ".join(self.allowed_images)
            raise LaunchFailed(
                f"image {image!r} is not allowed on this agent (allowed prefixes: {allowed})"
            )

    def container_options(self) -> dict[str, Any]:
        """Docker create options that confine a container."""
        options: dict[str, Any] = {
            "security_opt": ["no-new-privileges"],
            "pids_limit": self.pids_limit,
            "cap_drop": ["ALL"],
        }
        if self.capabilities:
            options["cap_add"] = list(self.capabilities)
        if self.user:
            options["user"] = self.user
        if self.network:
            options["network_mode"] = self.network
        return options


def _within(image: str, prefix: str) -> bool:
    """``image`` is ``prefix`` or continues it at a boundary of the reference: a prefix
    ``registry.example/team`` allows ``registry.example/team/job:1`` and ``.../team:1``, never
    ``registry.example/team-evil/job`` or ``registry.example.evil/...``."""
    if not image.startswith(prefix):
        return False
    rest = image[len(prefix) :]
    if not (not rest or prefix[-1] in "/:@" or rest[0] in "/:@"):
        return False
    # The registry Docker would pull from must be named whole by the prefix: ``ubuntu`` must
    # not allow ``ubuntu:5000/x`` (the host ``ubuntu``, port 5000), nor ``python:``
    # ``python:443/x``; ``registry:5000`` allows ``registry:5000/app``.
    registry = _registry(image)
    return not registry or (
        prefix.startswith(registry) and prefix[len(registry) : len(registry) + 1] in ("", "/")
    )


def _registry(reference: str) -> str:
    """The registry host a reference names ('' for Docker Hub), as Docker reads it: the first
    component, when more follow and it has a dot or a port or is ``localhost``."""
    first, slash, _ = reference.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return ""


def parse_capabilities(names: Sequence[str]) -> tuple[str, ...]:
    """``NET_BIND_SERVICE`` or ``CAP_NET_BIND_SERVICE``, any case, as Docker names them."""
    return tuple(name.strip().upper().removeprefix("CAP_") for name in names if name.strip())
