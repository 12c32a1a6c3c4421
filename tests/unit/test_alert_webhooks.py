"""How a webhook is named where its URL must not be shown (logs, tokens that are no admin's)."""

from __future__ import annotations

import pytest

from dispatcher.store.alerts import webhook_site


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.slack.com/services/T0/B0/SECRET", "https://hooks.slack.com/…"),
        ("http://user:pw@alerts.internal:8443/hook?token=abc", "http://alerts.internal:8443/…"),
        ("http://[::1]:9000/x", "http://[::1]:9000/…"),
        ("http://host:99999/x", "(a webhook)"),  # a port the parser refuses
    ],
)
def test_a_webhook_is_shown_by_its_scheme_host_and_port_only(url: str, shown: str) -> None:
    assert webhook_site(url) == shown
