"""The broker setting: one URL or a cluster's, read in one place; what is derived from it
(user, vhost, management API, identities' URLs) holds for a list; errors name the URL."""

from __future__ import annotations

import asyncio

import pytest

from dispatcher.broker_users import user_url
from dispatcher.errors import ConfigError
from dispatcher.settings import ControlPlaneSettings, trusted_broker_users
from transport.connection import connect, probe
from transport.errors import BrokerUnavailable, BrokerUrlInvalid
from transport.policies import management_api
from transport.urls import (
    broker_urls,
    hide_password,
    join,
    user_of,
    vhost_of,
    where_of,
    with_heartbeat,
)
from worker_agent.settings import AgentConfigError, AgentSettings

pytestmark = pytest.mark.unit

CLUSTER = (
    "amqp://u:pw@rabbit-1:5672/prod, amqp://u:pw@rabbit-2:5673/prod,amqps://u:pw@rabbit-3/prod"
)


def test_one_url_is_a_list_of_one() -> None:
    assert broker_urls("amqp://u:pw@broker:5672/") == ("amqp://u:pw@broker:5672/",)


def test_several_urls_are_split_on_commas_in_order_and_trimmed() -> None:
    urls = broker_urls(CLUSTER)
    assert urls == (
        "amqp://u:pw@rabbit-1:5672/prod",
        "amqp://u:pw@rabbit-2:5673/prod",
        "amqps://u:pw@rabbit-3/prod",
    )
    assert [where_of(u) for u in urls] == ["rabbit-1:5672", "rabbit-2:5673", "rabbit-3:5671"]
    assert join(urls) == ",".join(urls)


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("", "no broker URL"),
        ("  ", "no broker URL"),
        ("amqp://u:pw@a/,", "URL 2 of 2 is empty (a stray comma?)"),
        ("amqp://u:pw@a/,,amqp://u:pw@b/", "URL 2 of 3 is empty"),
        ("http://u:pw@a/", "the broker URL (http://u:***@a/) is no amqp:// or amqps:// URL"),
        # One of a list is named by its number: a comma in a password may have cut it.
        ("amqp://u:pw@a/,rabbit-2", "URL 2 of 2 is no amqp:// or amqps:// URL"),
        ("amqp://u:pw@a:port/", "the broker URL (amqp://u:***@a:port/) is invalid"),
        ("amqp:///vh", "names no host"),
        ("amqp://u:pw@a/,amqp://u:pw@a/", "URL 2 of 2 repeats an earlier one (a:5672)"),
        ("amqp://u:pw@a/x,amqp://u:pw@b/y", "URL 2 of 2 names vhost 'y', URL 1 'x'"),
        ("amqp://u:pw@a/,amqp://v:pw@b/", "logs in otherwise than URL 1"),
        # aiormq reads a heartbeat that is no number as 0: heartbeats off.
        ("amqp://u:pw@a/?heartbeat=10s", "heartbeat='10s' is no number of seconds"),
        ("amqp://u:pw@a/?heartbeat=", "heartbeat='' is no number of seconds"),
        ("amqp://u:pw@a/?heartbeat=70000", "heartbeat='70000' is no number of seconds"),
    ],
)
def test_a_setting_that_cannot_be_used_is_refused_with_the_url_and_the_reason(
    setting: str, words: str
) -> None:
    with pytest.raises(BrokerUrlInvalid) as refused:
        broker_urls(setting)
    assert words in str(refused.value)


@pytest.mark.parametrize(
    "setting",
    [
        "amqp://u:s3cret-pw@[::1/",
        "amqp://u:s3cret-pw@host\u2100/",
        "amqp://u:s3cret\uff20pw@h/",
        "amqp://u:s3cr\uff03t@host/?cafile=/etc/a@b.pem",
    ],
    ids=["unclosed IPv6", "host not NFKC", "password not NFKC", "an @ in the query"],
)
def test_a_url_that_does_not_parse_is_refused_without_its_password(setting: str) -> None:
    """The parser's own words quote the netloc; a URL it cannot take at all used to escape
    as a ValueError (a traceback) from the very function that hides passwords."""
    with pytest.raises(BrokerUrlInvalid) as refused:
        broker_urls(setting)
    assert "is invalid" in str(refused.value) or "@ out of place" in str(refused.value)
    assert "s3cr" not in str(refused.value)
    assert "s3cr" not in hide_password(setting)


