"""Webhook URLs: checked at start-up, and turned into the request that posts an alert.

A URL may carry a user and password (``https://user:pass@host/path``): they go as HTTP Basic
authentication, which urllib would not do (it would look up ``user:pass@host`` as a host).
Whatever names a URL in words hides its password (``transport.urls.hide_password``).
"""

from __future__ import annotations

import base64
import urllib.parse
import urllib.request

from transport.urls import (
    PERCENT_HINT,
    cut_at_its_password,
    hide_password,
    text_of_a_url,
    without_password,
)


def webhook_problem(url: str) -> str | None:
    """What keeps ``url`` from being a webhook, in words (its password hidden); None if it
    can be one."""
    if not text_of_a_url(url) or " " in url:
        return (
            "a webhook URL has a control character, a space or a byte that is no UTF-8 in it "
            "(percent-encode it)"
        )
    shown = hide_password(url)
    if not url.isascii():
        return f"webhook URL {shown!r} is not ASCII: percent-encode it (a host in punycode)"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number
    except ValueError as exc:
        why = without_password(str(exc), url)
        if cut_at_its_password(url):
            why = f"{why}; {PERCENT_HINT}"
        return f"webhook URL {shown!r} is invalid: {why}"
    if parts.scheme not in ("http", "https"):
        return f"webhook URL {shown!r} must start with http:// or https://"
    if not parts.hostname:
        return f"webhook URL {shown!r} names no host"
    return None


def webhook_request(url: str, body: bytes) -> urllib.request.Request:
    """The POST of ``body`` (JSON) to ``url``, its user and password as Basic auth."""
    parts = urllib.parse.urlsplit(url)
    headers = {"Content-Type": "application/json"}
    if parts.username is not None or parts.password is not None:
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
        parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
    return urllib.request.Request(
        urllib.parse.urlunsplit(parts), data=body, method="POST", headers=headers
    )
