"""What an agent makes of a code server's answers, from a real socket: a server that answers
badly (not HTTP, cut short, a byte at a time, too much) is a server that does not answer,
never an exception that ends the agent."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from worker_agent.code_servers import MAX_ANSWER_BYTES, CodeServer, CodeServers

pytestmark = pytest.mark.unit


def serving(answer: bytes, drip_s: float = 0.0, body: bytes = b"") -> Iterator[CodeServer]:
    """A server on a free local port that sends ``answer`` to every request (a byte every
    ``drip_s`` when set; with ``body``, ``answer`` at once and then ``body`` a byte at a
    time), then hangs up."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                peer, _ = listener.accept()
            except OSError:
                return
            # Each on a thread of its own: a drip still going to a client that gave up must
            # not hold the next client's answer back past its timeout.
            threading.Thread(target=answer_to, args=(peer,), daemon=True).start()

    def answer_to(peer: socket.socket) -> None:
        with peer:
            peer.recv(65536)
            try:
                if body:
                    peer.sendall(answer)
                if drip_s:
                    for byte in body or answer:
                        if stop.is_set():
                            break
                        peer.sendall(bytes([byte]))
                        time.sleep(drip_s)
                else:
                    peer.sendall(answer)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield CodeServer("c" * 64, "loc", 1, True, "127.0.0.1", 0.0, port=listener.getsockname()[1])
    stop.set()
    listener.close()


def http(status: str, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return f"HTTP/1.1 {status}\r\nContent-Length: {size}\r\n\r\n".encode() + body


@pytest.fixture
def servers() -> CodeServers:
    return CodeServers(runtime=None)  # type: ignore[arg-type]  # only HTTP is used here


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(http("200 OK", b'{"status": 1', length=100), id="cut short"),
        # What came is JSON, but not all the Content-Length announced: no answer either.
        pytest.param(http("200 OK", b'{"jobs": []}', length=5000), id="cut short as JSON"),
        pytest.param(b"SSH-2.0-OpenSSH_9.2\r\n", id="not HTTP"),
        pytest.param(http("200 OK", b"not json"), id="not JSON"),
        pytest.param(b"", id="hangs up"),
        pytest.param(http("200 OK", b"[" * 200_000), id="nested past the parser"),
    ],
)
async def test_a_server_answering_badly_is_a_server_that_does_not_answer(
    servers: CodeServers, answer: bytes
) -> None:
    for server in serving(answer):
        assert await servers.ask(server, "/health", timeout_s=3.0) is None
        status, body = await servers.post(server, "/launch-spec", {}, timeout_s=3.0)
        assert body is None
        assert status in (0, 200)


async def test_a_good_answer_and_an_error_s_json_are_read(servers: CodeServers) -> None:
    for server in serving(http("200 OK", b'{"ok": true}')):
        assert await servers.ask(server, "/health") == {"ok": True}
        assert await servers.post(server, "/launch-spec", {}) == (200, {"ok": True})
    for server in serving(http("422 Unprocessable", b'{"error": "no such job"}')):
        assert await servers.ask(server, "/health") is None
        assert await servers.post(server, "/launch-spec", {}) == (422, {"error": "no such job"})


async def test_a_server_sending_a_byte_at_a_time_is_given_up_at_the_timeout(
    servers: CodeServers,
) -> None:
    # Read whole, this would be an answer (and take about 10 s): given up at the timeout,
    # it is none.
    for server in serving(http("200 OK", b'{"ok": true}'), drip_s=0.2):
        assert await servers.ask(server, "/health", timeout_s=1.0) is None
        assert await servers.post(server, "/launch-spec", {}, timeout_s=1.0) == (0, None)
    # An answer that says it closes after it (HTTP/1.0, as the SDK's server answers), its
    # status and headers sent at once and its body a byte at a time: given up all the same.
    slow_body = b"HTTP/1.0 200 OK\r\nContent-Length: 12\r\n\r\n"
    # (The body at a byte every 2 s takes 24 s; its status line must come within the 4 s.)
    for server in serving(slow_body, body=b'{"ok": true}', drip_s=2.0):
        assert await servers.ask(server, "/health", timeout_s=4.0) is None
        assert await servers.post(server, "/launch-spec", {}, timeout_s=4.0) == (200, None)
    for server in serving(http("200 OK", b'{"ok": true}'), drip_s=0.001):
        assert await servers.ask(server, "/health", timeout_s=30.0) == {"ok": True}


async def test_an_answer_past_the_size_bound_is_not_read_whole(servers: CodeServers) -> None:
    huge = b"[" + b"0," * (MAX_ANSWER_BYTES // 2) + b"0]"
    for server in serving(http("200 OK", huge)):
        assert await servers.ask(server, "/definitions", timeout_s=10.0) is None


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (http("200 OK", b'{"jobs": []}', length=5000), "/definitions: HTTP 200: an answer cut"),
        (http("200 OK", b"OK"), "/definitions: HTTP 200: an answer that is not JSON"),
        (http("500 Oops", b'{"error": "x"}'), "HTTP 500"),
        (http("200 OK", b"[" * 200_000), "nested too deep"),
    ],
)
async def test_why_there_is_no_answer_is_said(
    servers: CodeServers, answer: bytes, why: str
) -> None:
    for server in serving(answer):
        answer_read, said = await servers.ask_why(server, "/definitions")
        assert answer_read is None
        assert why in said