def test_a_password_is_never_shown_not_even_when_it_differs() -> None:
    with pytest.raises(BrokerUrlInvalid) as refused:
        broker_urls("amqp://u:first-secret@a/,amqp://u:second-secret@b/")
    text = str(refused.value)
    assert "same user and password" in text
    assert "secret" not in text


def test_a_comma_in_a_password_is_written_percent_encoded() -> None:
    with pytest.raises(BrokerUrlInvalid, match="%2C"):
        broker_urls("amqp://u:a,b@a/,amqp://u:pw@b/")
    assert broker_urls("amqp://u:a%2Cb@a/") == ("amqp://u:a%2Cb@a/",)


def test_user_vhost_and_hidden_password_of_a_list() -> None:
    assert user_of(CLUSTER) == "u"
    assert user_of("amqps://agent%2D1@a/?auth=external") == "agent-1"
    assert user_of("amqp://a/") == ""
    assert vhost_of("amqp://u:pw@a/") == "/"
    assert vhost_of("amqp://u:pw@a/t%2F1") == "t/1"
    assert hide_password("amqp://u:p%40ss@a:5672/v?x=1") == "amqp://u:***@a:5672/v?x=1"
    assert hide_password("amqp://a/") == "amqp://a/"


def test_the_trusted_identity_of_a_list_is_its_one_user() -> None:
    assert trusted_broker_users(CLUSTER, {"HD_TRUSTED_BROKER_USERS": "ops"}) == ("u", "ops")


def test_the_management_api_is_each_node_s_default_one_unless_given() -> None:
    api = management_api(CLUSTER)
    assert api.base_urls == (
        "http://rabbit-1:15672",
        "http://rabbit-2:15672",
        "https://rabbit-3:15671",
    )
    assert (api.user, api.password, api.vhost) == ("u", "pw", "prod")

    given = management_api(CLUSTER, "http://admin:s@m-1:15672/, http://m-2:15672/?cafile=/x")
    assert given.base_urls == ("http://m-1:15672", "http://m-2:15672")
    assert (given.user, given.password, given.vhost) == ("admin", "s", "prod")


def test_an_identity_s_url_lists_every_node_with_its_own_credentials_only() -> None:
    operator = "amqps://admin:pw@r-1:5671/prod?cafile=/ca.pem&certfile=/op.pem,amqps://admin:pw@r-2:5671/prod?cafile=/ca.pem"
    made = user_url(operator, "agent-1", "s3cret")
    assert broker_urls(made) == (
        "amqps://agent-1:s3cret@r-1:5671/prod?cafile=%2Fca.pem",
        "amqps://agent-1:s3cret@r-2:5671/prod?cafile=%2Fca.pem",
    )


def test_every_process_refuses_a_bad_list_at_start_up() -> None:
    bad = {"HD_AMQP_URL": "amqp://u:pw@a/,", "HD_DATABASE_URL": "postgresql://x/"}
    with pytest.raises(ConfigError, match="URL 2 of 2 is empty"):
        ControlPlaneSettings.from_env(bad)
    with pytest.raises(AgentConfigError, match="URL 2 of 2 is empty"):
        AgentSettings.from_env(bad)


