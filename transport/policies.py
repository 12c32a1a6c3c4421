"""Broker policies: the backstops that queue arguments cannot give to queues that exist.

A queue's arguments are fixed when it is first declared, so limits added later travel as
RabbitMQ policies, set through the management API (idempotent PUTs):

- every consumed quorum queue gets a delivery limit and the dead-letter exchange: a message
  that keeps coming back (a consumer that crashes on it, say) is dead-lettered by the broker
  after ``delivery_limit`` deliveries, whatever the consumer does;
- the dead-letter queues are bounded (``max-length``, oldest dropped): hostile input cannot
  fill the broker; the control plane counts every dead letter, so the overflow is known.

Consumers never nack a message back on purpose (an agent holds an instruction that waits for
a slot, for Docker or for a location; a consumer holds a batch through a database outage), so
only failed deliveries count toward the limit.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from schemas.topology import DEAD_LETTER_EXCHANGE

from .errors import BrokerUnavailable
from .urls import broker_urls, hide_password, url_problem, vhost_of

log = logging.getLogger(__name__)

#: Queues whose consumers the project runs (requests, status, instructions, control).
CONSUMED_QUEUES_PATTERN = r"^hd\.(requests|status\.store|instructions\..+|control\..+)$"
#: The monitor's queue drops its oldest heartbeats when no monitor reads it: dead-lettering
#: those would flood the dead letters, so it gets the delivery limit alone.
MONITOR_QUEUE_PATTERN = r"^hd\.status\.monitor$"
#: The operators' dead-letter queue.
DEAD_LETTER_QUEUE_PATTERN = r"^hd\.dead-letters$"
#: The control plane's copy of it: bounded too, and with a delivery limit but no dead-letter
#: exchange (it would dead-letter into itself).
DEAD_LETTER_WATCH_PATTERN = r"^hd\.dead-letters\.watch$"


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
            "pattern": DEAD_LETTER_QUEUE_PATTERN,
            "apply-to": "queues",
            "priority": 10,
            "definition": {
                "max-length": limits.dead_letter_max_length,
                "overflow": "drop-head",
            },
        },
        "hd-dead-letter-watch": {
            "pattern": DEAD_LETTER_WATCH_PATTERN,
            "apply-to": "queues",
            "priority": 10,
            "definition": {
                "max-length": limits.dead_letter_max_length,
                "overflow": "drop-head",
                "delivery-limit": limits.delivery_limit,
            },
        },
    }


@dataclass(frozen=True)
class ManagementApi:
    """Where RabbitMQ's management API answers, and as whom.

    A cluster's nodes each serve the whole cluster's API: a call goes to the first of
    ``base_urls`` that answers."""

    base_urls: tuple[str, ...]  # scheme, host, port and any path prefix; no credentials
    user: str
    password: str
    vhost: str
    #: The CA that signed the API's certificate over HTTPS (None: the system's CAs).
    cafile: str | None = None

    @property
    def base_url(self) -> str:
        return self.base_urls[0]


def management_api(amqp_url: str, management_url: str = "") -> ManagementApi:
    """The management API of the broker of ``amqp_url`` (the broker setting: one URL or a
    cluster's), on its vhost.

    An explicit ``management_url`` (http://user:pass@host:port/prefix, or several separated by
    commas) is taken as it is; the AMQP credentials are used when it names none. Otherwise
    each broker node's host on RabbitMQ's default management port: 15672 (http), or 15671
    (https) for an ``amqps`` broker. Over HTTPS the server is verified with the CA of the
    management URL's ``cafile=``, else the AMQP URL's, else the system's.
    """
    amqp_urls = broker_urls(amqp_url)
    given = [u.strip() for u in management_url.split(",") if u.strip()]
    if management_url.strip() and (not given or len(given) < management_url.count(",") + 1):
        raise BrokerUnavailable("the management URL setting has an empty entry (a stray comma?)")
    first = urllib.parse.urlsplit(amqp_urls[0])
    cafile = _query(amqp_urls[0], "cafile")
    user = urllib.parse.unquote(first.username or "")
    password = urllib.parse.unquote(first.password or "")
    bases = []
    if given:
        for n, one in enumerate(given, 1):
            # One of a list is named by its number: a comma in a password cut it.
            what = (
                f"management URL {n} of {len(given)}"
                if len(given) > 1
                else f"the management URL {hide_password(one)!r}"
            )
            if problem := url_problem(one, what, alone=len(given) == 1):
                raise BrokerUnavailable(problem)
            if " " in one.partition("?")[0]:  # http.client refuses it at every call
                raise BrokerUnavailable(f"{what} has a space outside its query: write %20")
            parts = urllib.parse.urlsplit(one)
            port = f":{parts.port}" if parts.port else ""
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise BrokerUnavailable(f"{what} is not an http:// or https:// URL with a host")
            bases.append(f"{parts.scheme}://{_host(one)}{port}{parts.path.rstrip('/')}")
        named = urllib.parse.urlsplit(given[0])
        if named.username:
            user = urllib.parse.unquote(named.username)
            password = urllib.parse.unquote(named.password or "")
        cafile = _query(given[0], "cafile") or cafile
    else:
        for one in amqp_urls:
            scheme, default = ("https", 15671) if one.startswith("amqps:") else ("http", 15672)
            bases.append(f"{scheme}://{_host(one)}:{default}")
    vhost = vhost_of(amqp_urls[0])
    return ManagementApi(tuple(dict.fromkeys(bases)), user, password, vhost, cafile)


def _host(url: str) -> str:
    host = urllib.parse.urlsplit(url).hostname or "localhost"
    return f"[{host}]" if ":" in host else host


def _query(url: str, name: str) -> str | None:
    values = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query).get(name)
    return values[0] if values else None


def apply_policies(api: ManagementApi, limits: PolicyLimits) -> None:
    """Set (or reset) every policy on the API's vhost; raises BrokerUnavailable naming why."""
    for name, body in policies(limits).items():
        path = f"/api/policies/{urllib.parse.quote(api.vhost, safe='')}/{name}"
        _request(api, "PUT", path, body)


def _request(api: ManagementApi, method: str, path: str, body: object) -> None:
    management_request(api, method, path, body)


def management_request(
    api: ManagementApi, method: str, path: str, body: object = None, reason: str = ""
) -> Any:
    """One call of the management API, at the first node that answers; its JSON answer (None
    when empty). Raises BrokerUnavailable naming the call and the broker's answer."""
    unanswered: list[str] = []
    for base in api.base_urls:
        try:
            return _call(api, base, method, path, body, reason)
        except _NoAnswer as exc:
            unanswered.append(str(exc))
    raise BrokerUnavailable("; ".join(unanswered))


#: Answers of a proxy or a node that cannot serve now: another node may do better.
_NODE_TROUBLE = frozenset({502, 503, 504})


class _NoAnswer(Exception):
    """This node's API did not answer (another node's may)."""


def _call(api: ManagementApi, base: str, method: str, path: str, body: object, reason: str) -> Any:
    url = base + path
    data = None if body is None else json.dumps(body).encode()
    token = base64.b64encode(f"{api.user}:{api.password}".encode()).decode()
    try:
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", f"Basic {token}")
        request.add_header("Content-Type", "application/json")
        if reason:
            request.add_header("X-Reason", reason)
        context = (
            ssl.create_default_context(cafile=api.cafile) if url.startswith("https:") else None
        )
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            answer = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code in _NODE_TROUBLE:
            raise _NoAnswer(f"the management API at {url} answers HTTP {exc.code}") from exc
        raise BrokerUnavailable(
            f"the management API refused {method} {path}: HTTP {exc.code} {exc.reason}"
        ) from exc
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as exc:
        raise _NoAnswer(f"the management API at {url} does not answer: {exc}") from exc
    except http.client.HTTPException as exc:  # not HTTP at all (the AMQP port, say)
        raise _NoAnswer(f"the management API at {url} does not speak HTTP: {exc!r}") from exc
    try:
        return json.loads(answer) if answer.strip() else None
    except ValueError as exc:
        raise _NoAnswer(f"the management API at {url} answers no JSON: {exc}") from exc
