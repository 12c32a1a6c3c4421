"""Broker users made by the control plane's commands: permissions, tags and URLs.

Every identity made here (an agent, a submitter token, the control plane's and the monitor's
roles) is a RabbitMQ user on the control plane's vhost, created through the management API
with an operator's (an administrator's) credentials, and tagged with what it is: commands
touch only users that carry the tag they expect, so an operator's own user is never reset,
retagged or deleted by mistake. Passwords are generated, handed out once inside a URL, and
never stored by the control plane.
"""

from __future__ import annotations

import logging
import re
import time
import urllib.parse
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from schemas import is_safe_name
from schemas.topology import STATUS_EXCHANGE
from transport.errors import BrokerUnavailable
from transport.policies import ManagementApi, management_request
from transport.urls import broker_urls, join

from .errors import ConfigError, DispatcherError

log = logging.getLogger(__name__)

#: How long closing one of a user's connections may keep failing before it is an error.
CLOSE_WITHIN_S = 10.0


class IdentityNotFound(DispatcherError):
    """No broker identity of the expected kind has that name."""


#: Names of exclusive, auto-deleted queues (the client's own ``amq_<hex>`` or the broker's
#: ``amq.gen-*``): only their declaring connection can use them.
PRIVATE = r"amq_[0-9a-f]{32}|amq\.gen-[A-Za-z0-9_-]+"
#: A run id in a routing key (``schemas.topology.event_routing_key``).
RUN_ID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
#: A safe name (an agent id, an agent queue) inside a resource name.
SAFE = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
#: Matches nothing at all, not even the empty routing key (which RabbitMQ's "^$" would).
NOTHING = "(?!)"


@dataclass(frozen=True)
class Permissions:
    """What a broker user may do on the vhost (regular expressions over resource names)."""

    configure: str
    write: str
    read: str
    #: On the status exchange: the routing keys it may publish under.
    status_keys: str
    #: On the status exchange: the binding keys it may bind a queue with.
    status_read: str = ".*"


def alternatives(names: Sequence[str]) -> str:
    """One regular expression that matches exactly these names."""
    return "|".join(re.escape(n) for n in names)


def check_names(*pairs: tuple[str, str]) -> None:
    """Raise ConfigError for the first ``(name, what)`` that is not a safe name."""
    for name, what in pairs:
        if not is_safe_name(name):
            raise ConfigError(
                f"{what} {name!r} is invalid: 1 to 64 letters, digits, '_' and '-', starting "
                "with a letter or digit"
            )


#: Options of the operator's URL that describe the broker, not who connects: the new URL
#: keeps them. The operator's client certificate and login mechanism (certfile, keyfile,
#: auth=external) stay the operator's.
_SHARED_OPTIONS = frozenset({"cafile", "capath", "no_verify_ssl", "heartbeat", "timeout"})


def user_url(amqp_url: str, user: str, password: str) -> str:
    """The operator's broker URL (every node's, for a cluster) with another user's
    credentials instead."""
    return join([_with_user(one, user, password) for one in broker_urls(amqp_url)])


