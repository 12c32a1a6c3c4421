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
from collections.abc import Sequence

from schemas.topology import (
    DEAD_LETTER_EXCHANGE,
    LOCATIONS_EXCHANGE,
    REQUESTS_EXCHANGE,
    STATUS_EXCHANGE,
    control_queue,
    instructions_queue,
)
from transport.connection import connect
from transport.policies import management_api
from transport.topology import declare_control_queue, declare_instructions_queue, declare_topology

from .broker_users import (
    PRIVATE,
    IdentityNotFound,
    Permissions,
    alternatives,
    check_names,
    close_connections,
    delete_user,
    put_user,
    refuse_other_users,
    require_tag,
    set_password,
    user_url,
)

__all__ = [
    "AGENT_TAG",
    "IdentityNotFound",
    "Permissions",
    "add_agent",
    "agent_permissions",
    "agent_url",
    "revoke_agent",
    "rotate_agent",
]

#: The tag that marks a broker user as an agent identity made here: rotate and revoke touch
#: no other user (an operator's, the control plane's), and add never takes one over.
AGENT_TAG = "hd-agent"
_WHAT = "agent identity"

#: The agent's URL: the operator's broker URL with the agent's credentials.
agent_url = user_url


def agent_permissions(agent_id: str, queues: Sequence[str]) -> Permissions:
    own = alternatives([*(instructions_queue(q) for q in queues), control_queue(agent_id)])
    agent = re.escape(agent_id)
    return Permissions(
        configure=rf"^({PRIVATE})$",
        write=rf"^({alternatives([STATUS_EXCHANGE, REQUESTS_EXCHANGE, DEAD_LETTER_EXCHANGE])}"
        rf"|{PRIVATE})$",
        read=rf"^({own}|{re.escape(LOCATIONS_EXCHANGE)}|{PRIVATE})$",
        status_keys=rf"^(run\.[a-z_]+\.{agent}\..+|agent\.heartbeat\.{agent}|location\.[a-z_]+\.{agent})$",
    )


async def add_agent(
    amqp_url: str, management_url: str, agent_id: str, queues: Sequence[str]
) -> str:
    """Create (or reset) the agent's broker user, its permissions and its queues; its URL."""
    check_names((agent_id, "agent id"), *((q, "queue name") for q in queues))
    api = management_api(amqp_url, management_url)
    await asyncio.to_thread(refuse_other_users, api, agent_id, AGENT_TAG, _WHAT)
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
    await asyncio.to_thread(put_user, api, agent_id, password, [AGENT_TAG], permissions)
    return agent_url(amqp_url, agent_id, password)


def rotate_agent(amqp_url: str, management_url: str, agent_id: str) -> tuple[str, int]:
    """A new password for the agent (permissions kept); its open connections are closed.

    Returns its new URL and how many connections were closed."""
    api = management_api(amqp_url, management_url)
    require_tag(api, agent_id, [AGENT_TAG], _WHAT)
    password = secrets.token_urlsafe(24)
    set_password(api, agent_id, password, [AGENT_TAG])
    closed = close_connections(api, agent_id, "agent identity rotated")
    return agent_url(amqp_url, agent_id, password), closed


def revoke_agent(amqp_url: str, management_url: str, agent_id: str) -> None:
    """Delete the agent's broker user: the broker closes its connections at once and refuses
    new ones (any still listed are closed here too)."""
    api = management_api(amqp_url, management_url)
    require_tag(api, agent_id, [AGENT_TAG], _WHAT)
    delete_user(api, agent_id)
    close_connections(api, agent_id, "agent identity revoked")
