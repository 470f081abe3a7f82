"""Camera leases against the real stores: SQLite, PostgreSQL and NATS JetStream.

Each "worker" gets a store of its own (its own SqliteStore on the shared file, its own
PostgreSQL pool, its own NATS connection), as separate processes would. The takeover tests
run the dying worker as a real subprocess and SIGKILL it.

Timings: the defaults (ttl 15 s, renew every 5 s) promise a takeover within 30 s. The tests
scale those numbers by 1/5 (ttl 3 s, renew 1 s, hence a promise of 6 s) to keep the file
short; the scaled promise is what the takeover test asserts.

Run as ``python -m tests.vision.test_leases BACKEND WHERE WORKER_ID`` it is that subprocess.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from cityward.bank.store.postgres import PostgresStore
from cityward.bank.store.sqlite import SqliteStore
from cityward.bus.nats import JetStream
from cityward.bus.settings import BusSettings
from cityward.vision import worker as vision_worker
from cityward.vision.leases import (
    PRESENCE_PREFIX,
    BankLeaseStore,
    CameraLeaser,
    LeaseStore,
    NatsLeaseStore,
    lease_store,
)
from cityward.vision.settings import LeaseSettings, VisionSettings
from cityward.vision.worker import VisionWorker
from tests.conftest import shared_path

ROOT = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get("CITYWARD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
NATS_URL = os.environ.get("CITYWARD_TEST_NATS", "nats://127.0.0.1:4222")
CAMERAS = [f"cam-{i:02d}" for i in range(10)]
# defaults scaled by 1/5: ttl 15 -> 3, renew 5 -> 1, the 30 s takeover promise -> 6 s
TTL, RENEW, PROMISE = 3.0, 1.0, 6.0

StoreFactory = Callable[[], LeaseStore]


def open_store(backend: str, where: str, ttl: float = TTL) -> LeaseStore:
    """A lease store of its own over the shared place (db file, schema, or bucket)."""
    if backend == "sqlite":
        return _Owning(SqliteStore(Path(where)))
    if backend == "postgres":
        return _Owning(PostgresStore(PG_URL, schema=where, max_size=2))
    js = JetStream(NATS_URL, name="cityward-test-leases", connect_timeout_s=5)
    js.connect()
    return NatsLeaseStore(js, bucket=where, ttl_s=ttl, own_connection=True)


class _Owning(BankLeaseStore):
    """A bank lease store that also closes the bank store it was given (a worker's own)."""

    def close(self) -> None:
        self.store.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres), "nats"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(backend, where): where the workers of one test meet; cleaned up after."""
    with _place(request.param, tmp_path) as where:
        yield where


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres), "nats"])
def machines_place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The stores that span machines (SQLite's process takeover is tested through `vision
    run` in tests/vision/test_run.py)."""
    with _place(request.param, tmp_path) as where:
        yield where


@contextlib.contextmanager
def _place(backend: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:10]
    if backend == "sqlite":
        yield backend, str(tmp_path / "bank.db")
    elif backend == "postgres":
        yield backend, f"test_leases_{tag}"
        import psycopg

        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "test_leases_{tag}" CASCADE')
    else:
        yield backend, f"test_leases_{tag}"
        js = JetStream(NATS_URL, name="cityward-test-cleanup", connect_timeout_s=5)
        try:
            js.connect()
            js.delete_stream(f"KV_test_leases_{tag}")
        finally:
            js.close()


