"""Fixtures of the bus tests: the real NATS JetStream server at 127.0.0.1:4222, unique names.

A test that cannot reach NATS fails: the bus is what these tests are about.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from cityward.bank.changes import Change, ChangeFeed
from cityward.bank.jsonld import ContextResolver
from cityward.bank.model import EntityParser
from cityward.bank.service import Bank
from cityward.bank.store.sqlite import SqliteStore
from cityward.bus.feed import ensure_changes_stream
from cityward.bus.nats import JetStream
from cityward.bus.settings import BusSettings

NATS_URL = os.environ.get("CITYWARD_TEST_NATS", "nats://127.0.0.1:4222")
PARSER = EntityParser(ContextResolver(allow_fetch=False).core)


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``pred`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


def sensor(n: int, value: float = 0.0, prefix: str = "S") -> dict[str, Any]:
    """A parsed Sensor entity, ready for Bank.batch_upsert."""
    return PARSER.entity(
        {
            "id": f"urn:ngsi-ld:Sensor:{prefix}{n}",
            "type": "Sensor",
            "level": {"type": "Property", "value": value},
        }
    )


def write(bank: Bank, n: int, prefix: str = "S", value: float = 0.0, tenant: str = "") -> None:
    """``n`` entities, one write transaction each."""
    for i in range(n):
        result = bank.batch_upsert(tenant, [sensor(i, value, prefix)], "update")
        assert not result.errors


class Collector:
    """A feed listener that keeps every change it hears, thread-safe enough for tests."""

    def __init__(self, feed: ChangeFeed) -> None:
        self.changes: list[Change] = []
        self.handle = feed.subscribe(self)

    def __call__(self, changes: Sequence[Change]) -> None:
        self.changes.extend(changes)

    def pairs(self) -> list[tuple[str, str]]:
        """(entity id, time of the write) of every change heard, in order."""
        return [(c.entity_id, c.at) for c in list(self.changes)]

    def has(self, entity_id: str) -> bool:
        return any(c.entity_id == entity_id for c in list(self.changes))


@pytest.fixture
def bus_settings() -> Iterator[BusSettings]:
    """NATS-mode settings with a stream and subjects of this test only (deleted after)."""
    tag = uuid.uuid4().hex[:10]
    settings = BusSettings(
        kind="nats",
        nats_url=NATS_URL,
        connect_timeout_s=5,
        changes_stream=f"TEST_CHANGES_{tag}",
        changes_subject=f"test.{tag}.changes",
        changes_max_age_s=600,
        relay_poll_s=0.05,
        ack_wait_s=1.0,
    )
    yield settings
    js = JetStream(NATS_URL, name="cityward-test-cleanup", connect_timeout_s=5)
    try:
        js.connect()
        js.delete_stream(settings.changes_stream)
    finally:
        js.close()


@pytest.fixture
def js(bus_settings: BusSettings) -> Iterator[JetStream]:
    """A connected facade with the test's change stream created."""
    j = JetStream(bus_settings.nats_url, name="cityward-test", connect_timeout_s=5)
    j.connect()
    ensure_changes_stream(j, bus_settings)
    yield j
    j.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "bank.db")
    yield store
    store.close()
