"""`cityward vision run` shutting down: never a camera leased but not running, nor running
without its lease.

A lease tells the other workers that its holder *runs* the camera. At SIGTERM the worker
stopped its cameras first and the leaser after: meanwhile the leaser's rounds went on renewing
(and could acquire) the leases of cameras that no longer ran, and no other worker could take
them over. The leaser now stops first: its thread ends, then each camera is stopped and its
lease released at once, one camera after the other.

The run is real and in this process (so that the worker's and the lease store's calls can be
watched): two looping file cameras, leases in the SQLite bank, SIGTERM once both run.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from cityward.bank.store.sqlite import SqliteStore
from cityward.cli import app
from cityward.vision.leases import PRESENCE_PREFIX, BankLeaseStore, CameraLeaser
from cityward.vision.worker import VisionWorker
from tests.conftest import shared_path

runner = CliRunner()
CAMERAS = ["shut-1", "shut-2"]


def _config(tmp: Path) -> Path:
    models = shared_path("data", "vision", "models")
    video = shared_path("data", "vision", "videos", "street_cars_ahmetozlu.mp4")
    lines = [
        "[vision]",
        f"models_dir = {orjson.dumps(str(models)).decode()}",
        "",
        "[vision.leases]",
        'store = "bank"',
        "ttl_s = 3",
        "renew_every_s = 0.1",
    ]
    for cam in CAMERAS:
        lines += [
            "",
            "[[vision.cameras]]",
            f'id = "{cam}"',
            f"url = {orjson.dumps(str(video)).decode()}",
            "loop = true",
            "realtime = true",
            "analysis_fps = 1",
            "interval_s = 3600",
            "location = [3.7174, 51.0543]",
            'rules = [{type = "line", name = "l", line = [[150, 200], [620, 235]]}]',
        ]
    path = tmp / "city.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def own_signal_handlers() -> Iterator[None]:
    """`vision run` installs SIGINT/SIGTERM handlers in this process: put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


class _Watch:
    """Watches the real worker, leaser and lease store of the run (each call goes through)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.worker: VisionWorker | None = None
        self.leaser: CameraLeaser | None = None
        self.store: BankLeaseStore | None = None
        self.round = threading.Condition(self.lock)
        self.rounds = 0
        self.shutting_down = threading.Event()
        self.violations: list[str] = []
        self.stopped: list[str] = []
        self.released: list[str] = []

    def running(self) -> set[str]:
        w = self.worker
        if w is None:
            return set()
        return {c for c, r in list(w.runners.items()) if not r.finished.is_set()}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        watch = self
        start_camera = VisionWorker.start_camera
        stop_camera = VisionWorker.stop_camera
        leaser_start = CameraLeaser.start
        renew_many = BankLeaseStore.renew_many
        release = BankLeaseStore.release

        def on_start(self: VisionWorker, camera_id: str) -> None:
            watch.worker = self
            if watch.shutting_down.is_set():
                watch.violations.append(f"{camera_id} started while the worker shuts down")
            start_camera(self, camera_id)

        def on_stop(self: VisionWorker, camera_id: str) -> None:
            if watch.shutting_down.is_set() and camera_id in watch.running():
                assert watch.store is not None
                holder = watch.store.holders().get(camera_id, ("nobody", 0.0))[0]
                if watch.leaser is None or holder != watch.leaser.worker_id:
                    watch.violations.append(f"{camera_id} ran without its lease ({holder})")
                stop_camera(self, camera_id)
                watch.stopped.append(camera_id)
                # a leaser that still runs renews in its next round: let that round come
                leaser = watch.leaser
                thread = leaser._thread if leaser is not None else None
                if thread is not None and thread.is_alive():
                    with watch.round:
                        seen = watch.rounds
                        watch.round.wait_for(lambda: watch.rounds > seen, timeout=10)
                return
            stop_camera(self, camera_id)

        def start(self: CameraLeaser) -> None:
            watch.leaser = self
            leaser_start(self)

        def renew(self: BankLeaseStore, ids: Any, worker_id: str, ttl_s: float) -> set[str]:
            watch.store = self
            ids = list(ids)
            running = watch.running()
            for cam in ids:
                if not cam.startswith(PRESENCE_PREFIX) and cam not in running:
                    watch.violations.append(
                        f"the lease of {cam} renewed while it does not run"
                        + (" (shutdown)" if watch.shutting_down.is_set() else "")
                    )
            kept = renew_many(self, ids, worker_id, ttl_s)
            with watch.round:
                watch.rounds += 1
                watch.round.notify_all()
            return kept

        def give_up(self: BankLeaseStore, camera_id: str, worker_id: str) -> None:
            watch.store = self
            if camera_id in watch.running():
                watch.violations.append(f"the lease of {camera_id} released while it runs")
            release(self, camera_id, worker_id)
            if not camera_id.startswith(PRESENCE_PREFIX):
                watch.released.append(camera_id)

        monkeypatch.setattr(VisionWorker, "start_camera", on_start)
        monkeypatch.setattr(VisionWorker, "stop_camera", on_stop)
        monkeypatch.setattr(CameraLeaser, "start", start)
        monkeypatch.setattr(BankLeaseStore, "renew_many", renew)
        monkeypatch.setattr(BankLeaseStore, "release", give_up)


def test_sigterm_stops_each_camera_under_its_lease_then_releases_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, own_signal_handlers: None
) -> None:
    config = _config(tmp_path)
    data = tmp_path / "data"
    watch = _Watch()
    watch.install(monkeypatch)
    monkeypatch.delenv("CITYWARD_MODELS_DIR", raising=False)
    failed: list[str] = []

    def terminate_once_running() -> None:
        ev = threading.Event()
        for _ in range(600):  # up to a minute for the models to load and both cameras to run
            w = watch.worker
            running = w is not None and watch.store is not None
            running = running and watch.running() == set(CAMERAS)
            if running and w is not None and all(r["frames"] > 0 for r in w.status_rows()):
                break
            ev.wait(0.1)
        else:
            failed.append("the cameras never ran")
        watch.shutting_down.set()
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_once_running, daemon=True)
    killer.start()
    result = runner.invoke(
        app, ["vision", "run", str(config), "--data-dir", str(data), "--no-live"]
    )
    killer.join(5)
    assert failed == []
    assert result.exit_code == 0, result.output
    assert "written:" in result.output
    assert watch.violations == [], "; ".join(watch.violations)
    # each camera was stopped by the shutdown, and its lease given up after that
    assert sorted(watch.stopped) == CAMERAS
    assert sorted(watch.released) == CAMERAS
    # nothing left: no lease row, no runner, every camera's status row says "elsewhere"
    store = SqliteStore(data / "cityward.db")
    try:
        assert BankLeaseStore(store).holders() == {}
    finally:
        store.close()
    assert watch.worker is not None and watch.running() == set()
    assert {r["state"] for r in watch.worker.status_rows()} == {"elsewhere"}
