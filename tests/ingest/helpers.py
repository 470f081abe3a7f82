"""Shared pieces of the ingest tests: a mapping, a bank on real SQLite, what the bank holds."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cityward.bank.access import Access, current_access
from cityward.bank.errors import Forbidden, NgsiError
from cityward.bank.history import History, settle
from cityward.bank.service import Bank
from cityward.bank.store import Store
from cityward.ingest.settings import IngestSettings

AQ = "https://uri.etsi.org/ngsi-ld/default-context/"
MAPPING: dict[str, Any] = {
    "entity_type": "AirQualityObserved",
    "id": "urn:ngsi-ld:AirQualityObserved:{$.dev}",
    "message_id": "$.n",
    "timestamp": {"path": "$.ts", "format": "epoch_ms"},
    "attributes": {"no2": {"path": "$.no2", "required": True}},
}


# MAPPING in a configuration file's form (literal braces: not a str.format template)
MAPPING_TOML = """[ingest.sources.mapping]
entity_type = "AirQualityObserved"
id = "urn:ngsi-ld:AirQualityObserved:{$.dev}"
message_id = "$.n"
timestamp = { path = "$.ts", format = "epoch_ms" }
attributes = { no2 = { path = "$.no2", required = true } }
"""


def mqtt_source(port: int, root: str) -> str:
    """The ``[[ingest.sources]]`` section of an MQTT source "air" on ``root/+``."""
    return (
        '[[ingest.sources]]\nname = "air"\nadapter = "mqtt"\n[ingest.sources.options]\n'
        f'port = {port}\ntopics = ["{root}/+"]\nclient_id = "ingest-{root}"\n' + MAPPING_TOML
    )


def settings(adapter: str, options: dict[str, Any], **writer: Any) -> IngestSettings:
    return IngestSettings.model_validate(
        {
            "sources": [
                {"name": "air", "adapter": adapter, "options": options, "mapping": MAPPING}
            ],
            "writer": {"max_delay_ms": 20, **writer},
        }
    )


def message(n: int, devices: int = 50) -> dict[str, Any]:
    return {"dev": f"s{n % devices}", "n": n, "ts": 1_790_000_000_000 + n * 1000, "no2": n}


def bank_with_history(store: Store) -> Bank:
    bank = Bank(store)
    History(store, bank)
    return bank


def stored_readings(store: Store) -> list[tuple[str, float]]:
    """(entity id, no2) of every no2 reading in the attribute history."""
    settle(store)
    rows = store.select(
        "SELECT e.eid, h.num FROM attr_history h JOIN entities e ON e.pk = h.e "
        "JOIN attr_history_attrs a ON a.path = h.path WHERE a.iri = ?",
        [AQ + "no2"],
    )
    return [(str(e), float(v)) for e, v in rows]


def history_count(store: Store) -> int:
    """History rows, merged or still staged (cityward.bank.history), without writing: another
    process may be writing the bank."""
    return int(
        store.select(
            "SELECT (SELECT count(*) FROM attr_history) + (SELECT count(*) FROM attr_history_new)"
        )[0][0]
    )


def data_dir(tmp: Path) -> Path:
    d = tmp / "data"
    d.mkdir(exist_ok=True)
    return d


def refusing(suffix: str) -> Callable[[], AbstractContextManager[None]]:
    """Writes under the access of a device that does not own the entities ending in
    ``suffix`` (the writer's ``write_context``)."""

    def write(eid: str, types: Any) -> NgsiError | None:
        return Forbidden(f"{eid} is not yours", field="id") if eid.endswith(suffix) else None

    access = Access(
        read=lambda e, t: None, write=write, conjunct=lambda d, q: None, returned=lambda d: None
    )

    @contextmanager
    def as_device() -> Iterator[None]:
        token = current_access.set(access)
        try:
            yield
        finally:
            current_access.reset(token)

    return as_device


class IngestRun:
    """One ``cityward ingest run --role ...`` process (no CITYWARD_* settings inherited)."""

    def __init__(
        self,
        role: str,
        config: Path,
        data: Path,
        log: Path,
        *extra: str,
        status_every: str = "0.5",
    ) -> None:
        self.cmd = [
            sys.executable,
            "-m",
            "cityward.cli",
            "ingest",
            "run",
            "--role",
            role,
            "--config",
            str(config),
            "--data-dir",
            str(data),
            "--status-every",
            status_every,
            *extra,
        ]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CITYWARD_")}
        self.env["COLUMNS"] = "250"  # one status line per line
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def last(self, what: str) -> int:
        """The last status line's count of ``what`` (written, redelivered ...), 0 if none."""
        found = re.findall(rf"{what} ([\d,]+)", self.text())
        return int(found[-1].replace(",", "")) if found else 0

    def kill(self) -> None:
        """SIGKILL: batches in hand are neither written nor acknowledged."""
        assert self.proc is not None and self.proc.poll() is None, self.text()[-3000:]
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.kills += 1

    def stop(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return None if self.proc is None else self.proc.returncode


class Publisher:
    """paho at QoS 1 on a persistent session; remembers which messages the broker acknowledged."""

    def __init__(self, port: int, root: str) -> None:
        self.root = root
        # no lock of ours: paho calls on_publish holding its own, which publish() takes too
        self.acked_mids: set[int] = set()
        self.sent: dict[int, int] = {}  # mid -> message number
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"pub-{root}", clean_session=False
        )
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(200)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self.acked_mids.add(mid)

    @property
    def acked(self) -> set[int]:
        """The numbers of the valid messages the broker acknowledged."""
        return {self.sent[m] for m in list(self.acked_mids) if m in self.sent}

    def publish(self, n: int, payload: bytes | None = None) -> None:
        body = payload if payload is not None else orjson.dumps(message(n))
        info = self.client.publish(f"{self.root}/{n % 50}", body, qos=1)
        if payload is None:
            self.sent[info.mid] = n

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
