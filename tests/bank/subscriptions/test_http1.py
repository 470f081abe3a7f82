"""The small HTTP/1.1 client against a real local server that answers in scripted ways."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from cityward.bank.subscriptions.http1 import Http1Client, Http1Error
from tests.bank.subscriptions.conftest import run

Answer = Callable[[int], bytes]  # request number -> raw response


@dataclass
class Server:
    answer: Answer
    close_after: bool = False  # drop the connection after each answer, without saying so
    drop: frozenset[int] = frozenset()  # request numbers answered by closing the connection
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                if len(self.requests) in self.drop:
                    break
                writer.write(self.answer(len(self.requests)))
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def serving(server: Server, body: Callable[[str], Awaitable[None]]) -> None:
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = srv.sockets[0].getsockname()[1]
    try:
        await body(f"http://127.0.0.1:{server.port}/notify?x=1")
    finally:
        srv.close()


def plain(status: int) -> Answer:
    return lambda n: f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok".encode()


def test_keep_alive_reuses_one_connection() -> None:
    server = Server(plain(200))
    client = Http1Client()

    async def body(url: str) -> None:
        for n in range(5):
            assert await client.post(url, b'{"n": %d}' % n, {"X-Key": "v"}) == 200
        await client.aclose()

    run(serving(server, body))
    assert server.connections == 1 and len(server.requests) == 5
    first = server.requests[0]
    assert first.startswith(b"POST /notify?x=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}".encode() in first
    assert b"X-Key: v\r\n" in first and b"Content-Type: application/json" in first
    assert first.endswith(b'{"n": 0}')


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 201),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", 204),
        (b"HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\nfail", 500),
    ],
)
def test_response_framing(raw: bytes, status: int) -> None:
    server = Server(lambda n: raw)
    client = Http1Client()

    async def body(url: str) -> None:
        assert await client.post(url, b"{}", {}) == status
        assert await client.post(url, b"{}", {}) == status  # the framing left it reusable
        await client.aclose()

    run(serving(server, body))
    assert server.connections == 1


def test_connection_close_and_http10() -> None:
    answers = {
        1: b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        2: b"HTTP/1.0 200 OK\r\n\r\nbody until the close",
    }
    server = Server(lambda n: answers.get(n, answers[1]), close_after=True)
    client = Http1Client()

    async def body(url: str) -> None:
        assert await client.post(url, b"{}", {}) == 200
        assert await client.post(url, b"{}", {}) == 200
        await client.aclose()

    run(serving(server, body))
    assert server.connections == 2


def test_a_connection_closed_while_idle_is_replaced() -> None:
    """The server drops the connection silently; the next POST goes out on a fresh one."""
    server = Server(plain(200), close_after=True)
    client = Http1Client()

    async def body(url: str) -> None:
        assert await client.post(url, b"{}", {}) == 200
        await asyncio.sleep(0.05)  # let the close arrive
        assert await client.post(url, b"{}", {}) == 200
        await client.aclose()

    run(serving(server, body))
    assert len(server.requests) == 2 and server.connections == 2


def test_a_reused_connection_that_fails_before_answering_is_retried_once() -> None:
    server = Server(plain(200), drop=frozenset({2}))
    client = Http1Client()

    async def body(url: str) -> None:
        assert await client.post(url, b"{}", {}) == 200
        assert await client.post(url, b"{}", {}) == 200  # dropped, then sent again
        await client.aclose()

    run(serving(server, body))
    assert len(server.requests) == 3 and server.connections == 2


def test_a_fresh_connection_that_fails_is_an_error() -> None:
    server = Server(plain(200), drop=frozenset({1}))
    client = Http1Client()

    async def body(url: str) -> None:
        with pytest.raises(Http1Error, match="closed before the status line"):
            await client.post(url, b"{}", {})
        await client.aclose()

    run(serving(server, body))
    assert len(server.requests) == 1


def test_errors(closed_port: int) -> None:
    client = Http1Client(timeout=0.5)
    silent = Server(lambda n: b"")

    async def body(url: str) -> None:
        with pytest.raises(Http1Error, match="no answer"):
            await client.post(url, b"{}", {})
        with pytest.raises(Http1Error, match="cannot connect"):
            await client.post(f"http://127.0.0.1:{closed_port}/", b"{}", {})
        with pytest.raises(Http1Error, match="not an http"):
            await client.post("ftp://h/x", b"{}", {})
        await client.aclose()

    run(serving(silent, body))


def test_garbage_answer_is_an_error() -> None:
    server = Server(lambda n: b"SMTP ready\r\n\r\n")
    client = Http1Client()

    async def body(url: str) -> None:
        with pytest.raises(Http1Error, match="bad status line"):
            await client.post(url, b"{}", {})
        await client.aclose()

    run(serving(server, body))


def test_a_path_beyond_ascii_goes_out_percent_encoded() -> None:
    """The request head is Latin-1: a path like /café☃ failed every delivery with
    UnicodeEncodeError; what is percent-encoded already stays as it is."""
    server = Server(plain(204))
    client = Http1Client()

    async def body(url: str) -> None:
        base = url.split("/notify")[0]
        assert await client.post(base + "/café☃/a%20b?q=é", b"{}", {}) == 204
        await client.aclose()

    run(serving(server, body))
    assert server.requests[0].startswith(b"POST /caf%C3%A9%E2%98%83/a%20b?q=%C3%A9 HTTP/1.1\r\n")


def test_a_header_that_is_not_latin1_is_a_delivery_error() -> None:
    """Subscriptions stored before receiverInfo was checked may hold one: an Http1Error (a
    failed attempt) rather than an unexpected exception."""
    client = Http1Client()

    async def main() -> None:
        with pytest.raises(Http1Error, match="Latin-1"):
            await client.post("http://127.0.0.1:9/x", b"{}", {"X-Label": "Zürich → Genève"})
        await client.aclose()

    run(main())


def test_credentials_in_the_url_go_as_basic_authentication() -> None:
    """http://user:password@host/ sent no credentials, and such a receiver answered 401; a
    receiverInfo Authorization header still wins."""
    server = Server(plain(200))
    client = Http1Client()

    async def body(url: str) -> None:
        with_creds = url.replace("http://", "http://city%40ops:p%3Ass@")
        assert await client.post(with_creds, b"{}", {}) == 200
        assert await client.post(with_creds, b"{}", {"Authorization": "Bearer t"}) == 200
        await client.aclose()

    run(serving(server, body))
    first, second = (r.split(b"\r\n\r\n")[0].split(b"\r\n") for r in server.requests)
    assert b"Authorization: Basic Y2l0eUBvcHM6cDpzcw==" in first  # city@ops:p:ss
    assert [h for h in second if h.lower().startswith(b"authorization")] == [
        b"Authorization: Bearer t"
    ]
    assert all(b"city" not in h for h in first if h.startswith(b"Host"))
