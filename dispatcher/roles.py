"""Role identities: broker users for the control plane, the failure monitor and the web process.

Each gets what its process really does on the broker, and nothing else (none is an
administrator):

- **control plane** (``dispatcher serve``, tagged ``hd-control-plane`` and ``policymaker``):
  declares the whole topology (every ``hd.*`` exchange and queue but the monitor's), the
  instruction and control queues as instructions go out (``declare_target``), and binds
  them; consumes ``hd.requests``, ``hd.status.store`` and ``hd.dead-letters.watch``;
  publishes instructions, control messages, location snapshots, dead letters and, on
  ``hd.status``, only its own answers (``run.<accepted|rejected|retrying|ended>._control.*``)
  and the monitor's decisions that its outbox relays (``run.failed._monitor.*``). It sets
  the broker policies at start-up, hence ``policymaker`` (policies of its vhost only).
- **monitor** (``dispatcher monitor``, tagged ``hd-monitor``): declares and binds its own
  queue, ``hd.status.monitor`` (heartbeats, ``agent.#``; it unbinds the run keys of earlier
  versions), consumes it, and dead-letters what it cannot take. It publishes nothing on
  ``hd.status``: its decisions are rows in PostgreSQL, which the control plane's relay
  publishes.
- **web** (``dispatcher web``, tagged ``hd-web``): publishes submissions and cancels to
  ``hd.requests``, and nothing else: no read permission at all, so it cannot bind anything
  (a binding needs read on its source). It reads everything from PostgreSQL, the dead
  letters too. The intake takes its submissions (and the
  ``submitted_by`` it stamps) once its name is in the control plane's
  ``HD_TRUSTED_BROKER_USERS``; a web process that is broken into can then submit and
  cancel, but never publish an instruction, a control message or a status event.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from dataclasses import dataclass

from schemas.topology import (
    AGENT_EVENTS,
    CONTROL_EXCHANGE,
    CONTROL_SOURCE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_WATCH_QUEUE,
    INSTRUCTIONS_EXCHANGE,
    LOCATION_EVENTS,
    LOCATIONS_EXCHANGE,
    MONITOR_SOURCE,
    REQUESTS_EXCHANGE,
    REQUESTS_QUEUE,
    RUN_EVENTS,
    STATUS_EXCHANGE,
    STATUS_MONITOR_QUEUE,
    STATUS_STORE_QUEUE,
)
from transport.connection import connect
from transport.policies import ManagementApi, management_api
from transport.topology import declare_topology

from .broker_users import (
    NOTHING,
    RUN_ID,
    SAFE,
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
from .errors import ConfigError


@dataclass(frozen=True)
class Role:
    """A process's broker identity: the tag that marks it and its broker tags."""

    name: str
    tag: str
    tags: tuple[str, ...]


CONTROL_PLANE = Role("control-plane", "hd-control-plane", ("hd-control-plane", "policymaker"))
MONITOR = Role("monitor", "hd-monitor", ("hd-monitor",))
WEB = Role("web", "hd-web", ("hd-web",))
ROLES = {role.name: role for role in (CONTROL_PLANE, MONITOR, WEB)}


def control_plane_permissions() -> Permissions:
    # Exchange and queue names overlap (hd.requests, hd.dead-letters are both): a permission
    # on the name covers both, which the control plane needs anyway.
    declared = alternatives(
        [
            DEAD_LETTER_EXCHANGE,
            DEAD_LETTER_WATCH_QUEUE,
            REQUESTS_EXCHANGE,
            INSTRUCTIONS_EXCHANGE,
            CONTROL_EXCHANGE,
            LOCATIONS_EXCHANGE,
            STATUS_EXCHANGE,
            STATUS_STORE_QUEUE,
        ]
    )
    per_agent = rf"{re.escape(INSTRUCTIONS_EXCHANGE)}\.{SAFE}|{re.escape(CONTROL_EXCHANGE)}\.{SAFE}"
    # What it publishes to, and the queues it binds (a binding needs write on its queue).
    written = alternatives(
        [
            INSTRUCTIONS_EXCHANGE,
            CONTROL_EXCHANGE,
            LOCATIONS_EXCHANGE,
            STATUS_EXCHANGE,
            DEAD_LETTER_EXCHANGE,
            REQUESTS_QUEUE,
            STATUS_STORE_QUEUE,
            DEAD_LETTER_QUEUE,
            DEAD_LETTER_WATCH_QUEUE,
        ]
    )
    # What it consumes, and the exchanges it binds from (a binding needs read on them).
    read = alternatives(
        [
            REQUESTS_QUEUE,
            STATUS_STORE_QUEUE,
            DEAD_LETTER_WATCH_QUEUE,
            DEAD_LETTER_EXCHANGE,
            REQUESTS_EXCHANGE,
            STATUS_EXCHANGE,
            INSTRUCTIONS_EXCHANGE,
            CONTROL_EXCHANGE,
        ]
    )
    control, monitor = re.escape(CONTROL_SOURCE), re.escape(MONITOR_SOURCE)
    return Permissions(
        configure=rf"^({declared}|{per_agent})$",
        write=rf"^({written}|{per_agent})$",
        read=rf"^({read})$",
        status_keys=rf"^(run\.(accepted|rejected|retrying|ended)\.{control}\.{RUN_ID}"
        rf"|run\.failed\.{monitor}\.{RUN_ID})$",
        status_read=rf"^({alternatives([RUN_EVENTS, AGENT_EVENTS, LOCATION_EVENTS])})$",
    )


