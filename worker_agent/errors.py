"""Errors of the agent: one root, a shallow hierarchy. The Docker adapter raises these."""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error raised by ``worker_agent``."""


class DockerUnavailable(AgentError):
    """The Docker engine does not answer; the instruction is retried later, not lost."""


class ImageMissing(AgentError):
    """The image is not on this host and could not be pulled."""


class LaunchFailed(AgentError):
    """Docker refused to create or start the container (bad command, bad options...)."""


class LocationUnavailable(AgentError):
    """No healthy code server of the run's location answers yet; the launch is retried."""


class AgentFailed(AgentError):
    """A component of the agent failed, or ended when it should run forever; the agent shut
    down in order and its process exits non-zero, so that a supervisor restarts it."""


class AgentRevoked(AgentFailed):
    """The broker refuses this agent's credentials: its identity was revoked (or its secret
    rotated). It stops its containers, since their runs are failed over elsewhere."""


class UntrustedSender(AgentError):
    """An instruction or snapshot published by another broker user than the control plane's
    (it is dead-lettered with the reason)."""
