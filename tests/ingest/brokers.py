"""Real MQTT brokers for the ingest tests: the machine's Mosquitto at 127.0.0.1:1883, and a
Mosquitto of the test's own that it may restart.

The fault tests restart the broker, and must not take the shared one down under other tests.
Theirs runs with what docs/ingest.md asks of a broker that must lose nothing: persistence on,
and no cap on the messages it queues for a session (Mosquitto's default, 1000, drops the
rest of a backlog although it acknowledged them to the publisher).
"""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.ingest.certs import Authority
from tests.servers import free_port

# ``user``: started as root (CI), Mosquitto would switch to the mosquitto user, which cannot
# write its database into the test's folder; whoever runs the tests owns that folder
CONFIG = """\
user {user}
listener {port} 127.0.0.1
allow_anonymous true
persistence true
persistence_location {dir}/
max_queued_messages 0
"""


def reachable(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def require_shared_broker() -> None:
    """The machine's broker; a test needing it fails (never skips) when it is down."""
    if not reachable(1883):
        pytest.fail(
            "no MQTT broker at 127.0.0.1:1883 "
            "(start it: mosquitto -d -c /etc/mosquitto/mosquitto.conf)"
        )


class Mosquitto:
    """A Mosquitto process of this test's own (stop and start keep its persisted sessions)."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            pytest.fail("the mosquitto binary is missing (apt-get install mosquitto)")
        self.binary = binary
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(CONFIG.format(port=self.port, dir=folder, user=getpass.getuser()))
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.ports = [self.port]  # every listener: start() waits for them all

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)],
            stdout=(self.folder / "broker.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while not all(reachable(p, 0.2) for p in self.ports):
            assert self.proc.poll() is None, (self.folder / "broker.log").read_text()
            assert time.monotonic() < deadline, "mosquitto did not start in 10 s"
            time.sleep(0.02)

    def stop(self) -> None:
        """A clean stop (SIGTERM): Mosquitto writes its sessions and queues to disk."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
        self.restarts += 1


SECURED = """\
user {user}
per_listener_settings true
persistence false

listener {port} 127.0.0.1
allow_anonymous false
password_file {passwords}
acl_file {acl}

listener {tls_port} 127.0.0.1
allow_anonymous false
password_file {passwords}
acl_file {acl}
cafile {ca}
certfile {cert}
keyfile {key}

listener {mtls_port} 127.0.0.1
allow_anonymous false
cafile {ca}
certfile {cert}
keyfile {key}
require_certificate true
use_identity_as_username true
"""


class SecuredMosquitto(Mosquitto):
    """A Mosquitto that lets no one in anonymously: ``port`` checks a user name and password,
    ``tls_port`` the same over TLS with the broker certificate of ``authority``, and
    ``mtls_port`` asks for a client certificate signed by that authority instead. On the first
    two, ``acl`` (Mosquitto's acl_file text) says who may read and write which topics."""

    def __init__(self, folder: Path, authority: Authority, users: dict[str, str], acl: str) -> None:
        super().__init__(folder)
        passwords = folder / "passwords"
        passwords.write_text("")
        tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        for user, password in users.items():
            subprocess.run([tool, "-b", str(passwords), user, password], check=True)
        (folder / "acl").write_text(acl)
        self.tls_port, self.mtls_port = free_port(), free_port()
        self.ports = [self.port, self.tls_port, self.mtls_port]
        self.conf.write_text(
            SECURED.format(
                user=getpass.getuser(),
                port=self.port,
                tls_port=self.tls_port,
                mtls_port=self.mtls_port,
                passwords=passwords,
                acl=folder / "acl",
                ca=authority.ca,
                cert=authority.broker.cert,
                key=authority.broker.key,
            )
        )


class NatsServer:
    """A NATS server with JetStream of this test's own, on a free port (the fault tests restart
    it, which must not take the machine's server at :4222 down under other tests). Its streams
    are kept in ``folder`` and survive a restart."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        if not Path(binary).exists():
            pytest.fail("the nats-server binary is missing (apt-get install nats-server)")
        self.binary = binary
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        cmd = [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js"]
        self.proc = subprocess.Popen(
            [*cmd, "-sd", str(self.folder / "store")],
            stdout=(self.folder / "nats.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while not reachable(self.port, 0.2):
            assert self.proc.poll() is None, (self.folder / "nats.log").read_text()
            assert time.monotonic() < deadline, "nats-server did not start in 10 s"
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM: the server stops cleanly, JetStream's file store stays on disk."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=15)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
        self.restarts += 1
