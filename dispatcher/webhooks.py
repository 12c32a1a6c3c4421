"""Webhook URLs: checked at start-up, and turned into the request that posts an alert.

A URL may carry a user and password (``https://user:pass@host/path``): they go as HTTP Basic
authentication, which urllib would not do (it would look up ``user:pass@host`` as a host).
Whatever names a URL in words hides its password (``transport.urls.hide_password``).
Redirects are not followed: a 3xx is a failed delivery (urllib would turn the POST into a GET
without its body, and take that for delivered).
"""

from __future__ import annotations

import base64
import urllib.parse
import urllib.request
from typing import Any

from transport.urls import hide_password, text_of_a_url, url_problem


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
    if problem := url_problem(url, "webhook URL", f" {shown!r}"):
        return problem
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return f"webhook URL {shown!r} must start with http:// or https://"
    if not parts.hostname:
        return f"webhook URL {shown!r} names no host"
    if ":" in urllib.parse.unquote(parts.username or ""):
        return f"webhook URL {shown!r}: a user name for Basic authentication cannot hold ':'"
    return None


def webhook_request(url: str, body: bytes) -> urllib.request.Request:
    """The POST of ``body`` (JSON) to ``url``, its user and password as Basic auth (never
    passed on to where a redirect points)."""
    parts = urllib.parse.urlsplit(url)
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
    request = urllib.request.Request(
        urllib.parse.urlunsplit(parts),
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    if user or password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_unredirected_header("Authorization", f"Basic {token}")
    return request


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_: Any, **__: Any) -> None:
        return None  # urllib raises HTTPError with the 3xx then


#: What posts a webhook: urllib's own handlers, but for redirects.
OPENER = urllib.request.build_opener(_NoRedirects)