@pytest.fixture
def stores(place: tuple[str, str]) -> Iterator[Callable[..., LeaseStore]]:
    """Opens stores over the test's place (one per worker); closes them all after."""
    opened: list[LeaseStore] = []

    def make(ttl: float = TTL) -> LeaseStore:
        s = open_store(*place, ttl=ttl)
        opened.append(s)
        return s

    yield make
    for s in opened:
        with contextlib.suppress(Exception):
            s.close()


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``pred`` until it holds; fails after ``timeout`` (a generous one: this checks that
    something happens at all; when it happens is checked on the leases' own clock)."""
    start = time.monotonic()
    while not pred():
        assert time.monotonic() - start < timeout, f"timed out after {timeout} s: {what}"
        time.sleep(0.02)


class Running:
    """Which worker runs which camera, from the on_start/on_stop callbacks of all leasers."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_camera: dict[str, str] = {}
        self.violations: list[str] = []
        self.starts = 0
        self.events: list[tuple[str, str, str]] = []  # (start|stop, worker, camera)

    def callbacks(self, worker: str) -> dict[str, Callable[[str], None]]:
        def on_start(camera: str) -> None:
            with self.lock:
                self.starts += 1
                self.events.append(("start", worker, camera))
                other = self.by_camera.get(camera)
                if other is not None:
                    self.violations.append(f"{camera} started by {worker} while {other} runs it")
                self.by_camera[camera] = worker

        def on_stop(camera: str) -> None:
            with self.lock:
                self.events.append(("stop", worker, camera))
                if self.by_camera.get(camera) != worker:
                    self.violations.append(f"{camera} stopped by {worker}, which did not run it")
                else:
                    del self.by_camera[camera]

        return {"on_start": on_start, "on_stop": on_stop}

    def count(self, worker: str) -> int:
        with self.lock:
            return sum(1 for w in self.by_camera.values() if w == worker)


def leaser(
    store: LeaseStore,
    running: Running,
    worker: str,
    ttl: float = TTL,
    renew: float = RENEW,
    began: dict[str, float] | None = None,
) -> CameraLeaser:
    """A leaser of CAMERAS; with ``began``, each start also notes when the store began the
    lease just acquired: its recorded end less ``ttl`` (no renewal came in between: both run
    on the leaser's thread), on the store's clock."""
    callbacks = running.callbacks(worker)
    if began is not None:
        start = callbacks["on_start"]

        def on_start(camera: str) -> None:
            began[camera] = store.holders()[camera][1] - ttl
            start(camera)

        callbacks["on_start"] = on_start
    return CameraLeaser(
        store,
        CAMERAS,
        worker_id=worker,
        ttl_s=ttl,
        renew_every_s=renew,
        **callbacks,
    )


def lease_ends(store: LeaseStore, worker: str) -> dict[str, float]:
    """When each lease of ``worker`` ends, as the store recorded it (cameras and presence)."""
    return {c: end for c, (w, end) in store.holders().items() if w == worker}


def camera_holders(store: LeaseStore) -> dict[str, str]:
    return {c: w for c, (w, _) in store.holders().items() if not c.startswith(PRESENCE_PREFIX)}


# -- the stores ---------------------------------------------------------------------------


def test_acquire_renew_release(stores: Callable[..., LeaseStore]) -> None:
    a, b = stores(), stores()
    assert a.acquire("cam-00", "A", TTL)
    assert not b.acquire("cam-00", "B", TTL), "a held lease was taken"
    assert a.acquire("cam-00", "A", TTL), "acquiring one's own lease renews it"
    assert a.renew("cam-00", "A", TTL)
    assert not b.renew("cam-00", "B", TTL)
    worker, expires = b.holders()["cam-00"]
    assert worker == "A" and expires > time.time() - 60
    b.release("cam-00", "B")  # not B's: nothing happens
    assert b.holders()["cam-00"][0] == "A"
    a.release("cam-00", "A")
    assert "cam-00" not in b.holders()
    assert not a.renew("cam-00", "A", TTL), "a released lease was renewed"
    assert b.acquire("cam-00", "B", TTL)
    assert set(a.renew_many(["cam-00", "cam-01"], "B", TTL)) <= {"cam-00"}


def test_renew_after_expiry_by_another_fails(stores: Callable[..., LeaseStore]) -> None:
    ttl = 1.0
    a, b = stores(ttl=ttl), stores(ttl=ttl)
    assert a.acquire("cam-00", "A", ttl)
    assert not b.acquire("cam-00", "B", ttl)
    a_ends = lease_ends(b, "A")["cam-00"]
    wait_until(lambda: b.acquire("cam-00", "B", ttl), 6.0, "B takes the expired lease")
    b_began = lease_ends(b, "B")["cam-00"] - ttl
    # by the leases' own records: B's began once A's had ended, within the leaser's safety
    # margin (a tenth of the TTL: a holder stops its camera that much before its lease ends;
    # it also covers NATS, whose recorded times are the writers' clocks a request earlier)
    assert b_began >= a_ends - ttl / 10, (
        f"the lease was taken {a_ends - b_began:.2f} s before its TTL ran out"
    )
    assert not a.renew("cam-00", "A", ttl), "renewed a lease another worker took over"
    assert not a.acquire("cam-00", "A", ttl)
    assert b.holders()["cam-00"][0] == "B"


def test_racing_acquirers_exactly_one_wins(stores: Callable[..., LeaseStore]) -> None:
    workers = [stores() for _ in range(3)]
    for camera in CAMERAS:
        barrier = threading.Barrier(len(workers))
        won: list[str] = []

        def race(
            store: LeaseStore,
            name: str,
            camera: str = camera,
            barrier: threading.Barrier = barrier,
            won: list[str] = won,
        ) -> None:
            barrier.wait()
            if store.acquire(camera, name, TTL):
                won.append(name)

        threads = [threading.Thread(target=race, args=(s, f"W{i}")) for i, s in enumerate(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, f"{camera}: {won} all acquired it"
        assert workers[0].holders()[camera][0] == won[0]


# -- the leasers --------------------------------------------------------------------------


def test_leasers_under_contention_never_share_a_camera(
    stores: Callable[..., LeaseStore],
) -> None:
    """Three leasers with short rounds, one leaving and a new one joining midway."""
    running = Running()
    ttl, renew = 2.0, 0.1
    ls = [leaser(stores(ttl), running, f"W{i}", ttl, renew) for i in range(3)]
    for lz in ls:
        lz.start()
    probe = stores(ttl)
    try:
        wait_until(lambda: len(running.by_camera) == 10, 10, "all cameras running")
        ls[0].stop()  # graceful: its cameras go to the others
        late = leaser(stores(ttl), running, "W3", ttl, renew)
        late.start()
        ls.append(late)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            # the store names one holder per camera; each holder is a leaser that exists
            assert set(camera_holders(probe).values()) <= {lz.worker_id for lz in ls}
            time.sleep(0.05)
        wait_until(lambda: len(running.by_camera) == 10, 10, "all cameras running again")
    finally:
        for lz in ls:
            lz.stop()
    assert running.violations == []
    assert running.by_camera == {}, "stop() left cameras running"
    assert running.starts > 10, "no camera changed hands: the test tested nothing"


def test_two_workers_split_the_cameras_fairly(stores: Callable[..., LeaseStore]) -> None:
    running = Running()
    a = leaser(stores(), running, "A", renew=0.2)
    b = leaser(stores(), running, "B", renew=0.2)
    a.start()
    try:
        wait_until(lambda: len(a.held()) == 10, 5, "A alone takes every camera")
        b.start()
        wait_until(lambda: len(a.held()) == 5 and len(b.held()) == 5, 10, "A and B settle on 5/5")
        assert a.held() | b.held() == set(CAMERAS)
        assert camera_holders(a.store) == {
            **dict.fromkeys(a.held(), "A"),
            **dict.fromkeys(b.held(), "B"),
        }
    finally:
        a.stop()
        b.stop()
    assert running.violations == []


def test_graceful_stop_hands_over_before_the_ttl(stores: Callable[..., LeaseStore]) -> None:
    running = Running()
    ttl = 10.0  # long: a handover within it came from the release, not from expiry
    began: dict[str, float] = {}
    a = leaser(stores(ttl), running, "A", ttl, 0.3)
    b = leaser(stores(ttl), running, "B", ttl, 0.3, began=began)
    a.start()
    b.start()
    try:
        wait_until(lambda: len(a.held()) + len(b.held()) == 10 and len(b.held()) >= 4, 10, "split")
        ends = lease_ends(b.store, "A")  # A renews on: its leases end this late at the least
        a.stop()
        assert a.held() == set()
        wait_until(lambda: len(b.held()) == 10, ttl + 10, "B takes A's cameras")
        # on the store's clock: B began each lease while A's would still have run
        late = {c: began[c] - end for c, end in ends.items() if c in CAMERAS and began[c] >= end}
        assert not late, f"B took cameras only once A's leases ran out (s after): {late}"
        assert set(camera_holders(b.store).values()) == {"B"}
    finally:
        b.stop()
    assert running.violations == []


def test_abandoned_leases_run_out_and_are_taken_over(tmp_path: Path) -> None:
    """stop(release=False) abandons like a crash: the leases run out after the TTL (SQLite
    only: the killed process test below covers every backend)."""
    running = Running()
    began: dict[str, float] = {}
    a = leaser(open_store("sqlite", str(tmp_path / "bank.db")), running, "A")
    b = leaser(open_store("sqlite", str(tmp_path / "bank.db")), Running(), "B", began=began)
    a.start()
    try:
        wait_until(lambda: len(a.held()) == 10, 5, "A takes every camera")
        a.stop(release=False)
        assert set(camera_holders(a.store).values()) == {"A"}
        ends = lease_ends(a.store, "A")  # abandoned: they end then, unrenewed
        assert running.events[-1][0] == "start", "an abandoning stop() stopped cameras"
        b.start()
        wait_until(lambda: len(b.held()) == 10, PROMISE + 4, "B takes over")
        # on the store's clock (this machine's, on SQLite): each began once A's had ended
        early = {c: ends[c] - began[c] for c in CAMERAS if began[c] < ends[c] - TTL / 10}
        assert not early, f"took over leases that had not run out (s before): {early}"
        assert not a.store.renew(CAMERAS[0], "A", TTL)
    finally:
        b.stop()
        a.store.close()
        b.store.close()


def test_a_revoked_lease_stops_its_camera_at_the_next_round(
    stores: Callable[..., LeaseStore],
) -> None:
    running = Running()
    a = leaser(stores(), running, "A", renew=0.2)
    a.start()
    try:
        wait_until(lambda: len(a.held()) == 10, 5, "A takes every camera")
        stores().release("cam-03", "A")  # an operator revokes it: A's renewal fails
        wait_until(lambda: ("stop", "A", "cam-03") in running.events, 2, "A stops cam-03")
        # free again, A may take it back in the same round: a fresh lease, a fresh start
        assert [e for e in running.events if e[0] == "stop"] == [("stop", "A", "cam-03")]
    finally:
        a.stop()
    assert running.violations == []


class Unreachable(LeaseStore):
    """A real store that can be cut off: every call fails once ``cut`` is set."""

    def __init__(self, inner: LeaseStore) -> None:
        self.inner = inner
        self.cut = threading.Event()

    def _check(self) -> None:
        if self.cut.is_set():
            raise ConnectionError("the lease store is unreachable")

    def acquire(self, camera_id: str, worker_id: str, ttl_s: float) -> bool:
        self._check()
        return self.inner.acquire(camera_id, worker_id, ttl_s)

    def renew(self, camera_id: str, worker_id: str, ttl_s: float) -> bool:
        self._check()
        return self.inner.renew(camera_id, worker_id, ttl_s)

    def renew_many(self, camera_ids: Iterable[str], worker_id: str, ttl_s: float) -> set[str]:
        self._check()
        return self.inner.renew_many(camera_ids, worker_id, ttl_s)

    def release(self, camera_id: str, worker_id: str) -> None:
        self._check()
        self.inner.release(camera_id, worker_id)

    def holders(self) -> dict[str, tuple[str, float]]:
        self._check()
        return self.inner.holders()

    def close(self) -> None:
        self.inner.close()


def test_a_worker_cut_off_from_the_store_stops_before_others_take_over(
    stores: Callable[..., LeaseStore],
) -> None:
    """Unable to renew, a worker stops its cameras when its own reckoning of the lease ends,
    which is before the store lets another worker have them."""
    running = Running()
    flaky = Unreachable(stores())
    a = leaser(flaky, running, "A", renew=0.5)
    b = leaser(stores(), running, "B", renew=0.5)
    a.start()
    try:
        wait_until(lambda: len(a.held()) == 10, 5, "A takes every camera")
        b.start()
        wait_until(lambda: len(b.held()) >= 4, 10, "B gets a share")
        flaky.cut.set()
        wait_until(lambda: not a.held(), TTL + 1, "A stops its cameras")
        wait_until(lambda: len(b.held()) == 10, PROMISE + 4, "B takes them over")
    finally:
        flaky.cut.clear()
        a.stop()
        b.stop()
    assert running.violations == []


class CountingRounds(Unreachable):
    """A real store that counts the leaser's rounds (one renewal of all leases each)."""

    def __init__(self, inner: LeaseStore) -> None:
        super().__init__(inner)
        self.rounds = 0

    def renew_many(self, camera_ids: Iterable[str], worker_id: str, ttl_s: float) -> set[str]:
        self.rounds += 1
        return super().renew_many(camera_ids, worker_id, ttl_s)


def test_a_camera_whose_start_fails_is_released_and_started_again(
    stores: Callable[..., LeaseStore],
) -> None:
    """``on_start`` raising (a models share briefly away): the leaser does not go on renewing
    the lease of a camera that does not run, where no other worker could take it; it gives
    the lease up and acquires the camera again after a back-off that grows."""
    running = Running()
    cb = running.callbacks("A")
    broken = threading.Event()
    broken.set()
    failures: list[str] = []

    def on_start(camera: str) -> None:
        if camera == "cam-03" and broken.is_set():
            failures.append(camera)
            raise OSError("the models share is unavailable")
        cb["on_start"](camera)

    def on_stop(camera: str) -> None:
        with running.lock:
            started = camera in running.by_camera
        if started:  # else its start failed: nothing of it runs
            cb["on_stop"](camera)

    store = CountingRounds(stores())
    a = CameraLeaser(
        store, CAMERAS, worker_id="A", ttl_s=TTL, renew_every_s=0.1,
        on_start=on_start, on_stop=on_stop,
    )  # fmt: skip
    a.start()
    try:
        wait_until(lambda: len(failures) >= 2, 5, "A tries cam-03 again")
        wait_until(lambda: store.rounds >= 16, 10, "16 rounds")
        assert "cam-03" not in a.held(), "held the lease of a camera that does not run"
        assert "cam-03" not in running.by_camera and len(running.by_camera) == 9
        # one round, then 2, 4, 8...: not a start per round
        assert len(failures) * 2 < store.rounds, f"{len(failures)} starts in {store.rounds}"
        broken.clear()
        wait_until(lambda: "cam-03" in running.by_camera, 10, "cam-03 runs")
        assert a.held() == set(CAMERAS)
        assert camera_holders(store) == dict.fromkeys(CAMERAS, "A")
    finally:
        a.stop()
    assert running.violations == []
    assert running.by_camera == {}


# -- the worker behind the leaser ---------------------------------------------------------


@pytest.fixture
def camera_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[VisionWorker, CameraLeaser, Path]]:
    """A real worker with a looping file camera, leased over SQLite; its models folder
    (links to the shared models) starts without the face model, as an unmounted share."""
    monkeypatch.setattr(vision_worker, "RESTART_S", 0.2)  # the back-off, scaled down
    monkeypatch.setattr(vision_worker, "RESTART_MAX_S", 0.4)
    shared = shared_path("data", "vision", "models")
    video = shared_path("data", "vision", "videos", "street_cars_ahmetozlu.mp4")
    models = tmp_path / "models"
    models.mkdir()
    (models / "yolox_nano_416x416.onnx").symlink_to(shared / "yolox_nano_416x416.onnx")
    cams = [{"id": "cam1", "url": str(video), "loop": True, "realtime": True}]
    worker = VisionWorker(VisionSettings(models_dir=models, cameras=cams), _NoSink())
    store = open_store("sqlite", str(tmp_path / "bank.db"))
    leaser = CameraLeaser(
        store, ["cam1"], worker_id="W", ttl_s=TTL, renew_every_s=RENEW,
        on_start=worker.start_camera, on_stop=worker.stop_camera,
    )  # fmt: skip
    try:
        yield worker, leaser, models
    finally:
        leaser.stop()
        worker.stop()
        store.close()


class _NoSink:
    def put(self, entities: Sequence[Any], *, urgent: bool = False) -> None:
        pass


def _row(worker: VisionWorker) -> dict[str, Any]:
    (row,) = worker.status_rows()
    return row


def test_a_camera_that_cannot_start_is_started_again_by_its_worker(
    camera_worker: tuple[VisionWorker, CameraLeaser, Path],
) -> None:
    """The models folder away when the lease is acquired: the camera held must not stand
    still for good (status 'elsewhere', no other worker taking it): it is tried again with
    back-off, the status saying why meanwhile, and runs once the folder is back."""
    worker, leaser, models = camera_worker
    leaser.start()
    wait_until(lambda: "retrying" in _row(worker).get("error", ""), 10, "the status says why")
    row = _row(worker)
    assert row["state"] == "error" and "yunet_n_dynamic.onnx" in row["error"]
    assert leaser.held() == {"cam1"}
    (models / "yunet_n_dynamic.onnx").symlink_to(
        shared_path("data", "vision", "models", "yunet_n_dynamic.onnx")
    )
    wait_until(lambda: _row(worker)["state"] == "running", 20, "the camera runs")
    assert _row(worker)["error"] == ""
    wait_until(lambda: _row(worker)["frames"] > 0, 20, "frames analysed")


def test_a_failed_camera_whose_restart_fails_is_tried_again(
    camera_worker: tuple[VisionWorker, CameraLeaser, Path],
) -> None:
    """A camera that failed while running is restarted on a timer; when that start fails
    too (the models share away by then) it is tried again, not lost."""
    worker, leaser, models = camera_worker
    face = models / "yunet_n_dynamic.onnx"
    face.symlink_to(shared_path("data", "vision", "models", "yunet_n_dynamic.onnx"))
    video = Path(worker.cameras["cam1"].url)
    away = models.parent / "video-away.mp4"
    away.symlink_to(video)
    worker.cameras["cam1"] = worker.cameras["cam1"].model_copy(update={"url": str(away)})
    away.unlink()  # the video gone: each runner fails on its thread, and is restarted
    leaser.start()
    wait_until(lambda: "not found" in _row(worker).get("error", ""), 10, "the runner fails")
    face.unlink()  # and now the restart cannot even build the camera
    wait_until(
        lambda: "yunet_n_dynamic.onnx" in _row(worker).get("error", ""), 10, "the restart fails"
    )
    assert _row(worker)["state"] == "error" and "retrying" in _row(worker)["error"]
    assert leaser.held() == {"cam1"}
    face.symlink_to(shared_path("data", "vision", "models", "yunet_n_dynamic.onnx"))
    away.symlink_to(video)
    wait_until(lambda: _row(worker)["state"] == "running", 20, "the camera runs")


class RoundLog(Unreachable):
    """A real store that notes its leaser's rounds (one renewal of all leases each, at the
    round's start) and in which round each camera was gained."""

    def __init__(self, inner: LeaseStore) -> None:
        super().__init__(inner)
        self.rounds: list[float] = []  # when each round began (time.time(): the stores' clock)
        self.gained: dict[str, int] = {}  # camera -> how many rounds had begun by its gain

    def renew_many(self, camera_ids: Iterable[str], worker_id: str, ttl_s: float) -> set[str]:
        self.rounds.append(time.time())
        return super().renew_many(camera_ids, worker_id, ttl_s)

    def acquire(self, camera_id: str, worker_id: str, ttl_s: float) -> bool:
        got = super().acquire(camera_id, worker_id, ttl_s)
        if got and camera_id in CAMERAS:
            self.gained[camera_id] = len(self.rounds)
        return got


def test_killed_worker_process_is_taken_over(machines_place: tuple[str, str]) -> None:
    """A real worker process, SIGKILLed: the other worker has all cameras within the scaled
    takeover promise (ttl 3 s + renew 1 s, promised 6 s as 15 + 5 -> 30 s by default), on
    the leases' own clock and in rounds: the victim's leases end at most ttl after the kill,
    and the other worker takes the cameras in its first round after that (or the next, when
    the first read the holders a moment too early)."""
    backend, where = machines_place
    mine = open_store(backend, where, ttl=TTL)
    log = RoundLog(mine)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.vision.test_leases", backend, where, "DOOMED"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    running = Running()
    me = leaser(log, running, "ME")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        wait_until(lambda: len(camera_holders(mine)) == 10, 10, "the process takes the cameras")
        me.start()
        wait_until(lambda: len(me.held()) >= 4, 10, "the cameras are shared")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed = time.time()  # after the victim's last write, on the stores' clock
        left = lease_ends(mine, "DOOMED")  # no renewal any more: its leases end then
        victims = [c for c in left if c in CAMERAS]
        assert victims, "the victim held no camera at its death"
        end = max(left.values())  # the last of them, its presence included
        assert end <= killed + TTL, f"the victim's leases ran {end - killed:.2f} s past the kill"
        wait_until(lambda: len(me.held()) == 10, PROMISE + 10, "the takeover")
        assert set(camera_holders(mine).values()) == {"ME"}
        for camera in victims:
            rounds = [t for t in log.rounds[: log.gained[camera]] if t >= end]
            assert len(rounds) <= 2, (
                f"{camera} taken in the round {len(rounds)} after the victim's leases ended"
            )
    finally:
        me.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        with contextlib.suppress(Exception):
            mine.close()
    assert running.violations == []


# -- configuration ------------------------------------------------------------------------


def test_the_store_follows_the_configuration(tmp_path: Path) -> None:
    bank = SqliteStore(tmp_path / "bank.db")
    try:
        auto = lease_store(LeaseSettings(), BusSettings(), bank)
        assert isinstance(auto, BankLeaseStore)
        with pytest.raises(ValueError, match="bank's store"):
            lease_store(LeaseSettings(store="bank"), BusSettings(kind="nats"))
    finally:
        bank.close()
    bucket = f"test_leases_{uuid.uuid4().hex[:10]}"
    nats_bus = BusSettings(kind="nats", nats_url=NATS_URL, connect_timeout_s=5)
    chosen = lease_store(LeaseSettings(ttl_s=4, renew_every_s=1), nats_bus, bucket=bucket)
    assert isinstance(chosen, NatsLeaseStore)
    try:
        assert chosen.ttl_s == 4
        assert chosen.acquire("cam-00", "A", 4)
        with pytest.raises(ValueError, match="exceeds"):
            chosen.acquire("cam-01", "A", 5)
    finally:
        chosen.jsf.delete_stream(f"KV_{bucket}")
        chosen.close()


def _worker_main(backend: str, where: str, worker: str) -> None:
    """The subprocess worker: lease with the scaled defaults until killed."""
    store = open_store(backend, where)
    lz = CameraLeaser(store, CAMERAS, worker_id=worker, ttl_s=TTL, renew_every_s=RENEW)
    lz.start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    _worker_main(*sys.argv[1:4])