async def _closing_listener(seen: list[int], n: int) -> tuple[asyncio.Server, int]:
    """A port that accepts a connection and closes it at once, noting the order of arrival."""

    async def close(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(n)
        writer.close()

    server = await asyncio.start_server(close, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def test_the_nodes_are_tried_in_order_and_each_failure_is_told() -> None:
    seen: list[int] = []
    listeners = [await _closing_listener(seen, n) for n in (1, 2, 3)]
    setting = join([f"amqp://u:pw@127.0.0.1:{port}/" for _, port in listeners])
    try:
        with pytest.raises(BrokerUnavailable) as failed:
            await connect(setting, "test", timeout=5)
        with pytest.raises(BrokerUnavailable):
            await probe(setting, timeout=5)
    finally:
        for server, _ in listeners:
            server.close()
            await server.wait_closed()
    assert seen == [1, 2, 3, 1, 2, 3]
    text = str(failed.value)
    assert text.startswith("none of the 3 broker nodes answers: ")
    assert all(f"127.0.0.1:{port}: cannot connect" in text for _, port in listeners)
    assert "pw" not in text


def test_each_node_is_asked_for_a_heartbeat_of_ten_seconds_unless_its_url_names_one() -> None:
    assert with_heartbeat("amqp://u:pw@rabbit-1:5672/prod") == (
        "amqp://u:pw@rabbit-1:5672/prod?heartbeat=10"
    )
    tls = "amqps://u:pw@rabbit-3/prod?cafile=/etc/hd/ca.pem&certfile=/etc/hd/a.pem"
    assert with_heartbeat(tls) == tls + "&heartbeat=10"
    for own in ("amqp://u:pw@rabbit-1/?heartbeat=30", "amqp://u@r/?cafile=x&heartbeat=0"):
        assert with_heartbeat(own) == own


@pytest.mark.parametrize(
    "url",
    [
        "amqp://admin:S3CR/ET@127.0.0.1:5672/",  # a / cuts the authority inside the password
        "amqp://admin:S3CR#ET@127.0.0.1/",
        "amqp://admin:S3CR?ET@127.0.0.1/",
        "admin:S3CRET@127.0.0.1:5672",  # no scheme
        "amqp//admin:S3CRET@127.0.0.1:5672",
        "amqp:/admin:S3CRET@127.0.0.1",
    ],
)
def test_a_password_with_an_unencoded_character_or_a_url_without_its_scheme_is_not_shown(
    url: str,
) -> None:
    """The password was echoed whole: the URL did not parse, so nothing was taken for one."""
    assert "S3CR" not in hide_password(url)
    with pytest.raises(BrokerUrlInvalid) as refused:
        broker_urls(url)
    assert "S3CR" not in str(refused.value)
    with pytest.raises(BrokerUnavailable) as refused_too:
        management_api("amqp://u:p@a/", url.replace("amqp", "http", 1))
    assert "S3CR" not in str(refused_too.value)


@pytest.mark.parametrize(
    "url",
    [
        "amqp://admin:#Secret@rabbit/",  # what is left of the authority parses: host "admin"
        "amqp://admin:2024/Secret@rabbit/",  # ... host "admin", port 2024
        "amqp://admin:?Secret@rabbit/",
        "amqp://admin:Secret,Word@rabbit/",  # a comma cuts it into two URLs of a list
        "amqp://admin:123,Secret@rabbit/",  # ... the first of which parses
        "amqp://admin:Se\\cret/x@rabbit/",  # a parser quotes it as repr does: Se\\\\cret
        "amqp://admin:Se\u00a0cret/x@rabbit/",
    ],
)
def test_a_password_that_cut_its_url_short_is_refused_and_never_shown(url: str) -> None:
    with pytest.raises(BrokerUrlInvalid) as refused:
        broker_urls(url)
    assert "cret" not in str(refused.value) and "Word" not in str(refused.value)
    assert "cret" not in hide_password(url)
    management = url.replace("amqp", "http", 1)
    with pytest.raises(BrokerUnavailable) as refused_too:
        management_api("amqp://u:p@a/", management)
    assert "cret" not in str(refused_too.value) and "Word" not in str(refused_too.value)


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u:Secret@Word:Pass@127.0.0.1/db",  # asyncpg cuts at the first @
        "postgresql://u:pw?Secret@127.0.0.1/db",
        "postgresql://u:[Kq9Z@[::1]/",
        "postgresql://u:Se\\cret/x@127.0.0.1/db",
    ],
)
async def test_a_database_url_asyncpg_cannot_read_is_refused_without_its_password(
    dsn: str,
) -> None:
    from dispatcher.store import Database

    with pytest.raises(ConfigError) as refused:
        await Database.open(dsn)
    text = str(refused.value)
    assert not any(piece in text for piece in ("Secret", "Word", "Pass", "Kq9Z", "cret")), text


def test_a_cut_password_is_told_to_be_percent_encoded() -> None:
    with pytest.raises(BrokerUrlInvalid, match="%2F"):
        broker_urls("amqp://admin:S3CR/ET@127.0.0.1:5672/")
    # An @ past the host is refused wherever it is (parsers disagree on where a password
    # with one ends); in a file name of the query it is written %40, and shown as it is.
    with pytest.raises(BrokerUrlInvalid, match="%40"):
        broker_urls("amqps://h:5671/?cafile=/x@y.pem")
    assert broker_urls("amqps://h:5671/?cafile=/x%40y.pem") == (
        "amqps://h:5671/?cafile=/x%40y.pem",
    )
    assert hide_password("amqps://h:5671/?cafile=/x%40y") == "amqps://h:5671/?cafile=/x%40y"


def test_a_url_with_a_control_character_or_a_byte_that_is_no_utf8_is_refused_in_words() -> None:
    for url in ("amqp://u:p\udcff@127.0.0.1:1/", "amqp://u:p@h/\x00", "amqp://u:p@h/\x01x"):
        with pytest.raises(BrokerUrlInvalid, match="control character"):
            broker_urls(url)
        with pytest.raises(BrokerUnavailable, match="control character"):
            management_api("amqp://u:p@a/", url.replace("amqp", "http", 1))


