"""Fixtures for the subscription tests: real databases, an HTTP receiver, an MQTT subscriber.

Nothing here is faked: the outbox runs on a real SQLite file and on a real PostgreSQL schema
(CITYWARD_TEST_PG), notifications go to an HTTP server on a free local port and to the
Mosquitto broker at CITYWARD_TEST_MQTT (default 127.0.0.1:1883). A service that cannot be
reached makes the test fail, never skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cityward.bank.jsonld import Context, ContextResolver
from cityward.bank.subscriptions.outbox import Outbox, PostgresOutboxDB, SqliteOutboxDB
from tests.conftest import PG_URL

MQTT_ADDR = os.environ.get("CITYWARD_TEST_MQTT", "127.0.0.1:1883")
USER_CONTEXT = {
    "ex": "https://example.org/ns/",
    "Vehicle": "ex:Vehicle",
    "Car": "ex:Car",
    "speed": "ex:speed",
    "brand": "ex:brand",
    "owner": {"@id": "ex:owner", "@type": "@id"},
}


@pytest.fixture(scope="session")
def resolver() -> ContextResolver:
    return ContextResolver(allow_fetch=False)


@pytest.fixture
def core(resolver: ContextResolver) -> Context:
    return resolver.core


@pytest.fixture
def user_ctx(resolver: ContextResolver) -> Context:
    return resolver.resolve(USER_CONTEXT)


# --------------------------------------------------------------------------------------------
# Databases


class OutboxFactory:
    """Opens outboxes on one database; a second one stands for a restarted process."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.path = tmp_path / "bank.db"
        self.schema = f"test_{uuid.uuid4().hex[:12]}"
        self._dbs: list[SqliteOutboxDB | PostgresOutboxDB] = []
        if kind == "postgres":
            with psycopg.connect(PG_URL, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f'CREATE SCHEMA "{self.schema}"')

    def db(self) -> SqliteOutboxDB | PostgresOutboxDB:
        db: SqliteOutboxDB | PostgresOutboxDB
        if self.kind == "sqlite":
            db = SqliteOutboxDB(self.path)
        else:
            db = PostgresOutboxDB.connect(PG_URL, schema=self.schema)
        self._dbs.append(db)
        return db

    def __call__(self, **kwargs: Any) -> Outbox:
        return Outbox(self.db(), **kwargs)

    def close(self) -> None:
        for db in self._dbs:
            db.close()
        if self.kind == "postgres":
            with psycopg.connect(PG_URL, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgres"])
def outboxes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OutboxFactory]:
    """A factory of outboxes on a fresh database of each backend."""
    factory = OutboxFactory(request.param, tmp_path)
    yield factory
    factory.close()


# --------------------------------------------------------------------------------------------
# Waiting without asserting durations


async def until(pred: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait for ``pred``; the timeout only keeps a broken test from hanging."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


# --------------------------------------------------------------------------------------------
# An HTTP receiver


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any
    at: float


@dataclass
class Receiver:
    """A real HTTP server in a thread; answers with ``statuses`` in turn, then ``default``,
    each request after ``delays`` (seconds, in turn; then at once). ``requests`` are in the
    order they arrived."""

    port: int = 0
    default: int = 204
    statuses: deque[int] = field(default_factory=deque)
    delays: deque[float] = field(default_factory=deque)
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str = "/notify") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def record(self, req: Received) -> tuple[int, float]:
        """Keep ``req``; the status to answer it with, and the seconds to wait before."""
        with self.lock:
            self.requests.append(req)
            status = self.statuses.popleft() if self.statuses else self.default
            return status, self.delays.popleft() if self.delays else 0.0

    def on(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real receivers do

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            status, delay = state.record(
                Received(self.path, dict(self.headers.items()), json.loads(raw), time.monotonic())
            )
            time.sleep(delay)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A local port that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


# --------------------------------------------------------------------------------------------
# An MQTT subscriber on the real broker


class MqttSubscriber:
    """Subscribes to one fresh topic on the test broker and collects what arrives."""

    def __init__(self) -> None:
        host, _, port = MQTT_ADDR.partition(":")
        self.host, self.port = host, int(port or 1883)
        self.topic = f"cityward/test/{uuid.uuid4().hex}"
        self.messages: list[mqtt.MQTTMessage] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:12]}")
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, *args: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(msg)

    def start(self) -> None:
        self.client.connect(self.host, self.port, 30)  # refused: the test fails
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError(f"no SUBACK from the MQTT broker at {MQTT_ADDR}")

    def received(self) -> list[Any]:
        with self._lock:
            return [json.loads(m.payload) for m in self.messages]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def url(self, scheme: str = "mqtt") -> str:
        return f"{scheme}://{self.host}:{self.port}/{self.topic}"


@pytest.fixture
def mqtt_subscriber() -> Iterator[MqttSubscriber]:
    sub = MqttSubscriber()
    sub.start()
    yield sub
    sub.stop()
