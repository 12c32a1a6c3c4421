"""The broker setting: one AMQP URL, or the URLs of a cluster's nodes separated by commas.

``HD_AMQP_URL=amqp://u:p@rabbit-1:5672/vh,amqp://u:p@rabbit-2:5672/vh`` is read here and
nowhere else. The nodes of one cluster share their users and virtual hosts, so every URL of a
list must log in as the same user (with the same password) on the same vhost: what is derived
from "the" URL (the ``user_id`` stamped on messages, the vhost of the policies, the trusted
identity) is then the same whichever node a process is connected to. Each URL keeps its own
host, port, scheme and query (TLS options), so a node may have a certificate of its own.

A comma inside a URL (in a password, say) must be percent-encoded (``%2C``).
"""

from __future__ import annotations

import re
import urllib.parse

from .errors import BrokerUrlInvalid

SCHEMES = ("amqp", "amqps")
#: The query options aiormq reads for TLS, and only from an ``amqps`` URL.
TLS_OPTIONS = frozenset({"cafile", "capath", "cadata", "certfile", "keyfile", "no_verify_ssl"})
#: The AMQP heartbeat (s) asked for unless a URL gives its own (``?heartbeat=N``; 0 turns it
#: off). A node that vanishes without closing its sockets (a host lost, a cut network) is
#: taken for lost after about three of them missed (aiormq's rule): 33 s here, where the
#: library's own 60 s took three minutes.
DEFAULT_HEARTBEAT_S = 10


def with_heartbeat(url: str) -> str:
    """``url`` asking for ``DEFAULT_HEARTBEAT_S`` unless it names a heartbeat of its own."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "heartbeat" for key, _ in query):
        return url
    # Appended as it is: the rest of the query (TLS files) is left exactly as written.
    added = f"heartbeat={DEFAULT_HEARTBEAT_S}"
    return urllib.parse.urlunsplit(
        parts._replace(query=f"{parts.query}&{added}" if parts.query else added)
    )


def broker_urls(setting: str) -> tuple[str, ...]:
    """The URLs of a broker setting, in the order given; BrokerUrlInvalid says what is wrong."""
    if not setting.strip():
        raise BrokerUrlInvalid("no broker URL given")
    urls = tuple(part.strip() for part in setting.split(","))
    several = len(urls) > 1
    for n, url in enumerate(urls, 1):
        where = f"URL {n} of {len(urls)}" if several else "the broker URL"
        _check_one(url, where, several)
    first = urllib.parse.urlsplit(urls[0])
    for n, url in enumerate(urls[1:], 2):
        parts = urllib.parse.urlsplit(url)
        if (parts.username, parts.password) != (first.username, first.password):
            raise BrokerUrlInvalid(
                f"URL {n} of {len(urls)} ({hide_password(url)}) logs in otherwise than URL 1 "
                f"({hide_password(urls[0])}): the nodes of a cluster share their users, so "
                "give every URL the same user and password"
            )
        if vhost_of(url) != vhost_of(urls[0]):
            raise BrokerUrlInvalid(
                f"URL {n} of {len(urls)} names vhost {vhost_of(url)!r}, URL 1 "
                f"{vhost_of(urls[0])!r}: every URL of a cluster must name the same vhost"
            )
        if url in urls[: n - 1]:
            raise BrokerUrlInvalid(
                f"URL {n} of {len(urls)} repeats an earlier one ({where_of(url)})"
            )
    return urls


def _check_one(url: str, where: str, several: bool) -> None:
    if not url:
        raise BrokerUrlInvalid(f"{where} is empty (a stray comma?)")
    hint = " (a comma inside a URL must be written %2C)" if several else ""
    # A URL of a list is named by its number only: a comma in a password cut it, and either
    # side of the cut may be all password.
    shown = "" if several else f" ({hide_password(url)})"
    if problem := url_problem(url, where, shown, alone=not several):
        raise BrokerUrlInvalid(f"{problem}{hint}")
    parts = urllib.parse.urlsplit(url)
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key == "heartbeat" and not (
            value.isascii() and value.isdecimal() and int(value) < 65535
        ):
            # aiormq reads anything else as 0: heartbeats off, a lost node never noticed.
            raise BrokerUrlInvalid(
                f"{where}{shown}: heartbeat={value!r} is no number of seconds (0 to 65534)"
            )
    named = sorted({key for key, _ in urllib.parse.parse_qsl(parts.query)} & TLS_OPTIONS)
    if parts.scheme == "amqp" and named:
        # aiormq reads them only for amqps: a user would believe the link encrypted.
        raise BrokerUrlInvalid(
            f"{where}{shown} gives {', '.join(n + '=' for n in named)} (TLS) to an amqp:// "
            "URL, which does not use TLS: write amqps:// (port 5671)"
        )
    if parts.scheme not in SCHEMES:
        raise BrokerUrlInvalid(f"{where}{shown} is no amqp:// or amqps:// URL{hint}")
    if not parts.hostname:
        raise BrokerUrlInvalid(f"{where}{shown} names no host{hint}")


def url_problem(url: str, what: str, shown: str = "", alone: bool = True) -> str | None:
    """Why ``url`` cannot be read as a URL at all, said of ``what`` (and ``shown``, the URL
    as it may be shown, but for a character no message should carry); None when it can.
    Every URL setting's first check: broker, management API, database, webhooks."""
    if not text_of_a_url(url):
        return (
            f"{what} has a control character or a byte that is no UTF-8 in it (percent-encode it)"
        )
    if stray_at(url):
        return f"{what}{shown} has an @ out of place: {PERCENT_HINT}"
    try:
        urllib.parse.urlsplit(url).port  # noqa: B018 - ValueError for a port that is no number
    except ValueError as exc:
        return f"{what}{shown} is invalid: {in_words(exc, url, alone=alone)}"
    return None


