"""Errors of the control plane: one root, a shallow hierarchy.

Adapters translate driver exceptions (aio-pika, asyncpg, docker) into these; nothing above
an adapter catches a driver's exception.
"""

from __future__ import annotations


class DispatcherError(Exception):
    """Root of every error raised by ``dispatcher``."""


class ConfigError(DispatcherError):
    """A setting or an argument is invalid; the message says which and why."""


class BrokerUnavailable(DispatcherError):
    """The broker cannot be reached, or a publish was not confirmed in time."""


class BrokerRefused(DispatcherError):
    """The broker refused one operation (a name it rejects, a permission, a missing exchange):
    retrying the same operation cannot help, unlike ``BrokerUnavailable``."""


class StoreUnavailable(DispatcherError):
    """PostgreSQL cannot be reached; the operation may be retried."""


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
