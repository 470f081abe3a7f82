"""The shared models the vision tests run, one instance per test module."""

from __future__ import annotations

from pathlib import Path

import pytest

from cityward.vision.detectors import REGISTRY as DETECTORS
from cityward.vision.detectors import ObjectDetector
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def models() -> Path:
    return shared_path("data", "vision", "models")


@pytest.fixture(scope="module")
def coco(models: Path) -> ObjectDetector:
    """YOLOX-nano on one thread: the object detector the privacy tests attack."""
    cls = DETECTORS["yolox"]
    return cls(cls.Config(threads=1), models)
