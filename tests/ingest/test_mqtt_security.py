"""The MQTT adapter against a real Mosquitto that lets no one in anonymously: user name and
password, TLS verified against the city's own CA, and client certificates (mutual TLS), in
MQTT 5 and 3.1.1. A refused connection must say why, keep retrying and store nothing."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cityward.bank.store.sqlite import SqliteStore
from cityward.ingest.deadletter import DeadLetters
from cityward.ingest.worker import IngestWorker
from tests.ingest.brokers import SecuredMosquitto
from tests.ingest.certs import Authority, authority
from tests.ingest.helpers import bank_with_history, message, settings, stored_readings

USERS = {"ingest": "s3cret-ingest", "sensors": "s3cret-sensors"}
# the sensors publish under city/, the ingest worker reads it; nobody may read private/
ACL = """\
user sensors
topic write city/#

user ingest
topic read city/#
"""


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return authority(tmp_path / "pki")


@pytest.fixture
def secured(tmp_path: Path, ca: Authority) -> Iterator[SecuredMosquitto]:
    b = SecuredMosquitto(tmp_path / "broker", ca, USERS, ACL)
    b.start()
    yield b
    b.stop()


def _publish(port: int, root: str, numbers: range) -> None:
    """The sensors' side: paho at QoS 1 with their own user name, every message acknowledged."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{root}")
    client.username_pw_set("sensors", USERS["sensors"])
    client.max_inflight_messages_set(200)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [
            client.publish(f"{root}/{n % 7}", orjson.dumps(message(n)), qos=1) for n in numbers
        ]
        for info in infos:
            info.wait_for_publish(timeout=30)
            assert info.is_published(), "the broker did not acknowledge a message"
    finally:
        client.disconnect()
        client.loop_stop()


def _worker(tmp_path: Path, options: dict[str, Any], **kw: Any) -> tuple[IngestWorker, SqliteStore]:
    store = SqliteStore(tmp_path / "bank.db")
    worker = IngestWorker(
        bank_with_history(store), settings("mqtt", options), DeadLetters(tmp_path / "dl.db"), **kw
    )
    return worker, store


def _wait(cond: Any, timeout: float, what: Any) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.05)


def _receive(tmp_path: Path, broker: SecuredMosquitto, options: dict[str, Any], n: int) -> None:
    """Start a worker with ``options`` (the topic and client id added), publish ``n`` readings
    through the password listener, and check that every one is in the bank once."""
    root = f"city/sec-{uuid.uuid4().hex[:8]}"
    opts = {"topics": [f"{root}/+"], "client_id": f"ingest-{root}", **options}
    worker, store = _worker(tmp_path, opts)
    worker.start()
    adapter: Any = worker.adapters["air"]
    try:
        assert adapter.subscribed.wait(15), adapter.status()
        _publish(broker.port, root, range(n))
        _wait(lambda: worker.writer.stats.written == n, 60, worker.status)
    finally:
        worker.stop()
    assert adapter.status()["last_error"] == ""
    assert sorted(v for _, v in stored_readings(store)) == [float(k) for k in range(n)]
    store.close()