def monitor_permissions() -> Permissions:
    own = re.escape(STATUS_MONITOR_QUEUE)
    return Permissions(
        configure=rf"^{own}$",
        write=rf"^({own}|{re.escape(DEAD_LETTER_EXCHANGE)})$",
        read=rf"^({own}|{re.escape(STATUS_EXCHANGE)})$",
        status_keys=NOTHING,
        # It binds heartbeats; the run keys are only unbound (bindings of earlier versions),
        # which the broker checks like a binding.
        status_read=rf"^({alternatives([AGENT_EVENTS, RUN_EVENTS, 'run.*'])})$",
    )


def web_permissions() -> Permissions:
    return Permissions(
        configure=NOTHING,
        # The exchange; the queue of the same name too (RabbitMQ's permissions name both),
        # which without read on any exchange it can bind nothing to.
        write=rf"^{re.escape(REQUESTS_EXCHANGE)}$",
        read=NOTHING,
        status_keys=NOTHING,
        status_read=NOTHING,
    )


def permissions_of(role: Role) -> Permissions:
    if role is CONTROL_PLANE:
        return control_plane_permissions()
    return monitor_permissions() if role is MONITOR else web_permissions()


def role_named(name: str) -> Role:
    try:
        return ROLES[name]
    except KeyError:
        raise ConfigError(f"unknown role {name!r}; choose from {', '.join(ROLES)}") from None


async def add_role(amqp_url: str, management_url: str, role: Role, name: str) -> str:
    """Create (or reset) a role's broker user and its permissions; its URL, shown once.

    The topology is declared first with the operator's identity, so that a monitor started
    before any control plane finds the status exchange to bind its queue to."""
    check_names((name, "user name"))
    api = management_api(amqp_url, management_url)
    await asyncio.to_thread(refuse_other_users, api, name, role.tag, f"{role.name} identity")
    connection = await connect(amqp_url, "dispatcher-identities")
    try:
        async with connection.channel() as channel:
            await declare_topology(channel)
    finally:
        await connection.close()
    password = secrets.token_urlsafe(24)
    await asyncio.to_thread(put_user, api, name, password, role.tags, permissions_of(role))
    return user_url(amqp_url, name, password)


def _require_role(api: ManagementApi, name: str) -> Role:
    tags = [role.tag for role in ROLES.values()]
    tag = require_tag(api, name, tags, "control-plane, monitor or web identity")
    return next(role for role in ROLES.values() if role.tag == tag)


def rotate_role(amqp_url: str, management_url: str, name: str) -> tuple[Role, str, int]:
    """A new password (permissions kept), its connections closed: (role, new URL, closed)."""
    api = management_api(amqp_url, management_url)
    role = _require_role(api, name)
    password = secrets.token_urlsafe(24)
    set_password(api, name, password, role.tags)
    closed = close_connections(api, name, f"{role.name} identity rotated")
    return role, user_url(amqp_url, name, password), closed


def revoke_role(amqp_url: str, management_url: str, name: str) -> Role:
    """Delete a role's broker user; the broker closes its connections and refuses new ones."""
    api = management_api(amqp_url, management_url)
    role = _require_role(api, name)
    delete_user(api, name)
    close_connections(api, name, f"{role.name} identity revoked")
    return role
