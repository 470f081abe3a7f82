"""Fixtures of the ingest tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ingest.brokers import Mosquitto


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto of the test's own (its persisted sessions survive ``restart``)."""
    b = Mosquitto(tmp_path / "broker")
    b.start()
    yield b
    b.stop()
