"""How a failed TLS connect is told: the ssl module's error is found however the client
library wraps it, and said in words with the option that fixes it."""

from __future__ import annotations

import ssl

import aiormq.exceptions

from transport.connection import _unavailable, tls_failure


def _verification_error(message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    error.verify_message = message
    return error


def _alert(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] alert")
    error.reason = reason
    return error


def test_an_untrusted_certificate_is_found_inside_the_client_library_error() -> None:
    wrapped = aiormq.exceptions.AMQPConnectionError(
        _verification_error("unable to get local issuer certificate")
    )
    text = str(_unavailable("amqps://u:p@broker:5671/?cafile=/etc/ca.pem", wrapped))
    assert "the server's certificate is not trusted (unable to get local issuer" in text
    assert "cafile=/etc/ca.pem" in text


def test_a_host_name_mismatch_is_told_apart_from_an_unknown_ca() -> None:
    found = tls_failure(_verification_error("Hostname mismatch, certificate is not valid"))
    assert found is not None and "not valid for this host name" in found


def test_a_required_client_certificate_is_named() -> None:
    cause = _alert("TLSV13_ALERT_CERTIFICATE_REQUIRED")
    outer = ConnectionError("connect failed")
    outer.__cause__ = cause
    found = tls_failure(outer)
    assert found is not None and "requires a client certificate" in found


def test_a_reset_after_the_handshake_hints_at_a_client_certificate_only_over_tls() -> None:
    reset = aiormq.exceptions.AMQPConnectionError("Server connection reset: ConnectionResetError")
    over_tls = str(_unavailable("amqps://u:p@broker:5671/?cafile=/ca.pem", reset))
    assert "may require a client certificate" in over_tls
    plain = str(_unavailable("amqp://u:p@broker:5672/", reset))
    assert plain.startswith("cannot connect to the broker") and "certificate" not in plain


def test_errors_that_refer_to_themselves_end_the_search() -> None:
    looped = RuntimeError("loop")
    looped.args = (looped,)
    looped.__context__ = looped
    assert tls_failure(looped) is None
