"""Submitter tokens on the broker: a user per submitter (a CI pipeline, a team's scripts).

A token's user is tagged ``hd-submitter``. On the control plane's vhost it may:

- publish requests (``hd.requests``) and nothing else: no instruction, control message,
  snapshot, status event or dead letter;
- declare, bind and read only its own exclusive queues (``amq_<hex>``, ``amq.gen-*``), and
  bind them to ``hd.status`` only with one run's key (``run.*.*.<run id>``,
  ``schemas.topology.follow_pattern``): it follows the runs whose ids it knows (its own),
  never the whole stream.

Its limits (agent queues, code locations) are the control plane's business: they are kept
in PostgreSQL (``Database.submitters``) and applied at intake (``dispatcher.submitters``).
"""

from __future__ import annotations

import asyncio
import re
import secrets

from schemas.topology import REQUESTS_EXCHANGE, STATUS_EXCHANGE
from transport.policies import management_api

from .broker_users import (
    NOTHING,
    PRIVATE,
    RUN_ID,
    Permissions,
    check_names,
    close_connections,
    delete_user,
    put_user,
    refuse_other_users,
    require_tag,
    tags_of,
    user_url,
    users_tagged,
)

#: The tag that marks a broker user as a submitter token made here.
SUBMITTER_TAG = "hd-submitter"
_WHAT = "submitter token"


def submitter_permissions() -> Permissions:
    return Permissions(
        configure=rf"^({PRIVATE})$",
        write=rf"^({re.escape(REQUESTS_EXCHANGE)}|{PRIVATE})$",
        read=rf"^({re.escape(STATUS_EXCHANGE)}|{PRIVATE})$",
        status_keys=NOTHING,
        status_read=rf"^run\.\*\.\*\.{RUN_ID}$",
    )


async def add_submitter(amqp_url: str, management_url: str, name: str) -> str:
    """Create (or reset) the token's broker user and its permissions; its URL, shown once.

    A reset is a rotation: the connections opened with the old secret are closed."""
    check_names((name, "token name"))
    api = management_api(amqp_url, management_url)
    existed = await asyncio.to_thread(refuse_other_users, api, name, SUBMITTER_TAG, _WHAT)
    password = secrets.token_urlsafe(24)
    await asyncio.to_thread(put_user, api, name, password, [SUBMITTER_TAG], submitter_permissions())
    if existed:
        await asyncio.to_thread(close_connections, api, name, "submitter token reset")
    return user_url(amqp_url, name, password)


def revoke_submitter(amqp_url: str, management_url: str, name: str) -> bool:
    """Delete the token's broker user and close its connections; False when there is none.

    Raises ConfigError for a user that is not a submitter token (left untouched)."""
    api = management_api(amqp_url, management_url)
    if tags_of(api, name) is None:
        return False
    require_tag(api, name, [SUBMITTER_TAG], _WHAT)
    delete_user(api, name)
    close_connections(api, name, "submitter token revoked")
    return True


def submitter_users(amqp_url: str, management_url: str) -> list[str]:
    """The broker users tagged as submitter tokens."""
    return users_tagged(management_api(amqp_url, management_url), SUBMITTER_TAG)
