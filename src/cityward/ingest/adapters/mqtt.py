"""MQTT devices (paho-mqtt): QoS 1 on a persistent session, acknowledged after the write.

The adapter connects with a fixed client id and a session that outlives the connection (MQTT
3.1.1 clean session off; MQTT 5 clean start off and a session expiry), so the broker keeps
what is published while cityward is down and delivers it when the adapter returns. Messages
are acknowledged by hand (``manual_ack``), only once the batching writer has committed them:
a process killed before that leaves them unacknowledged and the broker sends them again,
where the writer's delivery keys make the repeat a no-op.

Flow control: with MQTT 5 the adapter announces a Receive Maximum, so the broker never has
more unacknowledged messages in flight to it than the writer may hold; when the writer is full
the callback waits, paho stops reading the socket, and the rest stays at the broker. With
MQTT 3.1.1 the broker's own ``max_inflight_messages`` (Mosquitto: 20 by default) bounds the
flight and with it the rate: use MQTT 5 where the broker has it.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import Field, model_validator

from cityward.ingest.adapters import Adapter, AdapterConfig, Intake

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

    def __init__(self, config: AdapterConfig, intake: Intake) -> None:
        super().__init__(config, intake)
        c = self.config
        self.client_id = c.client_id or f"cityward-ingest-{intake.name}"
        v5 = c.protocol == "5"
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if v5 else False,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            manual_ack=True,
        )
        self._client.reconnect_delay_set(1, int(max(1, c.reconnect_max_s)))
        # paho's own queue of outgoing packets (our PUBACKs): unbounded is right here, it only
        # ever holds as many as the broker has in flight to us
        self._client.max_inflight_messages_set(65535)
        if c.username:
            password = c.password_file.read_text().strip() if c.password_file else c.password
            self._client.username_pw_set(c.username, password)
        if c.tls:
            self._client.tls_set(
                ca_certs=str(c.ca_file) if c.ca_file else None,
                certfile=str(c.cert_file) if c.cert_file else None,
                keyfile=str(c.key_file) if c.key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.connects = 0
        self.last_error = ""
        self._stopping = False

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        c = self.config
        props = None
        if c.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = c.session_expiry_s
            props.ReceiveMaximum = c.receive_maximum
        # connect_async: a broker that is down at start is retried by the loop, not fatal
        self._client.connect_async(
            c.host,
            c.port,
            keepalive=c.keepalive_s,
            clean_start=False if c.protocol == "5" else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
        self._client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.connected.is_set(),
            "connects": self.connects,
            "client_id": self.client_id,
            "last_error": self.last_error,
        }

    # -- callbacks (paho's network thread) ---------------------------------------------------
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: Any,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self.last_error = f"connection refused: {reason}"
            log.warning(
                "ingest %s: broker %s refused: %s", self.intake.name, self.config.host, reason
            )
            return
        self.connects += 1
        self.connected.set()
        c = self.config
        topics = [f"$share/{c.share_group}/{t}" if c.share_group else t for t in c.topics]
        log.info(
            "ingest %s: connected to %s:%d (session present: %s)",
            self.intake.name,
            c.host,
            c.port,
            flags.session_present,
        )
        # subscribing again on a kept session changes nothing and heals a lost one
        client.subscribe([(t, int(c.qos)) for t in topics])
        self.subscribed.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: Any,
        properties: Properties | None,
    ) -> None:
        self.connected.clear()
        if not self._stopping:
            self.last_error = f"disconnected: {reason}"
            log.warning("ingest %s: lost the broker (%s); reconnecting", self.intake.name, reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        mid, qos = msg.mid, msg.qos

        def ack(_: str | None) -> None:
            # settled: in the bank, already there, or a dead letter; either way the broker may
            # forget it now
            if qos:
                client.ack(mid, qos)

        while True:
            try:
                # waits while the writer is full: paho stops reading the socket meanwhile
                self.intake.receive(bytes(msg.payload), topic=msg.topic, done=ack, timeout=1.0)
                return
            except TimeoutError:
                if self._stopping:
                    return  # left unacknowledged: the broker sends it again
                time.sleep(0)
