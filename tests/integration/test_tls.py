"""TLS on a real RabbitMQ (AMQPS with mutual TLS, the management API over HTTPS) and a real
PostgreSQL (SSL): clients verify the servers, a wrong CA or a missing client certificate fails
with a clear error, and an identity may log in with its certificate alone (EXTERNAL)."""

from __future__ import annotations

import asyncio
import urllib.parse
from pathlib import Path

import asyncpg
import pytest

from dispatcher.states import RunState
from dispatcher.store import Database
from tests.conftest import Certificates, TlsEndpoints
from tests.integration.conftest import Stack
from tests.integration.test_dispatch import wait_for_state
from tests.support import Proc, eventually, management_request
from transport.connection import probe
from transport.errors import BrokerUnavailable


def _vhost(stack: Stack) -> str:
    return urllib.parse.urlsplit(stack.amqp_url).path.lstrip("/")


def _with_query(url: str, **query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{urllib.parse.urlencode(query)}"


def amqps_url(
    stack: Stack, tls: TlsEndpoints, certificates: Certificates, client: str | None = "hd"
) -> str:
    """The test's vhost over AMQPS as the session's user, verifying the broker with the
    session's CA, with a client certificate unless ``client`` is None."""
    query = {"cafile": str(certificates.ca)}
    if client is not None:
        cert, key = certificates.client(client)
        query |= {"certfile": str(cert), "keyfile": str(key)}
    return tls.amqps_url("hd", "hd", _vhost(stack), **query)


def database_ssl_url(tls: TlsEndpoints, ca: Path, application: str) -> str:
    return _with_query(
        tls.postgres_url,
        sslmode="verify-full",
        sslrootcert=str(ca),
        application_name=application,
    )


async def exit_code(proc: Proc, timeout: float = 60) -> int:
    assert proc.process is not None
    return await asyncio.to_thread(proc.process.wait, timeout)


async def test_the_control_plane_an_agent_and_a_client_work_over_amqps_and_postgres_ssl(
    stack: Stack,
    store: Database,
    tls_endpoints: TlsEndpoints,
    certificates: Certificates,
    broker: tuple[str, str],
) -> None:
    application = f"hd-tls-{stack.unique}"
    stack.amqp_url = amqps_url(stack, tls_endpoints, certificates)
    stack.database_url = database_ssl_url(tls_endpoints, certificates.ca, application)
    # The broker policies go through the management API over HTTPS, verified with the CA of
    # the AMQP URL.
    stack.management_url = f"https://hd:hd@{tls_endpoints.host}:{tls_endpoints.management_port}"
    control_plane = await stack.start_control_plane()
    assert "broker policies set" in control_plane.output()
    await stack.start_agent(0)
    async with stack.client() as client:
        outcome = await client.submit_and_wait(
            stack.run_image, ["sh", "-c", "echo over tls"], timeout=90, queue=stack.queue
        )
    assert outcome.succeeded, outcome
    run = await wait_for_state(store, outcome.run_id, RunState.SUCCESS, timeout=30)
    assert run.output_tail == ["over tls"]

    # Every connection to the test's vhost (control plane, agent) is over TLS, and so is every
    # database connection the control plane holds.
    vhost = urllib.parse.quote(_vhost(stack), safe="")

    async def listed() -> list[dict[str, object]] | None:
        found = management_request(broker[1], "GET", f"/api/vhosts/{vhost}/connections")
        return found if len(found) >= 2 else None  # the broker lists them within seconds

    connections = await eventually(listed, 30, what="the stack's connections listed")
    assert all(c["ssl"] for c in connections), [(c["name"], c["ssl"]) for c in connections]
    assert all(str(c["peer_cert_subject"]).startswith("CN=hd,") for c in connections)
    database = await asyncpg.connect(tls_endpoints.postgres_url)
    try:
        rows = await database.fetch(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
            "WHERE a.application_name = $1",
            application,
        )
    finally:
        await database.close()
    assert rows and all(r["ssl"] for r in rows)


async def test_a_wrong_ca_fails_with_a_clear_error(
    stack: Stack,
    tls_endpoints: TlsEndpoints,
    certificates: Certificates,
    tmp_path: Path,
) -> None:
    other_ca = Certificates.other_ca(tmp_path)
    cert, key = certificates.client("hd")
    wrong = tls_endpoints.amqps_url(
        "hd",
        "hd",
        _vhost(stack),
        cafile=str(other_ca),
        certfile=str(cert),
        keyfile=str(key),
    )
    with pytest.raises(BrokerUnavailable) as caught:
        await probe(wrong)
    assert "TLS with the broker failed: the server's certificate is not trusted" in str(
        caught.value
    )
    assert str(other_ca) in str(caught.value)

    # The agent says so and exits 1; so does the control plane, from PostgreSQL's side.
    agent = await stack.start_agent(0, env={"HD_AMQP_URL": wrong}, wait=False)
    assert await exit_code(agent) == 1
    assert "certificate is not trusted" in agent.output()
    stack.database_url = database_ssl_url(tls_endpoints, other_ca, "hd-wrong-ca")
    control_plane = Proc(
        "dispatcher",
        ["serve", "--metrics-port", "0"],
        stack.logs / "control-plane-wrong-ca.log",
        stack._env(),
    ).start()
    stack.processes.append(control_plane)
    assert await exit_code(control_plane) != 0
    assert "TLS with PostgreSQL failed: the server's certificate is not trusted" in (
        control_plane.output()
    )


async def test_mutual_tls_refuses_a_client_without_a_certificate_and_accepts_external_login(
    stack: Stack,
    tls_endpoints: TlsEndpoints,
    certificates: Certificates,
    broker: tuple[str, str],
) -> None:
    no_certificate = amqps_url(stack, tls_endpoints, certificates, client=None)
    with pytest.raises(BrokerUnavailable) as caught:
        await probe(no_certificate)
    # The broker's alert says so, or (over TLS 1.3) it drops the connection after the
    # handshake: either way the error names the missing certificate.
    assert "require" in str(caught.value) and "client certificate" in str(caught.value)
    agent = await stack.start_agent(0, env={"HD_AMQP_URL": no_certificate}, wait=False)
    assert await exit_code(agent) == 1
    assert "client certificate" in agent.output()

    # EXTERNAL: a broker user with no password logs in by its certificate's common name.
    user = f"ext-{stack.unique}"
    management = broker[1]
    management_request(management, "PUT", f"/api/users/{user}", {"password_hash": "", "tags": ""})
    try:
        vhost = urllib.parse.quote(_vhost(stack), safe="")
        management_request(
            management,
            "PUT",
            f"/api/permissions/{vhost}/{user}",
            {"configure": "", "write": "", "read": ""},
        )
        cert, key = certificates.client(user)
        external = tls_endpoints.amqps_url(
            user,
            "",
            _vhost(stack),
            auth="external",
            cafile=str(certificates.ca),
            certfile=str(cert),
            keyfile=str(key),
        )
        server = await probe(external)
        assert server.get("product") == "RabbitMQ"
        # Someone else's certificate does not log in as this user.
        other_cert, other_key = certificates.client(f"other-{stack.unique}")
        impostor = tls_endpoints.amqps_url(
            user,
            "",
            _vhost(stack),
            auth="external",
            cafile=str(certificates.ca),
            certfile=str(other_cert),
            keyfile=str(other_key),
        )
        with pytest.raises(BrokerUnavailable):
            await probe(impostor)
    finally:
        management_request(management, "DELETE", f"/api/users/{user}")
