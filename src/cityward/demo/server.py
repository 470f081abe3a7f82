"""The demo's web server: uvicorn's, stopping the simulation on Ctrl-C before itself."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import FrameType

import uvicorn


class TrafficFirstServer(uvicorn.Server):
    """A uvicorn server that runs ``stop_first`` on Ctrl-C (or SIGTERM) before it stops.

    The simulation's last updates reach the bank over HTTP. Stopped after the server, its feed
    found nobody listening and retried for its whole flush timeout (15 s) before giving up on
    them. Here the first signal stops the simulation in a thread while the server still answers,
    then the server; a second Ctrl-C stops the server at once, as uvicorn does.
    """

    def __init__(self, config: uvicorn.Config, stop_first: Callable[[], None] | None) -> None:
        super().__init__(config)
        self._stop_first = stop_first
        self._stopping: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._stop_first is None or self._stopping is not None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # uvicorn raises it again once it has stopped
        self._stopping = threading.Thread(
            target=self._stop_then_exit, name="demo-stop", daemon=True
        )
        self._stopping.start()

    def _stop_then_exit(self) -> None:
        try:
            if self._stop_first is not None:
                self._stop_first()
        finally:
            self.should_exit = True