async def test_a_database_url_cut_at_its_password_is_refused_without_it() -> None:
    from dispatcher.store import Database

    with pytest.raises(ConfigError) as refused:
        await Database.open("postgresql://admin:S3CR/ET@127.0.0.1:5432/db")
    assert "S3CR" not in str(refused.value)
    assert "percent-encoded" in str(refused.value)


def test_tls_options_on_an_amqp_url_are_refused_not_ignored() -> None:
    """aio-pika reads cafile= and its kin only for amqps://: the link was plain text while
    its URL looked encrypted."""
    for option in ("cafile=/etc/ca.pem", "cadata=x", "certfile=c&keyfile=k"):
        with pytest.raises(BrokerUrlInvalid, match="write amqps://"):
            broker_urls(f"amqp://u:pw@h/?{option}")
    assert broker_urls("amqps://u:pw@h/?cafile=/etc/ca.pem") == (
        "amqps://u:pw@h/?cafile=/etc/ca.pem",
    )


@pytest.mark.parametrize(
    ("query", "words"),
    [("cafile=/no/such/ca.pem", "No such file"), ("certfile=/&keyfile=/", "Is a directory")],
)
async def test_a_tls_file_that_cannot_be_read_is_named(query: str, words: str) -> None:
    """It was "FileNotFoundError(2, 'No such file or directory')", naming no file."""
    with pytest.raises(BrokerUnavailable) as refused:
        await connect(f"amqps://u:pw@127.0.0.1:1/?{query}", "test", timeout=5)
    text = str(refused.value)
    assert "a TLS file the URL names" in text and words in text
    assert query.partition("&")[0] in text


def test_a_management_setting_with_an_empty_entry_is_refused_as_the_broker_s_is() -> None:
    """A lone comma fell back to the default management URL without a word."""
    for setting in (",", "http://u:S3CRET@a/,"):
        with pytest.raises(BrokerUnavailable, match="stray comma") as refused:
            management_api("amqp://u:p@h/", setting)
        assert "S3CRET" not in str(refused.value)


def test_a_short_password_is_hidden_where_it_stands_alone_not_inside_other_words() -> None:
    with pytest.raises(BrokerUrlInvalid) as refused:
        broker_urls("amqp://u:p@h:port/")
    assert "as 'port'" in str(refused.value)  # not '***ort'
    assert "u:***@h:port" in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "amqp://u:?cafile=S3cretPW@rabbit/",  # cut at ? where the rest parses: host "u"
        "amqp://u:?x=S3cretPW@rabbit/",
        "amqp://a:b@r1/vh,amqp://a:5672?heartbeat=S3cretPW@r2/vh",
        "amqp://u:1/S3cretPW?x=y@r1/vh,amqp://u:1/o?x=y@r2/vh",
        "amqp://u:p@ss:abcd#efgh@rabbit/",  # two @: parsers cut at the first or the last
        "amqp://u:p@S3cretPW#x@rabbit/",
        "amqp://u:p@S3cret?heartbeat=PWxyz@rabbit/",
    ],
)
def test_an_at_out_of_place_is_refused_before_any_parser_quotes_the_password(url: str) -> None:
    with pytest.raises(BrokerUrlInvalid) as refused:
        broker_urls(url)
    text = str(refused.value)
    assert "@ out of place" in text
    assert "S3cret" not in text and "PW" not in text and "ss:abcd" not in text, text
    assert "S3cret" not in hide_password(url)


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app:?sslmode=S3cretPW@127.0.0.1:1/db",
        "postgresql://app:pa@ss?word@127.0.0.1:1/db",
        "postgresql://u:13@9263#h<i2y@127.0.0.1:1/",
    ],
)
async def test_a_database_url_with_an_at_out_of_place_is_refused_before_asyncpg_reads_it(
    dsn: str,
) -> None:
    """asyncpg cuts at the first @ and took the rest for hosts: it named them in its errors,
    and even tried to connect to one."""
    from dispatcher.store import Database

    with pytest.raises(ConfigError, match="@ out of place") as refused:
        await Database.open(dsn)
    assert not any(p in str(refused.value) for p in ("S3cret", "ss?word", "9263", "i2y"))


async def test_a_database_host_list_with_an_empty_entry_is_refused_in_words() -> None:
    from dispatcher.store import Database

    with pytest.raises(ConfigError, match="database URL"):
        await Database.open("postgresql://u:p@127.0.0.1:1,/db")
