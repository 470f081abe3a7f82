"""A server killed with notifications pending delivers every one of them after a restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.bank.subscriptions.conftest import Receiver
from tests.conftest import PG_URL

N = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(args: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYWARD_")}
    out = log.open("ab")
    if "--data-dir" not in args:  # never the default ./cityward-data of the checkout
        args = [*args, "--data-dir", str(log.parent / "data")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cityward.cli", "serve", "--no-auth", "--port", str(port), *args],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/ngsi-ld/v1/types", timeout=2)
            return proc
        except httpx.TransportError:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "cityward serve did not answer in 60 s"
            time.sleep(0.1)


@pytest.fixture(params=["sqlite", "postgres"])
def backend_args(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[str]]:
    if request.param == "sqlite":
        yield ["--data-dir", str(tmp_path / "data")]
        return
    name = f"cityward_crash_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = PG_URL.rpartition("/")
    try:
        yield ["--database-url", f"{base}/{name}"]
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_pending_notifications_survive_sigkill(
    backend_args: list[str], receiver: Receiver, tmp_path: Path
) -> None:
    receiver.default = 503  # the receiver is down: every notification stays pending
    log = tmp_path / "server.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}/ngsi-ld/v1"
    proc = serve(backend_args, port, log)
    try:
        sub = {
            "id": "urn:ngsi-ld:Subscription:crash",
            "type": "Subscription",
            "entities": [{"type": "Sensor"}],
            "notification": {"endpoint": {"uri": receiver.url()}},
        }
        r = httpx.post(f"{base}/subscriptions", json=sub, timeout=10)
        assert r.status_code == 201, r.text
        batch = [
            {
                "id": f"urn:ngsi-ld:Sensor:{n}",
                "type": "Sensor",
                "level": {"type": "Property", "value": n},
            }
            for n in range(N)
        ]
        r = httpx.post(f"{base}/entityOperations/create", json=batch, timeout=30)
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 30
        while not receiver.requests:  # the dispatcher is trying, and failing
            assert time.monotonic() < deadline, "no delivery attempt"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    receiver.default = 204  # the receiver is back
    failed_before = len(receiver.requests)
    proc = serve(backend_args, free_port(), log)
    try:
        deadline = time.monotonic() + 90
        while True:
            with receiver.lock:
                delivered = {
                    d["id"] for req in receiver.requests[failed_before:] for d in req.body["data"]
                }
            if len(delivered) == N:
                break
            assert time.monotonic() < deadline, f"only {len(delivered)} of {N} delivered"
            time.sleep(0.1)
        assert delivered == {f"urn:ngsi-ld:Sensor:{n}" for n in range(N)}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
