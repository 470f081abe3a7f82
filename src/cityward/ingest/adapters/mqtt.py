"""MQTT devices: QoS 1 on a persistent session, acknowledged after the write.

The adapter connects with a fixed client id and a session that outlives the connection (MQTT
3.1.1 clean session off; MQTT 5 clean start off and a session expiry), so the broker keeps
what is published while cityward is down and delivers it when the adapter returns. Messages
are acknowledged by hand (``manual_ack``), only once the batching writer has committed them:
a process killed before that leaves them unacknowledged and the broker sends them again,
where the writer's delivery keys make the repeat a no-op.

Flow control: with MQTT 5 the adapter announces a Receive Maximum, so the broker never has
more unacknowledged messages in flight to it than the writer may hold; when the writer is full
the callback waits, the socket is not read, and the rest stays at the broker. With MQTT
3.1.1 the broker's own ``max_inflight_messages`` (Mosquitto: 20 by default) bounds the flight
and with it the rate: use MQTT 5 where the broker has it.

The protocol is spoken by :mod:`cityward.ingest.adapters.mqttwire` (why not paho: see there).
"""

from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cityward.ingest.adapters import Adapter, AdapterConfig, Intake
from cityward.ingest.adapters.mqttwire import MqttSubscriber, WireOptions

log = logging.getLogger("cityward.ingest.mqtt")


class MqttConfig(AdapterConfig):
    host: str = Field(default="127.0.0.1", description="The broker's host.")
    port: int = Field(default=1883, ge=1, le=65535, description="1883, or 8883 with TLS.")
    topics: list[str] = Field(description="Topic filters to subscribe, e.g. city/air/+/state.")
    protocol: Literal["5", "3.1.1"] = Field(default="5", description="MQTT version.")
    client_id: str | None = Field(
        default=None,
        description="The session's client id; must stay the same across restarts for the "
        "broker to keep the session (default: cityward-ingest-<source>).",
    )
    share_group: str | None = Field(
        default=None,
        description="Subscribe as $share/<group>/<topic>: several ingest workers split the "
        "messages (each with its own client id).",
    )
    qos: Literal[0, 1] = Field(default=1, description="1: nothing lost; 0: fire and forget.")
    session_expiry_s: int = Field(
        default=7 * 24 * 3600,
        ge=0,
        description="MQTT 5: how long the broker keeps the session while cityward is away.",
    )
    receive_maximum: int = Field(
        default=20_000, ge=1, le=65535, description="MQTT 5: unacknowledged messages in flight."
    )
    keepalive_s: int = Field(default=60, ge=5, le=3600)
    username: str | None = None
    password: str | None = Field(default=None, description="Prefer password_file.")
    password_file: Path | None = Field(default=None, description="A file holding the password.")
    tls: bool = Field(default=False, description="Connect with TLS.")
    ca_file: Path | None = Field(default=None, description="CA bundle to verify the broker.")
    cert_file: Path | None = Field(default=None, description="Client certificate (mutual TLS).")
    key_file: Path | None = Field(default=None, description="Its private key.")
    reconnect_max_s: float = Field(default=30, gt=0, le=3600)

    @field_validator("topics")
    @classmethod
    def _topic_filters(cls, topics: list[str]) -> list[str]:
        # the broker answers a bad filter by closing the connection, which read as "expected
        # SUBACK, got packet type 14" in a reconnect loop, the filter never named
        for topic in topics:
            levels = topic.split("/")
            if not topic or "\x00" in topic or len(topic.encode()) > 65535:
                raise ValueError(f"{topic!r} is not an MQTT topic filter (empty, NUL or too long)")
            for n, level in enumerate(levels):
                if "#" in level and (level != "#" or n != len(levels) - 1):
                    raise ValueError(f"{topic!r}: '#' must be a whole level, the last one")
                if "+" in level and level != "+":
                    raise ValueError(f"{topic!r}: '+' must be a whole level")
        return topics

    @field_validator("share_group")
    @classmethod
    def _share_group(cls, group: str | None) -> str | None:
        if group is not None and (not group or any(c in group for c in "/+#\x00")):
            raise ValueError(f"{group!r}: a share group is a non-empty name without / + #")
        return group

    @model_validator(mode="after")
    def _check(self) -> MqttConfig:
        if not self.topics:
            raise ValueError("subscribe at least one topic")
        if self.password and self.password_file:
            raise ValueError("give password or password_file, not both")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if (self.cert_file or self.ca_file) and not self.tls:
            raise ValueError("ca_file, cert_file and key_file need tls = true")
        return self


