"""Broker policies: the backstops that queue arguments cannot give to queues that exist.

A queue's arguments are fixed when it is first declared, so limits added later travel as
RabbitMQ policies, set through the management API (idempotent PUTs):

- every consumed quorum queue gets a delivery limit and the dead-letter exchange: a message
  that keeps coming back (a consumer that crashes on it, say) is dead-lettered by the broker
  after ``delivery_limit`` deliveries, whatever the consumer does;
- the dead-letter queues are bounded (``max-length``, oldest dropped): hostile input cannot
  fill the broker; the control plane counts every dead letter, so the overflow is known.

Consumers never nack a message back on purpose (an agent holds an instruction that waits for
a slot, for Docker or for a location), so only failed deliveries count toward the limit.
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from schemas.topology import DEAD_LETTER_EXCHANGE

from .errors import BrokerUnavailable

log = logging.getLogger(__name__)

#: Queues whose consumers the project runs (requests, status, instructions, control).
CONSUMED_QUEUES_PATTERN = r"^hd\.(requests|status\.store|instructions\..+|control\..+)$"
#: The monitor's queue drops its oldest heartbeats when no monitor reads it: dead-lettering
#: those would flood the dead letters, so it gets the delivery limit alone.
MONITOR_QUEUE_PATTERN = r"^hd\.status\.monitor$"
#: The operators' dead-letter queue and the control plane's copy of it.
DEAD_LETTER_QUEUES_PATTERN = r"^hd\.dead-letters(\.watch)?$"


@dataclass(frozen=True)
class PolicyLimits:
    """The numbers the policies set (``dispatcher serve`` options)."""

    delivery_limit: int = 20
    dead_letter_max_length: int = 100_000


def policies(limits: PolicyLimits) -> dict[str, dict[str, object]]:
    """Every policy of the project, by name, as the management API takes them."""
    return {
        "hd-consumed-queues": {
            "pattern": CONSUMED_QUEUES_PATTERN,
            "apply-to": "queues",
            "priority": 10,
            "definition": {
                "delivery-limit": limits.delivery_limit,
                "dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            },
        },
        "hd-monitor-queue": {
            "pattern": MONITOR_QUEUE_PATTERN,
            "apply-to": "queues",
            "priority": 20,
            "definition": {"delivery-limit": limits.delivery_limit},
        },
        "hd-dead-letters": {
            "pattern": DEAD_LETTER_QUEUES_PATTERN,
            "apply-to": "queues",
            "priority": 10,
            "definition": {
                "max-length": limits.dead_letter_max_length,
                "overflow": "drop-head",
            },
        },
    }


def management_url_for(amqp_url: str, management_url: str = "") -> tuple[str, str]:
    """(management base URL with credentials, vhost) for ``amqp_url``.

    Without an explicit ``management_url``, the broker's host on port 15672 with the AMQP
    credentials (RabbitMQ's default).
    """
    parts = urllib.parse.urlsplit(amqp_url)
    vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    if management_url:
        return management_url.rstrip("/"), vhost
    user = urllib.parse.unquote(parts.username or "guest")
    password = urllib.parse.unquote(parts.password or "guest")
    scheme = "https" if parts.scheme == "amqps" else "http"
    credentials = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
    return f"{scheme}://{credentials}@{parts.hostname or 'localhost'}:15672", vhost


def apply_policies(management_url: str, vhost: str, limits: PolicyLimits) -> None:
    """Set (or reset) every policy on ``vhost``; raises BrokerUnavailable naming the cause."""
    for name, body in policies(limits).items():
        path = f"/api/policies/{urllib.parse.quote(vhost, safe='')}/{name}"
        _request(management_url, "PUT", path, body)


def _request(base: str, method: str, path: str, body: object) -> None:
    parts = urllib.parse.urlsplit(base)
    url = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}{path}"
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method=method)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        raise BrokerUnavailable(
            f"the management API refused {method} {path}: HTTP {exc.code} {exc.reason}"
        ) from exc
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise BrokerUnavailable(f"the management API at {url} does not answer: {exc}") from exc
