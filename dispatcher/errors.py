"""Errors of the control plane: one root, a shallow hierarchy.

Adapters translate driver exceptions (asyncpg, docker) into these; the broker's errors are
the transport's (``transport.errors``), re-exported here for scripts that use the client.
Nothing above an adapter catches a driver's exception.
"""

from __future__ import annotations

from transport.errors import BrokerRefused, BrokerUnavailable, HandlerUnavailable, TransportError

__all__ = [
    "BadLimit",
    "BrokerRefused",
    "BrokerUnavailable",
    "ConfigError",
    "DispatcherError",
    "InvalidSubmission",
    "LocationNotFound",
    "RunNotFound",
    "StoreUnavailable",
    "SubmissionRejected",
    "TransportError",
]


class DispatcherError(Exception):
    """Root of every error raised by ``dispatcher``."""


class ConfigError(DispatcherError):
    """A setting or an argument is invalid; the message says which and why."""


class StoreUnavailable(DispatcherError, HandlerUnavailable):
    """PostgreSQL cannot be reached; the operation may be retried. A consumer whose handler
    raises it holds the batch until the store is back."""


class BadLimit(ConfigError):
    """A concurrency limit's key or size is invalid; the message says how to write it."""


class RunNotFound(DispatcherError):
    """No run has the given id."""


class SubmissionRejected(DispatcherError):
    """The control plane refused a submission; the message names the problem."""


class InvalidSubmission(SubmissionRejected):
    """A submission breaks the wire contract; checked before anything is sent.

    ``field`` names the offending field (as the control plane would), when known.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class VerdictUnreadable(DispatcherError):
    """The control plane ended a run with a verdict this client cannot read (a newer release's
    reason, say): the run is over, how it ended is for a newer client to say."""


class LocationNotFound(DispatcherError):
    """No code location has that name."""
