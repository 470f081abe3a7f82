"""A lean MQTT 3.1.1 / 5 subscriber: what the ingest adapter needs, and nothing else.

Why not paho-mqtt here: measured on the 2-core reference machine, paho's network loop
receives about 8,000 QoS 1 messages a second with nothing else to do, and inside an ingest
worker it took half of the process's CPU (its per-packet reads, objects and locks), which
halved the readings written per second. This client reads the socket in 64 KiB chunks,
slices PUBLISH packets out of the buffer and sends the PUBACKs of a whole committed batch in
one write. It subscribes only: no publishing, no QoS 2, no will, no websockets. paho stays
the client of everything else (subscription notifications).

Threads: a reader (connect, subscribe, read, reconnect with back-off) that calls
``on_message(topic, payload, packet_id, qos)`` and may block there (backpressure: the
socket is not read meanwhile); :meth:`ack` may be called from any thread; the reader also
sends PINGREQ when nothing else was sent for half the keepalive.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("cityward.ingest.mqtt")

CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0
# MQTT 5 property identifiers used in CONNECT
SESSION_EXPIRY, RECEIVE_MAXIMUM = 0x11, 0x21

OnMessage = Callable[[str, bytes, int, int], None]

# What a refusal means, for the operator (MQTT 5.0 sections 3.2.2.2 and 3.9.3; 3.1.1: 3.2.2.3)
CONNECT_REFUSED_V5 = {
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8C: "bad authentication method",
    0x95: "packet too large",
    0x97: "quota exceeded",
    0x9C: "use another server",
    0x9D: "server moved",
    0x9F: "connection rate exceeded",
}
CONNECT_REFUSED_V3 = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
# the codes that mean the broker does not accept who we are
_CREDENTIALS = {0x86, 0x87, 0x8C, 4, 5}
SUBSCRIBE_REFUSED = {
    0x80: "unspecified error",
    0x83: "implementation specific error",
    0x87: "not authorized",
    0x8F: "topic filter invalid",
    0x91: "packet identifier in use",
    0x97: "quota exceeded",
    0x9E: "shared subscriptions not supported",
    0xA1: "subscription identifiers not supported",
    0xA2: "wildcard subscriptions not supported",
}


def connect_refusal(code: int, v5: bool) -> str:
    """The operator's text for a CONNACK refusal ``code``."""
    name = (CONNECT_REFUSED_V5 if v5 else CONNECT_REFUSED_V3).get(code, "unknown reason")
    hint = ""
    if code in _CREDENTIALS:
        hint = "; check username and password_file, or the client certificate"
    return f"the broker refused the connection: {name} (reason code {code}){hint}"


class MqttError(Exception):
    """The broker refused us or broke the protocol."""


