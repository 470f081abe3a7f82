"""Real ``cityward`` processes for the tests that talk to one over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def cityward_serve(
    data: Path, port: int, log: Path, settings: Mapping[str, str] | None = None
) -> Iterator[str]:
    """``cityward serve`` on SQLite in ``data`` (no CITYWARD_* settings from the environment,
    but ``settings``: name -> CITYWARD_NAME); yields its URL once it answers, stops it with
    SIGINT."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYWARD_")}
    env.update({f"CITYWARD_{k.upper()}": v for k, v in (settings or {}).items()})
    cmd = [sys.executable, "-m", "cityward.cli", "serve", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--data-dir", str(data)], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "cityward serve did not answer in 60 s"
                time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