def _with_user(amqp_url: str, user: str, password: str) -> str:
    parts = urllib.parse.urlsplit(amqp_url)
    host = parts.hostname or "localhost"
    netloc = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}@"
    netloc += f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    query = urllib.parse.urlencode(
        [
            (k, v)
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            if k in _SHARED_OPTIONS
        ]
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _vhost(api: ManagementApi) -> str:
    return urllib.parse.quote(api.vhost, safe="")


def _user_path(name: str) -> str:
    return f"/api/users/{urllib.parse.quote(name, safe='')}"


def tags_of(api: ManagementApi, name: str) -> list[str] | None:
    """The user's tags; None when there is no such user."""
    try:
        user = management_request(api, "GET", _user_path(name))
    except BrokerUnavailable as exc:
        if "HTTP 404" in str(exc):
            return None
        raise
    tags = user.get("tags") if isinstance(user, dict) else None
    if isinstance(tags, str):
        return [t for t in tags.split(",") if t]
    return [str(t) for t in tags] if isinstance(tags, list) else []


def require_tag(api: ManagementApi, name: str, tags: Collection[str], what: str) -> str:
    """The one of ``tags`` the user carries; IdentityNotFound without such a user, ConfigError
    for a user that carries none of them (left untouched)."""
    found = tags_of(api, name)
    if found is None:
        raise IdentityNotFound(f"no {what} {name!r} on the broker")
    carried = [t for t in tags if t in found]
    if not carried:
        raise ConfigError(f"broker user {name!r} is no {what}: left untouched")
    return carried[0]


def refuse_other_users(api: ManagementApi, name: str, tag: str, what: str) -> bool:
    """Whether a user ``name`` exists (with ``tag``); ConfigError when it exists without:
    add never takes over another kind of user (an operator's, say)."""
    found = tags_of(api, name)
    if found is not None and tag not in found:
        raise ConfigError(f"broker user {name!r} exists and is no {what}")
    return found is not None


def users_tagged(api: ManagementApi, tag: str) -> list[str]:
    """The names of the broker's users that carry ``tag``."""
    users = management_request(api, "GET", "/api/users") or []
    named = []
    for user in users:
        tags = user.get("tags", [])
        carried = tags.split(",") if isinstance(tags, str) else tags
        if tag in carried:
            named.append(str(user["name"]))
    return sorted(named)


def put_user(
    api: ManagementApi, name: str, password: str, tags: Sequence[str], permissions: Permissions
) -> None:
    """Create or reset the user with its password, tags and permissions on the API's vhost."""
    management_request(api, "PUT", _user_path(name), {"password": password, "tags": ",".join(tags)})
    user = urllib.parse.quote(name, safe="")
    management_request(
        api,
        "PUT",
        f"/api/permissions/{_vhost(api)}/{user}",
        {
            "configure": permissions.configure,
            "write": permissions.write,
            "read": permissions.read,
        },
    )
    management_request(
        api,
        "PUT",
        f"/api/topic-permissions/{_vhost(api)}/{user}",
        {
            "exchange": STATUS_EXCHANGE,
            "write": permissions.status_keys,
            "read": permissions.status_read,
        },
    )


def set_password(api: ManagementApi, name: str, password: str, tags: Sequence[str]) -> None:
    """A new password (the tags are rewritten with it; the permissions stay)."""
    management_request(api, "PUT", _user_path(name), {"password": password, "tags": ",".join(tags)})


def delete_user(api: ManagementApi, name: str) -> None:
    management_request(api, "DELETE", _user_path(name))


def close_connections(api: ManagementApi, user: str, why: str) -> int:
    """Close the user's open connections (the broker keeps them after a password change);
    how many were closed."""
    listing = management_request(api, "GET", "/api/connections") or []
    closed = 0
    for connection in [c for c in listing if c.get("user") == user]:
        name = urllib.parse.quote(str(connection["name"]), safe="")
        if _close(api, f"/api/connections/{name}", why):
            closed += 1
    return closed


def _close(api: ManagementApi, path: str, why: str) -> bool:
    """Close one listed connection; False when it was gone already. The listing lags: a
    connection closing by itself as it is listed makes the DELETE fail (HTTP 404, or 500
    while it is half gone); the DELETE is tried again until it succeeds or the connection
    is no longer there, for ``CLOSE_WITHIN_S`` at most."""
    deadline = time.monotonic() + CLOSE_WITHIN_S
    while True:
        try:
            management_request(api, "DELETE", path, reason=why)
            return True
        except BrokerUnavailable as exc:
            if "HTTP 404" in str(exc):
                return False
            if time.monotonic() > deadline:
                raise
            log.info("closing %s failed (%s); trying again", path, exc)
        time.sleep(0.5)
        try:
            management_request(api, "GET", path)
        except BrokerUnavailable as exc:
            if "HTTP 404" in str(exc):
                return False