def encode_varint(n: int) -> bytes:
    """MQTT's variable byte integer."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_string(s: str | bytes) -> bytes:
    """A length-prefixed UTF-8 string."""
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def encode_packet(kind: int, body: bytes) -> bytes:
    """A control packet: its type byte, the remaining length, the body."""
    return bytes([kind]) + encode_varint(len(body)) + body


@dataclass
class WireOptions:
    host: str
    port: int
    client_id: str
    topics: list[tuple[str, int]]
    v5: bool = True
    clean_start: bool = False
    session_expiry_s: int = 0
    receive_maximum: int = 65535
    keepalive_s: int = 60
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None
    reconnect_max_s: float = 30.0
    connect_timeout_s: float = 10.0


@dataclass
class WireStatus:
    connected: threading.Event = field(default_factory=threading.Event)
    subscribed: threading.Event = field(default_factory=threading.Event)
    connects: int = 0
    session_present: bool = False
    last_error: str = ""
    received: int = 0


class MqttSubscriber:
    """Connects, subscribes at the given QoS, hands messages over, takes acknowledgements."""

    def __init__(self, options: WireOptions, on_message: OnMessage) -> None:
        self.o = options
        self.on_message = on_message
        self.status = WireStatus()
        self._sock: socket.socket | ssl.SSLSocket | None = None
        self._send_lock = threading.Lock()
        self._last_send = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._generation = 0  # bumped at each connection: acks of an older one are dropped
        # acks of messages a kept session delivered before the SUBACK, sent once it came (see
        # _connect); None while no connection is in its handshake
        self._held: list[int] | None = None
        self._held_lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ingest-mqtt", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        sock = self._sock
        if sock is not None:
            try:
                with self._send_lock:
                    sock.sendall(encode_packet(DISCONNECT, b"\x00\x00" if self.o.v5 else b""))
            except OSError:
                pass
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def generation(self) -> int:
        return self._generation

    def ack(self, packet_ids: list[int], generation: int) -> None:
        """PUBACK these QoS 1 packets, in one write. Acks of a connection that has since been
        replaced are dropped: the broker sends those messages again on the new one."""
        with self._held_lock:
            if not packet_ids or generation != self._generation:
                return
            if self._held is not None:  # the connection is still in its handshake
                self._held.extend(packet_ids)
                return
            # that connection's socket, taken with the generation: an ack is never sent on a
            # newer connection, where its packet id may name another message
            sock = self._sock
        self._send(_pubacks(packet_ids), sock)

    def _send(self, data: bytes, sock: socket.socket | ssl.SSLSocket | None = None) -> None:
        sock = sock or self._sock
        if sock is None:
            return
        try:
            with self._send_lock:
                sock.sendall(data)
                self._last_send = time.monotonic()
        except OSError as exc:  # the reader notices the broken connection and reconnects
            self.status.last_error = f"send failed: {exc}"

    # -- the reader -------------------------------------------------------------------------
    def _run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                self._connect()
                delay = 0.5
                self._read_loop()
            except (OSError, MqttError, ssl.SSLError) as exc:
                if self._stop.is_set():
                    break
                text = str(exc) or type(exc).__name__
                # "TLS: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: ..."
                self.status.last_error = f"TLS: {text}" if isinstance(exc, ssl.SSLError) else text
                log.warning(
                    "ingest mqtt %s:%d: %s; reconnecting in %.1f s",
                    self.o.host,
                    self.o.port,
                    self.status.last_error,
                    delay,
                )
            finally:
                self.status.connected.clear()
                self._close()
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, self.o.reconnect_max_s)

    def _close(self) -> None:
        with self._held_lock:
            self._held = None  # a handshake that failed: its messages come again
            sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _connect(self) -> None:
        o = self.o
        # A new connection from here on: acks of an older one are dropped, and those of the
        # messages a kept session delivers before the SUBACK are this one's. They used to be
        # an earlier connection's (the generation was bumped after the SUBACK) and were
        # dropped; unacknowledged, they filled the broker's in-flight window (20 on Mosquitto
        # over MQTT 3.1.1, receive_maximum over 5) and a backlog stopped there, or came back
        # on every restart. They are held until the SUBACK, not sent at once: acknowledged
        # during the handshake, Mosquitto went on delivering the backlog before its SUBACK,
        # and readings were lost in the fault test (kills and a broker restart).
        with self._held_lock:
            self._generation += 1
            self._held = []
        raw = socket.create_connection((o.host, o.port), timeout=o.connect_timeout_s)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock: socket.socket | ssl.SSLSocket = (
            o.tls.wrap_socket(raw, server_hostname=o.host) if o.tls is not None else raw
        )
        flags = 0x02 if o.clean_start else 0x00
        payload = encode_string(o.client_id)
        if o.username is not None:
            flags |= 0x80
            payload += encode_string(o.username)
            if o.password is not None:
                flags |= 0x40
                payload += encode_string(o.password)
        body = (
            encode_string("MQTT")
            + bytes([5 if o.v5 else 4, flags])
            + struct.pack("!H", o.keepalive_s)
        )
        if o.v5:
            props = bytes([SESSION_EXPIRY]) + struct.pack("!I", o.session_expiry_s)
            props += bytes([RECEIVE_MAXIMUM]) + struct.pack("!H", o.receive_maximum)
            body += encode_varint(len(props)) + props
        sock.sendall(encode_packet(CONNECT, body + payload))
        with self._held_lock:
            self._sock = sock
        kind, data = self._read_packet(sock)
        if kind & 0xF0 != CONNACK:
            raise MqttError(f"expected CONNACK, got packet type {kind >> 4}")
        code = data[1]
        if code != 0:
            raise MqttError(connect_refusal(code, o.v5))
        self.status.session_present = bool(data[0] & 0x01)
        sub = struct.pack("!H", 1)
        if o.v5:
            sub += b"\x00"  # no properties
        for topic, qos in o.topics:
            sub += encode_string(topic) + bytes([qos])
        sock.sendall(encode_packet(SUBSCRIBE, sub))
        kind, data = self._read_packet(sock)
        while kind & 0xF0 == PUBLISH:  # a kept session may deliver before the SUBACK
            self._handle_publish(kind, data)
            kind, data = self._read_packet(sock)
        if kind & 0xF0 != SUBACK & 0xF0:
            raise MqttError(f"expected SUBACK, got packet type {kind >> 4}")
        codes = data[2:]
        if o.v5:
            n, pos = _read_varint(data, 2)
            codes = data[pos + n :]
        refused = [
            f"{topic}: {SUBSCRIBE_REFUSED.get(c, 'unknown reason')} (reason code {c})"
            for (topic, _), c in zip(o.topics, codes, strict=False)
            if c >= 0x80
        ]
        if refused:
            raise MqttError(f"the broker refused a subscription: {'; '.join(refused)}")
        # a TLS read that waits for the rest of a record holds the send lock (_read_loop): if
        # the rest never comes, give up after one and a half keepalives and reconnect
        sock.settimeout(max(30.0, 1.5 * o.keepalive_s) if o.tls is not None else None)
        self._last_send = time.monotonic()
        with self._held_lock:
            held, self._held = self._held or [], None
        if held:
            self._send(_pubacks(held), sock)
        self.status.connects += 1
        self.status.connected.set()
        self.status.subscribed.set()
        log.info(
            "ingest mqtt: connected to %s:%d (session present: %s)",
            o.host,
            o.port,
            self.status.session_present,
        )

    def _read_packet(self, sock: socket.socket | ssl.SSLSocket) -> tuple[int, bytes]:
        """One whole packet, during the handshake (blocking, with the connect timeout)."""

        def exact(n: int) -> bytes:
            buf = b""
            while len(buf) < n:
                chunk = sock.recv(n - len(buf))
                if not chunk:
                    raise MqttError("the broker closed the connection")
                buf += chunk
            return buf

        head = exact(1)[0]
        length, mult = 0, 1
        while True:
            b = exact(1)[0]
            length += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        return head, exact(length) if length else b""

    def _read_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        # Bytes received and not parsed yet, joined only once the packet at their head is
        # whole: joining and re-parsing at every 64 KiB chunk made a large message quadratic
        # (32 MiB took 4.2 s to read)
        unparsed: list[bytes] = []
        size = 0
        need = 0  # the length of the incomplete packet at the head (0: not known yet)
        half = max(1.0, self.o.keepalive_s / 2)
        secure = sock if isinstance(sock, ssl.SSLSocket) else None
        while not self._stop.is_set():
            if time.monotonic() - self._last_send >= half:
                self._send(encode_packet(PINGREQ, b""))
            # SSL sockets may hold decrypted bytes that select() does not see
            buffered = secure.pending() if secure is not None else 0
            if not buffered:
                ready, _, _ = select.select([sock], [], [], min(half, 1.0))
                if not ready:
                    continue
            if secure is not None:
                # one SSL connection must not be read and written at once (OpenSSL's rule; a
                # TLS 1.3 read may write too): the acknowledging thread's sends take this lock
                # as well. select() said a record has begun, so the wait here is short.
                with self._send_lock:
                    chunk = sock.recv(65536)
            else:
                chunk = sock.recv(65536)
            if not chunk:
                raise MqttError("the broker closed the connection")
            unparsed.append(chunk)
            size += len(chunk)
            if size < need:
                continue
            rest = self._parse(unparsed[0] if len(unparsed) == 1 else b"".join(unparsed))
            unparsed = [rest] if rest else []
            size = len(rest)
            need = _packet_length(rest)

    def _parse(self, buf: bytes) -> bytes:
        """Handle every whole packet in ``buf``; return the incomplete rest."""
        pos, end = 0, len(buf)
        while pos + 2 <= end:
            head = buf[pos]
            length, mult, i = 0, 1, pos + 1
            while True:
                if i >= end:
                    return buf[pos:]
                b = buf[i]
                length += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
            if i + length > end:
                return buf[pos:]
            kind = head & 0xF0
            if kind == PUBLISH:
                self._handle_publish(head, buf[i : i + length])
            elif kind == DISCONNECT:
                raise MqttError("the broker disconnected us")
            # PINGRESP, PUBACK of nothing, and the rest: nothing to do
            pos = i + length
        return buf[pos:]

    def _handle_publish(self, head: int, body: bytes) -> None:
        qos = (head >> 1) & 0x03
        tlen = (body[0] << 8) | body[1]
        topic = body[2 : 2 + tlen].decode("utf-8", "replace")
        pos = 2 + tlen
        pid = 0
        if qos:
            pid = (body[pos] << 8) | body[pos + 1]
            pos += 2
        if self.o.v5:
            n, pos = _read_varint(body, pos)
            pos += n
        self.status.received += 1
        self.on_message(topic, body[pos:], pid, qos)


def _pubacks(packet_ids: list[int]) -> bytes:
    """PUBACK packets for these ids, in one buffer."""
    return b"".join(b"\x40\x02" + struct.pack("!H", pid) for pid in packet_ids)


def _packet_length(buf: bytes) -> int:
    """The whole length of the packet ``buf`` begins with, or 0 while its header is cut."""
    length, mult = 0, 1
    for i in range(1, min(len(buf), 5)):
        b = buf[i]
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            return i + 1 + length
    return 0


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, mult = 0, 1
    while True:
        b = data[pos]
        pos += 1
        value += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            return value, pos