@contextmanager
def _refused(tmp_path: Path, options: dict[str, Any], expect: str) -> Iterator[Any]:
    """A worker with ``options`` that the broker refuses: yields its adapter once its
    ``last_error`` holds ``expect``; it never connected and wrote nothing."""
    worker, store = _worker(
        tmp_path, {"topics": ["city/refused/+"], "reconnect_max_s": 0.2, **options}
    )
    worker.start()
    adapter: Any = worker.adapters["air"]
    try:
        _wait(lambda: expect in adapter.status()["last_error"], 10, adapter.status)
        yield adapter
        assert adapter.status()["connects"] == 0, adapter.status()
    finally:
        worker.stop()
    assert worker.writer.stats.written == 0
    store.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_user_name_and_password_let_the_adapter_in(
    tmp_path: Path, secured: SecuredMosquitto, protocol: str
) -> None:
    secret = tmp_path / "ingest.password"
    secret.write_text(USERS["ingest"] + "\n")  # a trailing newline, as editors leave it
    opts = {"port": secured.port, "protocol": protocol, "username": "ingest"}
    _receive(tmp_path, secured, {**opts, "password_file": str(secret)}, 200)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_wrong_password_is_refused_with_the_reason_and_retried(
    tmp_path: Path, secured: SecuredMosquitto, protocol: str
) -> None:
    opts = {
        "port": secured.port,
        "protocol": protocol,
        "username": "ingest",
        "password": "not-the-password",
    }
    # Mosquitto says "not authorized" (MQTT 5: 0x87; 3.1.1: 5) to a wrong password
    with _refused(tmp_path, opts, "not authorized") as adapter:
        error = adapter.status()["last_error"]
        assert error.startswith("the broker refused the connection: not authorized (reason code")
        assert "check username and password_file" in error
        attempts = adapter._wire.status  # it goes on trying: a fixed broker lets it in
        time.sleep(1.0)
        assert adapter.status()["connects"] == 0 and not adapter.connected.is_set()
        assert adapter._wire.status is attempts


def test_tls_verified_against_the_citys_own_ca(
    tmp_path: Path, secured: SecuredMosquitto, ca: Authority
) -> None:
    """TLS with a password; enough readings that TLS records hold several messages (the
    adapter's reader must see bytes that are decrypted but not yet read)."""
    opts = {
        "port": secured.tls_port,
        "tls": True,
        "ca_file": str(ca.ca),
        "username": "ingest",
        "password": USERS["ingest"],
    }
    _receive(tmp_path, secured, opts, 3000)


def test_a_broker_whose_certificate_is_not_trusted_is_refused(
    tmp_path: Path, secured: SecuredMosquitto
) -> None:
    other = authority(tmp_path / "other-pki", "someone else's CA")
    opts = {
        "port": secured.tls_port,
        "tls": True,
        "ca_file": str(other.ca),
        "username": "ingest",
        "password": USERS["ingest"],
    }
    with _refused(tmp_path, opts, "TLS: [SSL: CERTIFICATE_VERIFY_FAILED]"):
        pass


def test_a_client_certificate_lets_the_adapter_in_from_a_front_process(
    tmp_path: Path, secured: SecuredMosquitto, ca: Authority
) -> None:
    """Mutual TLS: the broker asks for a client certificate signed by the city's CA and takes
    its name as the user. The adapter runs in a front process, as `ingest run` runs it."""
    opts = {
        "port": secured.mtls_port,
        "tls": True,
        "ca_file": str(ca.ca),
        "cert_file": str(ca.client.cert),
        "key_file": str(ca.client.key),
    }
    root = f"city/mtls-{uuid.uuid4().hex[:8]}"
    opts |= {"topics": [f"{root}/+"], "client_id": f"ingest-{root}"}
    worker, store = _worker(tmp_path, opts, front_process=True)
    worker.start()
    try:
        _wait(
            lambda: worker.status()["sources"].get("air", {}).get("connected"),
            30,
            worker.status,
        )
        _publish(secured.port, root, range(500))
        _wait(lambda: worker.writer.stats.written == 500, 60, worker.status)
    finally:
        worker.stop()
    assert sorted(v for _, v in stored_readings(store)) == [float(k) for k in range(500)]
    store.close()


def test_without_a_client_certificate_the_broker_refuses(
    tmp_path: Path, secured: SecuredMosquitto, ca: Authority
) -> None:
    opts = {"port": secured.mtls_port, "tls": True, "ca_file": str(ca.ca)}
    # the broker's alert ("certificate required"), or the connection it cut ("EOF occurred
    # in violation of protocol", an SSLEOFError without the "[SSL: ...]" part): a TLS error
    with _refused(tmp_path, opts, "TLS: ") as adapter:
        time.sleep(0.5)
        assert adapter.status()["connects"] == 0, adapter.status()
        error = adapter.status()["last_error"]
        assert error.startswith("TLS: "), error
        assert "CERTIFICATE_REQUIRED" in error or "EOF occurred" in error, error
