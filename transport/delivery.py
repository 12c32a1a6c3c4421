"""A decoded message with the delivery it came in, and settling a delivery."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Generic, TypeVar

import aio_pika.abc

from .connection import TRANSIENT

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Delivery(Generic[T]):
    """A decoded message and the delivery it came in (for ack, nack and redelivery checks)."""

    message: T
    raw: aio_pika.abc.AbstractIncomingMessage


async def settle(operation: Awaitable[None]) -> None:
    """Ack or nack; a delivery from a channel that has since closed is requeued by the broker."""
    try:
        await operation
    except TRANSIENT as exc:
        log.debug("could not settle a delivery (%r); the broker will redeliver it", exc)
