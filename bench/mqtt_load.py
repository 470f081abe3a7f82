"""A fast MQTT 3.1.1 QoS 1 publisher for the ingest benchmark: many simulated devices.

paho-mqtt publishes about 3,500 QoS 1 messages/s from one process, less than the ingest rate
it should measure, and every CPU cycle the load generator takes is one the ingest worker on
the same 2-core machine does not get. This one writes pre-encoded PUBLISH packets straight to
the socket and reads the PUBACKs on a second thread: only what MQTT itself needs, no retries
(a lost connection ends the run; the benchmark counts what the broker acknowledged).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable

from cityward.ingest.adapters.mqttwire import encode_packet, encode_string


def connect_packet(client_id: str, keepalive: int = 60) -> bytes:
    body = encode_string(b"MQTT") + bytes([4, 0x02]) + struct.pack("!H", keepalive)
    return encode_packet(0x10, body + encode_string(client_id))


def publish_packet(topic: bytes, pid: int, payload: bytes) -> bytes:
    return encode_packet(0x32, encode_string(topic) + struct.pack("!H", pid) + payload)


class Publisher:
    """One connection publishing at QoS 1; ``acked`` counts PUBACKs, ``on_ack`` sees each."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        client_id: str = "cityward-bench-pub",
        window: int = 20_000,
        on_ack: Callable[[int], None] | None = None,
    ) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(connect_packet(client_id))
        connack = self._read_exact(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"the broker refused the connection: {connack!r}")
        self.window = threading.Semaphore(min(window, 65_000))
        self.acked = 0
        self.sent = 0
        self._on_ack = on_ack
        self._reader = threading.Thread(target=self._read_acks, daemon=True)
        self._reader.start()
        self._pid = 0

    def _read_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            buf += chunk
        return buf

    def _read_acks(self) -> None:
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
                n = len(buf) // 4 * 4  # PUBACK: 0x40 0x02 pid pid
                for i in range(0, n, 4):
                    self.acked += 1
                    self.window.release()
                    if self._on_ack is not None:
                        self._on_ack(int.from_bytes(buf[i + 2 : i + 4], "big"))
                buf = buf[n:]
        except OSError:
            return

    def publish_many(self, messages: Iterable[tuple[bytes, bytes]], chunk: int = 200) -> None:
        """Publish (topic, payload) pairs, ``chunk`` packets per send call."""
        out: list[bytes] = []
        for topic, payload in messages:
            self.window.acquire()
            self._pid = self._pid % 65535 + 1
            out.append(publish_packet(topic, self._pid, payload))
            if len(out) >= chunk:
                self.sock.sendall(b"".join(out))
                self.sent += len(out)
                out.clear()
        if out:
            self.sock.sendall(b"".join(out))
            self.sent += len(out)

    def wait_acked(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.acked < self.sent:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        finally:
            self.sock.close()
