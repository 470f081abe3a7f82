"""The shared models the vision tests run, one instance per test module; a local HTTP server
for the model downloads."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
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


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves its folder without logging each request."""

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve_folder(
    root: Path, handler: type[http.server.SimpleHTTPRequestHandler] = QuietHandler
) -> Iterator[int]:
    """``root`` served over HTTP on 127.0.0.1 while the block runs; its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