class MqttAdapter(Adapter):
    name = "mqtt"
    summary = "MQTT 3.1.1/5 subscriber, QoS 1 on a persistent session, TLS, username/password"
    Config = MqttConfig
    config: MqttConfig
    separate = True

    def __init__(self, config: AdapterConfig, intake: Intake) -> None:
        super().__init__(config, intake)
        c = self.config
        self.client_id = c.client_id or f"cityward-ingest-{intake.name}"
        topics = [f"$share/{c.share_group}/{t}" if c.share_group else t for t in c.topics]
        tls = None
        if c.tls:
            tls = ssl.create_default_context(cafile=str(c.ca_file) if c.ca_file else None)
            if c.cert_file and c.key_file:
                tls.load_cert_chain(str(c.cert_file), str(c.key_file))
        password = c.password_file.read_text().strip() if c.password_file else c.password
        self._wire = MqttSubscriber(
            WireOptions(
                host=c.host,
                port=c.port,
                client_id=self.client_id,
                topics=[(t, int(c.qos)) for t in topics],
                v5=c.protocol == "5",
                session_expiry_s=c.session_expiry_s,
                receive_maximum=c.receive_maximum,
                keepalive_s=c.keepalive_s,
                username=c.username,
                password=password if c.username else None,
                tls=tls,
                reconnect_max_s=c.reconnect_max_s,
            ),
            self._on_message,
        )
        self.connected = self._wire.status.connected
        self.subscribed = self._wire.status.subscribed
        # settled readings' packet ids, acknowledged in one write per round (a committed batch
        # settles hundreds at once)
        self._acks: list[tuple[int, int]] = []
        self._ack_cond = threading.Condition()
        self._stopping = False
        self._acker: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        self._acker = threading.Thread(target=self._ack_loop, name="ingest-mqtt-ack", daemon=True)
        self._acker.start()
        self._wire.start()  # a broker that is down at start is retried, not fatal

    def stop(self) -> None:
        """Take no more messages, let the writer commit what it holds, acknowledge that, then
        disconnect (the session stays with the broker); what is left comes again later."""
        self._stopping = True
        self.intake.writer.wait_idle(10.0)
        with self._ack_cond:
            self._ack_cond.notify_all()
        if self._acker is not None:
            self._acker.join(timeout=5)
        self._wire.stop()

    def status(self) -> dict[str, Any]:
        st = self._wire.status
        return {
            "connected": st.connected.is_set(),
            "connects": st.connects,
            "client_id": self.client_id,
            "last_error": st.last_error,
        }

    # -- messages (the wire's reader thread) -------------------------------------------------
    def _on_message(self, topic: str, payload: bytes, pid: int, qos: int) -> None:
        if self._stopping:
            return  # not taken, not acknowledged: the broker sends it again after a restart
        generation = self._wire.generation

        def ack(_: str | None) -> None:
            # settled: in the bank, already there, or a dead letter; the broker may forget it
            if qos:
                with self._ack_cond:
                    self._acks.append((generation, pid))
                    self._ack_cond.notify()

        while True:
            try:
                # waits while the writer is full: the socket is not read meanwhile
                self.intake.receive(payload, topic=topic, done=ack, timeout=1.0)
                return
            except TimeoutError:
                if self._stopping:
                    return  # left unacknowledged: the broker sends it again

    def _ack_loop(self) -> None:
        while True:
            with self._ack_cond:
                while not self._acks and not self._stopping:
                    self._ack_cond.wait(0.5)
                acks, self._acks = self._acks, []
            if not acks:
                if self._stopping:
                    return
                continue
            by_generation: dict[int, list[int]] = {}
            for generation, pid in acks:
                by_generation.setdefault(generation, []).append(pid)
            for generation, pids in by_generation.items():
                self._wire.ack(pids, generation)
