"""Errors of the transport: one root, a shallow hierarchy.

The adapter translates aio-pika's exceptions into these. Two of them go the other way: a
consumer's handler or check raises ``HandlerUnavailable`` or ``MessageRejected`` (or a subclass
of its own) to tell the consumer what to do with a message.
"""

from __future__ import annotations


class TransportError(Exception):
    """Root of every error raised by ``transport``."""


class BrokerUnavailable(TransportError):
    """The broker cannot be reached, or a publish was not confirmed in time."""


class BrokerUrlInvalid(TransportError):
    """The broker setting (one AMQP URL, or several separated by commas) cannot be used: the
    message names the URL and what is wrong with it."""


class BrokerRefused(TransportError):
    """The broker refused one operation (a name it rejects, a permission, a missing exchange):
    retrying the same operation cannot help, unlike ``BrokerUnavailable``."""


class HandlerUnavailable(TransportError):
    """What a consumer's handler writes to is out for a while: the consumer holds the batch
    and hands it over again, instead of dead-lettering it."""


class MessageRejected(TransportError):
    """A consumer's check refused a decoded message: it is dead-lettered with this error's
    message as its reason."""


class PortUnavailable(TransportError):
    """A port to listen on is taken by another process."""
