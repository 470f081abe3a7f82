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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from cityward.bank.store.postgres import PostgresStore
from cityward.bank.store.sqlite import SqliteStore
from cityward.bus.nats import JetStream
from cityward.bus.settings import BusSettings
from cityward.vision.leases import (
    PRESENCE_PREFIX,
    BankLeaseStore,
    CameraLeaser,
    LeaseStore,
    NatsLeaseStore,
    lease_store,
)
from cityward.vision.settings import LeaseSettings

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


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``pred``; the seconds it took (fails after ``timeout``)."""
    start = time.monotonic()
    while not pred():
        assert time.monotonic() - start < timeout, f"timed out after {timeout} s: {what}"
        time.sleep(0.02)
    return time.monotonic() - start


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
    store: LeaseStore, running: Running, worker: str, ttl: float = TTL, renew: float = RENEW
) -> CameraLeaser:
    return CameraLeaser(
        store,
        CAMERAS,
        worker_id=worker,
        ttl_s=ttl,
        renew_every_s=renew,
        **running.callbacks(worker),
    )


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
    a, b = stores(ttl=1.0), stores(ttl=1.0)
    assert a.acquire("cam-00", "A", 1.0)
    assert not b.acquire("cam-00", "B", 1.0)
    took = wait_until(lambda: b.acquire("cam-00", "B", 1.0), 6.0, "B takes the expired lease")
    assert took > 0.5, "the lease was taken long before its TTL ran out"
    assert not a.renew("cam-00", "A", 1.0), "renewed a lease another worker took over"
    assert not a.acquire("cam-00", "A", 1.0)
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
    a = leaser(stores(ttl), running, "A", ttl, 0.3)
    b = leaser(stores(ttl), running, "B", ttl, 0.3)
    a.start()
    b.start()
    try:
        wait_until(lambda: len(a.held()) + len(b.held()) == 10 and len(b.held()) >= 4, 10, "split")
        a.stop()
        assert a.held() == set()
        took = wait_until(lambda: len(b.held()) == 10, ttl / 2, "B takes A's cameras")
        assert took < ttl / 2
        assert set(camera_holders(b.store).values()) == {"B"}
    finally:
        b.stop()
    assert running.violations == []


def test_abandoned_leases_run_out_and_are_taken_over(tmp_path: Path) -> None:
    """stop(release=False) abandons like a crash: the leases run out after the TTL (SQLite
    only: the killed process test below covers every backend)."""
    running = Running()
    a = leaser(open_store("sqlite", str(tmp_path / "bank.db")), running, "A")
    b = leaser(open_store("sqlite", str(tmp_path / "bank.db")), Running(), "B")
    a.start()
    try:
        wait_until(lambda: len(a.held()) == 10, 5, "A takes every camera")
        a.stop(release=False)
        assert set(camera_holders(a.store).values()) == {"A"}
        assert running.events[-1][0] == "start", "an abandoning stop() stopped cameras"
        b.start()
        took = wait_until(lambda: len(b.held()) == 10, PROMISE + 4, "B takes over")
        assert took > 1.0, "took over leases that had not run out"
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


def test_killed_worker_process_is_taken_over(machines_place: tuple[str, str]) -> None:
    """A real worker process, SIGKILLed: the other worker has all cameras within the scaled
    takeover promise (ttl 3 s + renew 1 s, promised 6 s as 15 + 5 -> 30 s by default)."""
    backend, where = machines_place
    mine = open_store(backend, where, ttl=TTL)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.vision.test_leases", backend, where, "DOOMED"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    running = Running()
    me = leaser(mine, running, "ME")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        wait_until(lambda: len(camera_holders(mine)) == 10, 10, "the process takes the cameras")
        me.start()
        wait_until(lambda: len(me.held()) >= 4, 10, "the cameras are shared")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed = time.monotonic()
        took = wait_until(lambda: len(me.held()) == 10, PROMISE + 4, "the takeover")
        # measured from the kill: the victim's last renewal came up to a round earlier
        assert took <= PROMISE, f"takeover took {took:.1f} s, promised {PROMISE} s"
        assert time.monotonic() - killed >= 0
        assert set(camera_holders(mine).values()) == {"ME"}
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
