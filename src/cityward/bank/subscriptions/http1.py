"""A small HTTP/1.1 keep-alive client for notification POSTs, on asyncio streams.

httpx spends about a millisecond of CPU per request (measured: ~1.0 ms for httpx and ~0.95 ms
for httpcore against ~0.07 ms here, same receiver, 4 connections), which alone would use up a
core at 1,000 notifications per second. Notifications need little of what a general client
offers: one POST with a JSON body, the status code back, keep-alive, TLS, timeouts. This
client does exactly that; HttpTransport (httpx) stays available where proxies or other
features matter.

Rules: the response body is read and discarded (Content-Length, chunked, or up to the close);
1xx answers are skipped; a connection is reused unless either side said ``Connection: close``
or the exchange failed; a request on a reused connection that fails before any response byte
arrived is sent once more on a fresh connection (the receiver closed an idle connection).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote, urlsplit

__all__ = ["Http1Client", "Http1Error"]

_MAX_HEADER_LINE: Final = 16 * 1024
_MAX_HEADERS: Final = 200
_MAX_BODY: Final = 16 * 1024 * 1024
# what quote() leaves of a request target: the reserved characters and "%", so that what is
# already percent-encoded stays as it is and only the rest (non-ASCII above all, which the
# Latin-1 request head cannot carry) is encoded, as UTF-8
_TARGET_SAFE: Final = "!#$%&'()*+,/:;=?@[]~"


class Http1Error(Exception):
    """The exchange failed (connection, timeout, protocol)."""


class _Stale(Exception):
    """A reused connection failed before any byte of the response: safe to send again."""


@dataclass(frozen=True)
class _Origin:
    tls: bool
    host: str
    port: int


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class Http1Client:
    """POST bytes to http(s) URLs over pooled keep-alive connections; returns the status."""

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        max_idle_per_origin: int = 16,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle_per_origin
        self._ssl = ssl_context
        self._idle: dict[_Origin, list[_Conn]] = {}
        self._closed = False

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        timeout: float | None = None,
    ) -> int:
        """Send one POST and return the response status (any status: the caller judges)."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise Http1Error(f"not an http(s) URL: {url}")
        tls = scheme == "https"
        try:
            port = parts.port or (443 if tls else 80)
        except ValueError as exc:
            raise Http1Error(f"bad port in {url}") from exc
        origin = _Origin(tls, parts.hostname, port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        target = quote(target, _TARGET_SAFE)
        host = parts.hostname
        if not host.isascii():  # an internationalized name goes in Host as its ASCII form
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError as exc:
                raise Http1Error(f"bad host name in {url}: {exc}") from exc
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host += f":{parts.port}"
        head = [f"POST {target} HTTP/1.1", f"Host: {host}"]
        has_type = has_auth = False
        for k, v in headers.items():
            lk = k.lower()
            if lk in ("host", "content-length", "transfer-encoding", "connection"):
                continue
            has_type = has_type or lk == "content-type"
            has_auth = has_auth or lk == "authorization"
            head.append(f"{k}: {v}")
        if parts.username is not None and not has_auth:
            # http://user:password@host/ : Basic authentication, as other HTTP clients read
            # such a URL (the credentials were dropped, and the receiver answered 401)
            userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            head.append("Authorization: Basic " + base64.b64encode(userinfo.encode()).decode())
        if not has_type:
            head.append("Content-Type: application/json")
        head.append(f"Content-Length: {len(body)}")
        try:
            request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        except UnicodeEncodeError as exc:  # a header value stored before they were checked
            raise Http1Error(f"a header is not Latin-1 text: {exc}") from exc
        limit = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                conn = self._take(origin)
                if conn is not None:
                    try:
                        return await self._exchange(origin, conn, request, reused=True)
                    except _Stale:
                        pass
                conn = await self._connect(origin)
                try:
                    return await self._exchange(origin, conn, request, reused=False)
                except _Stale as exc:  # pragma: no cover - only raised for reused ones
                    raise Http1Error(str(exc)) from exc
        except TimeoutError as exc:
            raise Http1Error(f"no answer within {limit} s") from exc

    def _take(self, origin: _Origin) -> _Conn | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            conn.close()
        return None

    def _give_back(self, origin: _Origin, conn: _Conn) -> None:
        idle = self._idle.setdefault(origin, [])
        if self._closed or len(idle) >= self.max_idle:
            conn.close()
        else:
            idle.append(conn)

    async def _connect(self, origin: _Origin) -> _Conn:
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    origin.host,
                    origin.port,
                    ssl=self._ssl_context() if origin.tls else None,
                    server_hostname=origin.host if origin.tls else None,
                    limit=_MAX_HEADER_LINE,
                )
        except TimeoutError as exc:
            raise Http1Error(f"connecting to {origin.host}:{origin.port} timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            raise Http1Error(f"cannot connect to {origin.host}:{origin.port}: {exc}") from exc
        return _Conn(reader, writer)

    async def _exchange(self, origin: _Origin, conn: _Conn, request: bytes, reused: bool) -> int:
        got_bytes = False
        try:
            conn.writer.write(request)
            await conn.writer.drain()
            while True:
                line = await conn.reader.readline()
                if not line:
                    raise ConnectionResetError("connection closed before the status line")
                got_bytes = True
                status, keep = await self._response(conn.reader, line)
                if status >= 200:
                    break
        except (OSError, asyncio.IncompleteReadError, ValueError, asyncio.LimitOverrunError) as exc:
            conn.close()
            if reused and not got_bytes:
                raise _Stale(str(exc)) from exc
            raise Http1Error(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            conn.close()  # cancelled or timed out mid-exchange: the connection is unusable
            raise
        if keep:
            self._give_back(origin, conn)
        else:
            conn.close()
        return status

    async def _response(self, reader: asyncio.StreamReader, line: bytes) -> tuple[int, bool]:
        """Read one response after its status line; (status, connection reusable)."""
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ValueError(f"bad status line {line[:80]!r}")
        status = int(parts[1])
        http10 = parts[0] == b"HTTP/1.0"
        length: int | None = None
        chunked = False
        close = http10
        for _ in range(_MAX_HEADERS + 1):
            h = await reader.readline()
            if h in (b"\r\n", b"\n"):
                break
            if not h:
                raise ValueError("connection closed inside the headers")
            name, _, value = h.partition(b":")
            name = name.strip().lower()
            value = value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"connection":
                if b"close" in value:
                    close = True
                elif b"keep-alive" in value:
                    close = False
        else:
            raise ValueError("too many response headers")
        if status < 200 or status in (204, 304):
            return status, not close
        if chunked:
            while True:
                size_line = await reader.readline()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                if size > _MAX_BODY:
                    raise ValueError("response chunk too large")
                await reader.readexactly(size + 2)
        elif length is not None:
            if length > _MAX_BODY:
                raise ValueError("response body too large")
            if length:
                await reader.readexactly(length)
        else:
            seen = 0
            while seen <= _MAX_BODY:  # the body runs until the close
                chunk = await reader.read(65536)
                if not chunk:
                    break
                seen += len(chunk)
            close = True
        return status, not close

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()