def text_of_a_url(url: str) -> bool:
    """Whether ``url`` is text a URL may hold: UTF-8, no control character."""
    try:
        url.encode()
    except UnicodeEncodeError:  # a byte that was no UTF-8, read from the command line
        return False
    return not any(ord(c) < 32 or ord(c) == 127 for c in url)


def user_of(setting: str) -> str:
    """The user name every URL of the setting logs in as ("" when none is given)."""
    return urllib.parse.unquote(urllib.parse.urlsplit(broker_urls(setting)[0]).username or "")


def vhost_of(url: str) -> str:
    """The virtual host of one URL ("/" when it names none)."""
    path = urllib.parse.urlsplit(url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


def where_of(url: str) -> str:
    """``host:port`` of one URL, as logs and errors name a node."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    return f"{host}:{port}"


#: What a user name or password must have percent-encoded in a URL, said where one did not.
PERCENT_HINT = (
    "a user name or password must have / ? # @ : % and , written percent-encoded "
    "(%2F %3F %23 %40 %3A %25 %2C), and so must an @ anywhere else (%40)"
)


def hide_password(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages), also when it does not
    parse as a URL, or parses otherwise than meant: a password with an unencoded ``/``, ``?``
    or ``#`` cuts the authority short, and what is left of it may parse as a host and a
    port. Then whatever lies between the first ``:`` of the user part and the last ``@`` is
    hidden: more than the password, at worst, never less."""
    try:
        parts = urllib.parse.urlsplit(url)
        well_formed = bool(parts.scheme and parts.hostname) and (parts.port or 0) >= 0
        password = parts.password
    except ValueError:
        well_formed, password = False, None
    if well_formed and not stray_at(url):
        if password is None:
            return url
        netloc = parts.netloc.rpartition("@")
        user = netloc[0].partition(":")[0]
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.partition(':')[0]}:***@{host}"


def stray_at(url: str) -> bool:
    """Whether ``url`` has an ``@`` where none belongs: past where its authority ends (the
    first ``/``, ``?`` or ``#`` after the scheme), or two in its authority. Either is a user
    name or password with one of those characters unencoded, which parsers read each their
    own way (urllib at the last ``@``, asyncpg at the first): the rest may parse as a host,
    a port, a path or a query that holds the password. (An ``@`` a file name of the query
    holds is written ``%40``.)"""
    authority, tail = _split_authority(_after_scheme(url))
    return "@" in tail or authority.count("@") > 1


def in_words(exc: Exception, url: str, alone: bool = True) -> str:
    """What a parser found wrong with ``url``: its own words when the URL holds no
    credentials, ours otherwise (a parser quotes what it could not read, which may be a
    piece of a password, escaped as ``repr`` escapes it, or joined to the host). A URL not
    ``alone`` (one of a list split at its commas) may be a piece of one cut at a comma in
    its password: ours, always."""
    if alone and "@" not in url:
        return str(exc)
    password = _the_password(url) if alone else None
    if password is not None:
        # The password is known exactly: it, in every form a parser may quote, is hidden.
        words = str(exc)
        plain = urllib.parse.unquote(password)
        forms = {password, plain, repr(password)[1:-1], repr(plain)[1:-1]} - {""}
        for form in sorted(forms, key=len, reverse=True):
            # Where it stands alone: the URL delimits it (":" before, "@" after), and a
            # short password is no reason to garble the words around it ("notaport").
            words = re.sub(rf"(?<![A-Za-z0-9]){re.escape(form)}(?![A-Za-z0-9])", "***", words)
        return words
    return (
        "it does not parse as a URL (a port that is no number, a host with characters no host "
        f"has, an unclosed [ of an IPv6 address); {PERCENT_HINT}"
    )


def _the_password(url: str) -> str | None:
    """The password of ``url`` as written, when it is beyond doubt: the URL parses, nothing
    cut its authority short, and one ``@`` ends its user part. None otherwise."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return None
    if stray_at(url) or parts.netloc.count("@") != 1:
        return None
    return password


def _after_scheme(url: str) -> str:
    """What follows ``scheme://``; all of ``url`` when it has no ``://``."""
    _, sep, rest = url.partition("://")
    return rest if sep else url


def _split_authority(rest: str) -> tuple[str, str]:
    """What follows ``scheme://`` cut where the authority ends (at the first ``/``, ``?``
    or ``#``): an ``@`` in the path or the query (a file name) is no user's."""
    ends = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
    end = min(ends) if ends else len(rest)
    return rest[:end], rest[end:]


def join(urls: tuple[str, ...] | list[str]) -> str:
    """The setting that lists ``urls`` (the inverse of ``broker_urls``)."""
    return ",".join(urls)
