"""Agent identities on the broker: one user per agent, with least-privilege permissions.

An agent's broker user is named after its agent id, and tagged ``hd-agent``. On the control
plane's vhost it may:

- read only its own instruction queues, its control queue and the private (exclusive)
  queue of its location snapshots, which is all it may configure; read ``hd.locations`` to
  bind that queue;
- write only to the status exchange (and there, through topic permissions, only under its own
  routing keys: ``run.<event>.<agent id>.*``, ``agent.heartbeat.<agent id>``,
  ``location.<event>.<agent id>``), the requests exchange (LocationsWanted), the dead-letter
  exchange (what it cannot take) and its snapshot queue.

It cannot publish instructions, control messages or snapshots, cannot read another agent's
queues (nor delete any), and cannot speak for another agent. Its queues are declared and bound
here, by the operator's identity, when the agent is added: the agent only looks them up
(passive declares) and consumes. The password is generated, printed once inside the agent's
URL, and never stored by the control plane.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

from schemas import is_safe_name
from schemas.topology import (
    DEAD_LETTER_EXCHANGE,
    LOCATIONS_EXCHANGE,
    REQUESTS_EXCHANGE,
    STATUS_EXCHANGE,
    control_queue,
    instructions_queue,
)
from transport.connection import connect
from transport.errors import BrokerUnavailable
from transport.policies import ManagementApi, management_api, management_request
from transport.topology import declare_control_queue, declare_instructions_queue, declare_topology

from .errors import ConfigError, DispatcherError


class IdentityNotFound(DispatcherError):
    """No agent identity has that name on the broker."""


#: The tag that marks a broker user as an agent identity made here: rotate and revoke touch
#: no other user (an operator's, the control plane's), and add never takes one over.
AGENT_TAG = "hd-agent"


@dataclass(frozen=True)
class Permissions:
    configure: str
    write: str
    read: str
    #: On the status exchange: the routing keys it may publish under.
    status_keys: str


#: Names of exclusive, auto-deleted queues (the client's own ``amq_<hex>`` or the broker's
#: ``amq.gen-*``): only their declaring connection can use them.
_PRIVATE = r"amq_[0-9a-f]{32}|amq\.gen-[A-Za-z0-9_-]+"


def _alternatives(names: Sequence[str]) -> str:
    return "|".join(re.escape(n) for n in names)


def agent_permissions(agent_id: str, queues: Sequence[str]) -> Permissions:
    own = _alternatives([*(instructions_queue(q) for q in queues), control_queue(agent_id)])
    agent = re.escape(agent_id)
    return Permissions(
        configure=rf"^({_PRIVATE})$",
        write=rf"^({_alternatives([STATUS_EXCHANGE, REQUESTS_EXCHANGE, DEAD_LETTER_EXCHANGE])}"
        rf"|{_PRIVATE})$",
        read=rf"^({own}|{re.escape(LOCATIONS_EXCHANGE)}|{_PRIVATE})$",
        status_keys=rf"^(run\.[a-z_]+\.{agent}\..+|agent\.heartbeat\.{agent}|location\.[a-z_]+\.{agent})$",
    )


def _vhost(api: ManagementApi) -> str:
    return urllib.parse.quote(api.vhost, safe="")


def _user_path(name: str) -> str:
    return f"/api/users/{urllib.parse.quote(name, safe='')}"


def agent_url(amqp_url: str, agent_id: str, password: str) -> str:
    """The operator's broker URL with the agent's credentials instead."""
    parts = urllib.parse.urlsplit(amqp_url)
    host = parts.hostname or "localhost"
    netloc = f"{urllib.parse.quote(agent_id, safe='')}:{urllib.parse.quote(password, safe='')}@"
    netloc += f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def _check(agent_id: str, queues: Sequence[str]) -> None:
    for name, what in [(agent_id, "agent id"), *((q, "queue name") for q in queues)]:
        if not is_safe_name(name):
            raise ConfigError(
                f"{what} {name!r} is invalid: 1 to 64 letters, digits, '_' and '-', starting "
                "with a letter or digit"
            )


def _tags(api: ManagementApi, name: str) -> list[str] | None:
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


def _require_agent(api: ManagementApi, agent_id: str) -> None:
    tags = _tags(api, agent_id)
    if tags is None:
        raise IdentityNotFound(f"no agent identity {agent_id!r} on the broker")
    if AGENT_TAG not in tags:
        raise ConfigError(f"broker user {agent_id!r} is not an agent identity: left untouched")


async def add_agent(
    amqp_url: str, management_url: str, agent_id: str, queues: Sequence[str]
) -> str:
    """Create (or reset) the agent's broker user, its permissions and its queues; its URL."""
    _check(agent_id, queues)
    api = management_api(amqp_url, management_url)
    tags = await asyncio.to_thread(_tags, api, agent_id)
    if tags is not None and AGENT_TAG not in tags:
        raise ConfigError(f"broker user {agent_id!r} exists and is not an agent identity")
    # The queues first: the agent's identity may declare them but not bind them.
    connection = await connect(amqp_url, "dispatcher-identities")
    try:
        async with connection.channel() as channel:
            await declare_topology(channel)
            for queue in queues:
                await declare_instructions_queue(channel, queue)
            await declare_control_queue(channel, agent_id)
    finally:
        await connection.close()
    password = secrets.token_urlsafe(24)
    permissions = agent_permissions(agent_id, queues)
    await asyncio.to_thread(_put_user, api, agent_id, password, permissions)
    return agent_url(amqp_url, agent_id, password)


def _put_user(api: ManagementApi, agent_id: str, password: str, permissions: Permissions) -> None:
    management_request(api, "PUT", _user_path(agent_id), {"password": password, "tags": AGENT_TAG})
    user = urllib.parse.quote(agent_id, safe="")
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
        {"exchange": STATUS_EXCHANGE, "write": permissions.status_keys, "read": ".*"},
    )


def rotate_agent(amqp_url: str, management_url: str, agent_id: str) -> tuple[str, int]:
    """A new password for the agent (permissions kept); its open connections are closed.

    Returns its new URL and how many connections were closed."""
    api = management_api(amqp_url, management_url)
    _require_agent(api, agent_id)
    password = secrets.token_urlsafe(24)
    management_request(api, "PUT", _user_path(agent_id), {"password": password, "tags": AGENT_TAG})
    return agent_url(amqp_url, agent_id, password), close_connections(api, agent_id, "rotated")


def revoke_agent(amqp_url: str, management_url: str, agent_id: str) -> None:
    """Delete the agent's broker user: the broker closes its connections at once and refuses
    new ones (any still listed are closed here too)."""
    api = management_api(amqp_url, management_url)
    _require_agent(api, agent_id)
    management_request(api, "DELETE", _user_path(agent_id))
    close_connections(api, agent_id, "revoked")


def _connections_of(api: ManagementApi, user: str) -> list[dict[str, object]]:
    listing = management_request(api, "GET", "/api/connections") or []
    return [c for c in listing if c.get("user") == user]


def close_connections(api: ManagementApi, user: str, why: str) -> int:
    closed = 0
    for connection in _connections_of(api, user):
        name = urllib.parse.quote(str(connection["name"]), safe="")
        try:
            management_request(
                api, "DELETE", f"/api/connections/{name}", reason=f"agent identity {why}"
            )
            closed += 1
        except BrokerUnavailable as exc:
            if "HTTP 404" not in str(exc):  # gone meanwhile
                raise
    return closed
