"""Webhooks: how one is named where its URL must not be shown (logs, tokens that are no
admin's), which URLs the monitor takes, and how it posts to them."""

from __future__ import annotations

import base64
import http.server
import threading
from typing import ClassVar

import pytest

from dispatcher.alerts import AlertDeliverer
from dispatcher.errors import ConfigError
from dispatcher.settings import MonitorSettings
from dispatcher.store.alerts import webhook_site
from dispatcher.webhooks import webhook_problem


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


# ------------------------------------------------------------- checked, then posted


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("ftp://u:S3CRET@host/", "must start with http"),
        ("http://hooks:abc/", "invalid"),  # a port that is no number
        ("http://ex ample.com/", "control character, a space"),
        ("http://h\udcff/", "no UTF-8"),
        ("http://hôte.example/", "not ASCII"),
        ("http:///path-only", "names no host"),
        ("https://u:S3CR/ET@hooks.example/x", "@ out of place"),  # a password cut at its /
        ("https://hook:2024/S3CRET@hooks.example/x", "@ out of place"),  # ... that parses
        ("https://u:443?a=S3CRET@hooks.example.com/x", "@ out of place"),
        ("https://u%3Ax:S3CRET@hooks.example/", "cannot hold ':'"),
    ],
)
def test_a_webhook_url_that_cannot_be_posted_to_is_refused_at_start_without_its_password(
    url: str, said: str
) -> None:
    problem = webhook_problem(url)
    assert problem is not None and said in problem
    assert "S3CR" not in problem
    with pytest.raises(ConfigError):
        MonitorSettings.from_env(
            {"HD_AMQP_URL": "amqp://a/", "HD_DATABASE_URL": "postgresql://d/x"},
            webhook_urls=(url,),
        )


def test_good_webhook_urls_pass() -> None:
    for url in (
        "https://hooks.slack.com/services/T0/B0/SECRET",
        "http://u:p%2Fw@alerts.internal:8443/hook?token=abc",
        "http://[::1]:9000/x",
    ):
        assert webhook_problem(url) is None, url


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str | None, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.seen.append((self.path, self.headers.get("Authorization"), body))
        if self.path.startswith("/moved"):
            self.send_response(302)
            self.send_header("Location", "/elsewhere")
        else:
            self.send_response(204)
        self.end_headers()

    do_GET = do_POST

    def log_message(self, *_: object) -> None:
        pass


def test_a_webhook_s_user_and_password_go_as_basic_auth_not_as_its_host() -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        deliverer = AlertDeliverer(alerts=None, webhook_urls=())  # type: ignore[arg-type]
        url = f"http://ops:p%40ss@127.0.0.1:{port}/hook?x=1"
        assert deliverer._post(url, b'{"a": 1}') is None
    finally:
        server.shutdown()
    path, authorization, body = _Recorder.seen[-1]
    assert (path, body) == ("/hook?x=1", b'{"a": 1}')
    assert authorization == "Basic " + base64.b64encode(b"ops:p@ss").decode()


@pytest.mark.parametrize(
    "url", ["http://hooks:abc/", "http://ex ample.com/secret path", "http://h/\x00"]
)
def test_a_stored_webhook_url_urllib_refuses_fails_its_delivery_not_the_monitor(
    url: str,
) -> None:
    """URLs of an older configuration stay in the deliveries table and are tried at every
    start: one urllib refuses (InvalidURL, ValueError) is a failed delivery, in words."""
    deliverer = AlertDeliverer(alerts=None, webhook_urls=())  # type: ignore[arg-type]
    error = deliverer._post(url, b"{}")
    assert error is not None
    assert "secret" not in error


def test_a_redirect_is_a_failed_delivery_and_takes_no_credentials_along() -> None:
    """urllib followed a 302 with a GET and no body, the Authorization header with it, and
    the delivery was taken for done."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        deliverer = AlertDeliverer(alerts=None, webhook_urls=())  # type: ignore[arg-type]
        before = len(_Recorder.seen)
        assert deliverer._post(f"http://ops:pw@127.0.0.1:{port}/moved", b"{}") == "HTTP 302"
        assert [path for path, _, _ in _Recorder.seen[before:]] == ["/moved"]
        # No user nor password: no Authorization header at all.
        assert deliverer._post(f"http://@127.0.0.1:{port}/hook", b"{}") is None
        assert _Recorder.seen[-1][1] is None
    finally:
        server.shutdown()
