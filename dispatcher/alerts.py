"""Alert delivery: new alerts go to the log, then to every webhook URL until each succeeds.

Alerts themselves are rows of the store (``store.alerts``), raised in the transaction of the
change they report; delivery is an outbox of its own, with backoff and a recorded status.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Sequence

from .store.alerts import Alerts
from .webhooks import OPENER, webhook_request


class AlertDeliverer:
    """Logs new alerts and POSTs them as JSON to every webhook URL until each succeeds."""

    def __init__(
        self,
        alerts: Alerts,
        webhook_urls: Sequence[str],
        timeout_s: float = 5.0,
        max_backoff_s: float = 300.0,
    ) -> None:
        self._alerts = alerts
        self._urls = list(webhook_urls)
        self._timeout_s = timeout_s
        self._max_backoff_s = max_backoff_s

    async def deliver_due(self) -> int:
        """One pass: log new alerts, then try every delivery that is due; returns how many."""
        await self._alerts.log_new(self._urls)
        return await self._alerts.deliver_due(self._post_async, self._max_backoff_s)

    async def _post_async(self, url: str, body: bytes) -> str | None:
        return await asyncio.to_thread(self._post, url, body)

    def _post(self, url: str, body: bytes) -> str | None:
        """None when delivered, else why not. Never raises: a URL stored by a monitor of
        another configuration (or one urllib refuses late) fails its delivery, never the
        monitor, which would stop at every start on the same due row."""
        try:
            request = webhook_request(url, body)
            with OPENER.open(request, timeout=self._timeout_s) as response:
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            return repr(exc)
        except Exception as exc:  # an invalid URL (http.client.InvalidURL, ValueError)
            # Its words may quote the URL, whose path may be its secret: the kind only.
            return f"the URL is refused ({type(exc).__name__})"
