"""Camera leases: several ``cityward vision run`` workers share one camera list.

Each camera is leased to exactly one worker at a time. A lease is a row (or a key) naming the
worker and when the lease ends; the holder renews it every ``renew_every_s`` and a worker that
dies stops renewing, so its leases run out after ``ttl_s`` and the other workers take its
cameras over: within ``ttl_s + renew_every_s`` (15 + 5 s by default, under the 30 s a city
asks for), plus one round to notice.

Two stores hold the leases, chosen by configuration (:func:`lease_store`), never by code:

* :class:`BankLeaseStore`: a table ``vision_leases`` in the data bank's own database. SQLite
  shares it between the workers of one machine, PostgreSQL between machines.
* :class:`NatsLeaseStore`: a JetStream key-value bucket, when the bus is NATS.

Safety (never two workers on one camera) rests on two things. The store hands a camera to a
second worker only once the first one's lease has run out by the store's own clock (an atomic
conditional write: see each store). And the holder stops its camera on its own *before* that:
:class:`CameraLeaser` counts a lease's end from the moment it *sent* the renewal that
succeeded (on its monotonic clock), which is never later than when the store recorded it, and
stops the camera a safety margin earlier still, whether or not the store can be reached.

    store = lease_store(settings.vision.leases, settings.bus, bank_store)
    leaser = CameraLeaser(store, [c.id for c in settings.vision.cameras],
                          on_start=start_camera, on_stop=stop_camera)
    leaser.start()
    ...
    leaser.stop()          # stops every camera, then releases its leases for the others
    store.close()
"""

from __future__ import annotations

import abc
import base64
import contextlib
import logging
import math
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from cityward.bank.store.base import Store

if TYPE_CHECKING:
    from cityward.bus.nats import JetStream
    from cityward.bus.settings import BusSettings
    from cityward.vision.settings import LeaseSettings

log = logging.getLogger(__name__)

#: the JetStream key-value bucket of the leases when they live in NATS
DEFAULT_BUCKET = "cityward_vision_leases"
#: a worker also leases this pseudo camera, named after itself: its presence, so that a worker
#: that holds no camera yet still counts when the others work out their fair share
PRESENCE_PREFIX = "@worker/"
#: a camera whose ``on_start`` raised is not acquired again by the same worker for this long
#: at most (the back-off starts at one round and doubles)
START_RETRY_MAX_S = 60.0

Holders = dict[str, tuple[str, float]]


class LeaseStore(abc.ABC):
    """Where leases live: camera id -> (worker id, expiry), changed atomically.

    Times are seconds since the epoch on the store's clock; ``ttl_s`` counts from the moment
    the store records the write.
    """

    @abc.abstractmethod
    def acquire(self, camera_id: str, worker_id: str, ttl_s: float) -> bool:
        """Take the camera's lease for ``ttl_s`` seconds: True if it is now this worker's
        (it was free, expired, or this worker's already: then this renews it)."""

    @abc.abstractmethod
    def renew(self, camera_id: str, worker_id: str, ttl_s: float) -> bool:
        """Extend this worker's unexpired lease; False when it is lost (expired, taken over or
        released): the camera must stop at once, and may be acquired again."""

    def renew_many(self, camera_ids: Iterable[str], worker_id: str, ttl_s: float) -> set[str]:
        """Renew several leases; the cameras whose lease this worker still holds."""
        return {c for c in camera_ids if self.renew(c, worker_id, ttl_s)}

    @abc.abstractmethod
    def release(self, camera_id: str, worker_id: str) -> None:
        """Give the lease up now, if this worker holds it (else nothing happens)."""

    @abc.abstractmethod
    def holders(self) -> Holders:
        """Every unexpired lease: camera id -> (worker id, expiry on the store's clock)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free the store's own resources (not the leases: they run out by themselves)."""


# -- the data bank's database ---------------------------------------------------------------

_DDL = (
    "CREATE TABLE IF NOT EXISTS vision_leases ("
    "camera_id TEXT PRIMARY KEY, worker_id TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL)"
)
#: PostgreSQL's clock in epoch seconds; clock_timestamp(), not now(): the time of the statement
#: rather than of the transaction's start (the same here, but robust to longer transactions)
_PG_NOW = "extract(epoch from clock_timestamp())::float8"


class BankLeaseStore(LeaseStore):
    """Leases in the table ``vision_leases(camera_id, worker_id, expires_at)`` of the bank.

    The table is created on first use inside a write transaction of the bank's store, under
    :meth:`WriteTxn.lock_migrations` (workers starting together on PostgreSQL would otherwise
    race in the catalog). Every operation is one write transaction of the store, so SQLite's
    write lock or PostgreSQL's row locks order the workers.

    Acquiring is a single conditional upsert::

        INSERT ... VALUES (camera, me, now + ttl)
        ON CONFLICT (camera_id) DO UPDATE SET worker_id = me, expires_at = now + ttl
          WHERE vision_leases.expires_at <= now OR vision_leases.worker_id = me
        RETURNING worker_id

    A row comes back exactly when the lease is now ours. One statement, not read-then-write:
    between a SELECT that saw the lease expired and an UPDATE another worker could take the
    lease, and both would run the camera. PostgreSQL locks the conflicting row and evaluates
    the WHERE on its newest version, so of two workers racing for a camera exactly one wins;
    on SQLite the write lock serialises them outright.

    The clock: on PostgreSQL every time is the database server's (``clock_timestamp()``), so
    workers on machines whose clocks disagree still agree on when a lease ends. On SQLite (the
    workers of one machine, one clock) it is this machine's clock, passed in as a parameter.
    ``expires_at`` holds epoch seconds in both.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._ready = False
        self._ready_lock = threading.Lock()

    def _ensure(self) -> None:
        if self._ready:
            return
        with self._ready_lock:
            if self._ready:
                return
            with self.store.write("", create_tenant=False) as txn:
                txn.lock_migrations()
                txn.execute(_DDL)
            self._ready = True

    def _now(self) -> tuple[str, list[Any]]:
        """The SQL of 'now' and its parameters: the database's clock or this machine's."""
        if self.store.dialect == "postgres":
            return _PG_NOW, []
        return "?", [time.time()]

    def _write(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        self._ensure()
        with self.store.write("", create_tenant=False) as txn:
            return txn.execute(sql, params)

    def acquire(self, camera_id: str, worker_id: str, ttl_s: float) -> bool:
        now, p = self._now()
        rows = self._write(
            "INSERT INTO vision_leases (camera_id, worker_id, expires_at) "
            f"VALUES (?, ?, {now} + ?) "
            "ON CONFLICT (camera_id) DO UPDATE "
            "SET worker_id = excluded.worker_id, expires_at = excluded.expires_at "
            f"WHERE vision_leases.expires_at <= {now} "
            "OR vision_leases.worker_id = excluded.worker_id "
            "RETURNING worker_id",
            [camera_id, worker_id, *p, float(ttl_s), *p],
        )
        return bool(rows) and rows[0][0] == worker_id

    def renew(self, camera_id: str, worker_id: str, ttl_s: float) -> bool:
        return camera_id in self.renew_many([camera_id], worker_id, ttl_s)

    def renew_many(self, camera_ids: Iterable[str], worker_id: str, ttl_s: float) -> set[str]:
        """One statement for all of them: a worker renews hundreds of cameras per round."""
        ids = list(dict.fromkeys(camera_ids))
        if not ids:
            return set()
        now, p = self._now()
        ids_param: list[str] | str
        if self.store.dialect == "postgres":
            among, ids_param = "camera_id = ANY(?)", ids
        else:
            among, ids_param = (
                "camera_id IN (SELECT value FROM json_each(?))",
                orjson.dumps(ids).decode(),
            )
        rows = self._write(
            f"UPDATE vision_leases SET expires_at = {now} + ? "
            f"WHERE worker_id = ? AND expires_at > {now} AND {among} RETURNING camera_id",
            [*p, float(ttl_s), worker_id, *p, ids_param],
        )
        return {str(r[0]) for r in rows}

    def release(self, camera_id: str, worker_id: str) -> None:
        self._write(
            "DELETE FROM vision_leases WHERE camera_id = ? AND worker_id = ?",
            [camera_id, worker_id],
        )

    def holders(self) -> Holders:
        self._ensure()
        now, p = self._now()
        rows = self.store.select(
            f"SELECT camera_id, worker_id, expires_at FROM vision_leases WHERE expires_at > {now}",
            p,
        )
        return {str(c): (str(w), float(e)) for c, w, e in rows}

    def close(self) -> None:
        """Nothing of its own: the bank's store belongs to whoever opened it."""


# -- NATS JetStream key-value ---------------------------------------------------------------

_KV_KEY = re.compile(r"[-/_=.a-zA-Z0-9]+")


def _kv_key(camera_id: str) -> str:
    """The bucket key of a camera: its id when that is a valid key, else ``=`` + base64."""
    if (
        _KV_KEY.fullmatch(camera_id)
        and not camera_id.startswith(("=", "."))
        and not camera_id.endswith(".")
    ):
        return camera_id
    return "=" + base64.urlsafe_b64encode(camera_id.encode()).decode().rstrip("=")


class NatsLeaseStore(LeaseStore):
    """Leases as keys of a JetStream key-value bucket (history 1, ``max_age`` = the TTL).

    A key per camera; its value is ``{"camera", "worker", "expires"}``. Every change is an
    optimistic-concurrency write, checked by the server against the key's last revision:
    ``create`` takes a free key (fails if the key exists), ``update(last=revision)`` renews
    (fails if anybody wrote the key since this worker's own last write), ``delete(last=...)``
    releases. Two workers can therefore never both believe they hold a key.

    When does a lease expire? By the *bucket's TTL*, judged by the NATS server on its own
    clock: a key that has not been rewritten for ``max_age`` seconds is removed by the server,
    and only then can another worker ``create`` it. The ``expires`` in the value is the
    writer's clock and deliberately not used to take a lease over: a worker whose clock runs
    fast would steal leases still being renewed. It is there for people and :meth:`holders`.
    The cost: every lease in a bucket has the bucket's TTL. ``ttl_s`` of the constructor sets
    it (an existing bucket with another TTL is brought to this one: all workers of a city
    share one configuration); ``acquire``/``renew`` with a longer ``ttl_s`` than the bucket's
    raise ValueError (the server would end the lease before the worker expects it), a shorter
    one is allowed (the server merely keeps the lease longer: slower takeover, still safe).

    ``nats-py`` is asyncio: the store uses :class:`cityward.bus.nats.JetStream`, which runs
    the connection's loop in a thread of its own and offers blocking calls.
    """

    def __init__(
        self,
        js: JetStream,
        *,
        bucket: str = DEFAULT_BUCKET,
        ttl_s: float = 15.0,
        own_connection: bool = False,
    ) -> None:
        import nats.js.api
        import nats.js.errors

        self.jsf = js
        self.bucket = bucket
        self.ttl_s = float(ttl_s)
        self._own = own_connection
        self._revs: dict[str, int] = {}  # key -> revision of this store's last write
        self._lock = threading.Lock()

        async def open_bucket() -> Any:
            try:
                kv = await js.js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                config = nats.js.api.KeyValueConfig(bucket=bucket, history=1, ttl=self.ttl_s)
                return await js.js.create_key_value(config)
            info = await js.js.stream_info(f"KV_{bucket}")
            if info.config.max_age is None or abs(info.config.max_age - self.ttl_s) > 1e-3:
                log.warning(
                    "lease bucket %s had a TTL of %s s; setting it to %s s",
                    bucket,
                    info.config.max_age,
                    self.ttl_s,
                )
                info.config.max_age = self.ttl_s
                info.config.duplicate_window = min(
                    info.config.duplicate_window or self.ttl_s, self.ttl_s
                )
                await js.js.update_stream(info.config)
            return kv

        self.kv: Any = js._run(open_bucket(), js.timeout * 3)

    def _run(self, coro: Any) -> Any:
        return self.jsf._run(coro, self.jsf.timeout * 2)

    def _value(self, camera_id: str, worker_id: str, ttl_s: float) -> bytes:
        if ttl_s > self.ttl_s + 1e-9:
            raise ValueError(f"lease TTL {ttl_s} s exceeds the bucket's {self.ttl_s} s")
        return orjson.dumps(
            {"camera": camera_id, "worker": worker_id, "expires": time.time() + ttl_s}
        )

    def acquire(self, camera_id: str, worker_id: str, ttl_s: float) -> bool:
        import nats.js.errors as e

        key = _kv_key(camera_id)
        value = self._value(camera_id, worker_id, ttl_s)
        kv = self.kv

        async def acquire() -> int | None:
            for _ in range(2):  # again when the key expired between two of these requests
                try:
                    return int(await kv.create(key, value))
                except e.KeyWrongLastSequenceError:
                    pass  # somebody holds it: this worker (renew) or another (not expired)
                except e.KeyNotFoundError:
                    continue  # create's own look-up found it gone: expired just now
                try:
                    entry = await kv.get(key)
                except e.KeyNotFoundError:
                    continue
                if entry.value is None or orjson.loads(entry.value).get("worker") != worker_id:
                    return None
                try:
                    return int(await kv.update(key, value, last=entry.revision))
                except e.KeyWrongLastSequenceError:
                    return None
            return None

        rev = self._run(acquire())
        with self._lock:
            if rev is None:
                self._revs.pop(key, None)
                return False
            self._revs[key] = rev
            return True

    def renew(self, camera_id: str, worker_id: str, ttl_s: float) -> bool:
        import nats.js.errors as e

        key = _kv_key(camera_id)
        value = self._value(camera_id, worker_id, ttl_s)
        with self._lock:
            last = self._revs.get(key)
        if last is None:
            return False  # not acquired through this store
        kv = self.kv

        async def renew() -> int | None:
            try:
                return int(await kv.update(key, value, last=last))
            except e.KeyWrongLastSequenceError:
                return None  # rewritten by another, or expired (removed) by the server

        rev = self._run(renew())
        with self._lock:
            if rev is None:
                self._revs.pop(key, None)
                return False
            self._revs[key] = rev
            return True

    def release(self, camera_id: str, worker_id: str) -> None:
        import nats.js.errors as e

        key = _kv_key(camera_id)
        with self._lock:
            last = self._revs.pop(key, None)
        kv = self.kv

        async def release() -> None:
            rev = last
            if rev is None:
                try:
                    entry = await kv.get(key)
                except e.KeyNotFoundError:
                    return
                if entry.value is None or orjson.loads(entry.value).get("worker") != worker_id:
                    return
                rev = entry.revision
            with contextlib.suppress(e.KeyWrongLastSequenceError):
                await kv.delete(key, last=rev)

        self._run(release())

    def holders(self) -> Holders:
        """The keys the server still holds (it removed the expired ones): one snapshot read
        through an ordered consumer, as ``kv.keys()`` does, values included."""
        import nats.errors

        from cityward.bus.nats import BusError

        kv = self.kv
        timeout = self.jsf.timeout

        async def snapshot() -> Holders:
            out: Holders = {}
            watcher = await kv.watchall(ignore_deletes=True)
            try:
                while True:
                    try:
                        entry = await watcher.updates(timeout=timeout)
                    except nats.errors.TimeoutError:
                        # a partial view would miscount the workers: fail the round instead
                        raise BusError(f"lease bucket {self.bucket}: no snapshot") from None
                    if entry is None:  # the end of the initial values
                        break
                    if entry.value is None or entry.operation is not None:
                        continue
                    doc = orjson.loads(entry.value)
                    out[str(doc["camera"])] = (str(doc["worker"]), float(doc["expires"]))
            finally:
                await watcher.stop()
            return out

        result: Holders = self._run(snapshot())
        return result

    def close(self) -> None:
        if self._own:
            self.jsf.close()


# -- choosing by configuration --------------------------------------------------------------


def lease_store(
    leases: LeaseSettings,
    bus: BusSettings,
    bank_store: Store | None = None,
    *,
    bucket: str = DEFAULT_BUCKET,
) -> LeaseStore:
    """The lease store that ``[vision.leases] store`` names.

    ``"bank"``: :class:`BankLeaseStore` over ``bank_store`` (required then). ``"nats"``:
    :class:`NatsLeaseStore` over its own connection to ``[bus] nats_url``, the bucket's TTL
    being ``leases.ttl_s``. ``"auto"`` (the default): NATS when ``[bus] kind = "nats"``, else
    the bank. Switching is a configuration change; the two stores share nothing, so stop
    every worker before switching a running city.
    """
    kind = leases.store
    if kind == "auto":
        kind = "nats" if bus.kind == "nats" else "bank"
    if kind == "nats":
        from cityward.bus.nats import JetStream

        js = JetStream(
            bus.nats_url, name="cityward-vision-leases", connect_timeout_s=bus.connect_timeout_s
        )
        try:
            js.connect()
            return NatsLeaseStore(js, bucket=bucket, ttl_s=leases.ttl_s, own_connection=True)
        except BaseException:
            js.close()
            raise
    if bank_store is None:
        raise ValueError("camera leases in the bank need the bank's store")
    return BankLeaseStore(bank_store)


# -- the worker's side ----------------------------------------------------------------------


def default_worker_id() -> str:
    """``hostname:pid:random``: unique even when a restarted worker gets the same pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class CameraLeaser:
    """Keeps this worker's fair share of the cameras leased, and starts/stops them.

    A background thread runs one round every ``renew_every_s``:

    1. renew the leases held (one that fails is lost: ``on_stop`` at once) and this worker's
       presence lease (see :data:`PRESENCE_PREFIX`);
    2. read the holders: the live workers are those holding an unexpired lease (presence or
       camera) plus this one; the fair share is ``ceil(cameras / live workers)``;
    3. above the share, release half the excess (rounded up), most recently gained first:
       gradually, so that a worker that comes and goes does not reshuffle the whole city;
       ``on_stop`` runs *before* the release, so the next holder never overlaps;
    4. below it, try free or expired cameras (in a random order, so that workers starting
       together do not all race for the same ones) until the share is reached, calling
       ``on_start`` for each gained.

    A lease says that its holder *runs* the camera. So a camera whose ``on_start`` raises is
    not kept: ``on_stop`` runs (whatever the failed start left behind is stopped), the lease
    is released, and this worker leaves the camera to the others for a back-off (one round,
    doubling up to :data:`START_RETRY_MAX_S`) before it acquires it again. Kept, it would
    stand still for good under a lease renewed every round, which no other worker can take.

    Independently of the rounds, a camera whose lease runs out by this worker's own reckoning
    (``ttl_s`` after sending the last renewal that succeeded, less a safety margin of a tenth
    of ``ttl_s``) is stopped at that moment, even if the store cannot be reached: the store
    gives it to another worker only after the full ``ttl_s`` by its own clock, which started
    later.

    ``on_start``/``on_stop`` run on the leaser's thread; an exception in them is logged
    (and a failed start handled as above). ``on_stop`` may thus come for a camera whose
    ``on_start`` failed, and must then stop whatever of it runs, if anything.
    """

    def __init__(
        self,
        store: LeaseStore,
        cameras: Sequence[str],
        *,
        worker_id: str | None = None,
        ttl_s: float = 15.0,
        renew_every_s: float = 5.0,
        on_start: Callable[[str], object] | None = None,
        on_stop: Callable[[str], object] | None = None,
    ) -> None:
        if not 0 < renew_every_s < ttl_s:
            raise ValueError("renew_every_s must be positive and less than ttl_s")
        self.store = store
        self.cameras = list(dict.fromkeys(cameras))
        self.worker_id = worker_id or default_worker_id()
        self.ttl_s = float(ttl_s)
        self.renew_every_s = float(renew_every_s)
        self.margin_s = self.ttl_s / 10
        self.on_start = on_start
        self.on_stop = on_stop
        self.presence = PRESENCE_PREFIX + self.worker_id
        self._held: dict[str, float] = {}  # camera -> local monotonic deadline; gain order
        # camera -> (monotonic time before which it is not acquired again, next back-off)
        self._start_failed: dict[str, tuple[float, float]] = {}
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- public ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the background thread (its first round runs at once)."""
        if self._thread is not None:
            raise RuntimeError("the leaser runs already")
        self._thread = threading.Thread(
            target=self._loop, name=f"leaser-{self.worker_id}", daemon=True
        )
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        """Stop the thread; then ``on_stop`` every camera and release its lease (a graceful
        handover: the others take the cameras in their next round, not after ``ttl_s``).

        ``release=False`` abandons everything as a crash would: no callback, no release (the
        leases run out by themselves); for tests and emergencies.
        """
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl_s + 30)
        if not release:
            return
        with self._lock:
            for camera in reversed(list(self._held)):
                self._drop(camera, release=True)
            with contextlib.suppress(Exception):
                self.store.release(self.presence, self.worker_id)

    def held(self) -> set[str]:
        """The cameras this worker holds (and runs) now."""
        with self._lock:
            return set(self._held)

    # -- the rounds ----------------------------------------------------------------------------
    def _loop(self) -> None:
        next_round = time.monotonic()
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= next_round:
                next_round = now + self.renew_every_s
                try:
                    self.run_once()
                except Exception:
                    log.exception("camera lease round of %s failed", self.worker_id)
            self._expire(time.monotonic())
            with self._lock:
                first = min(self._held.values(), default=math.inf)
            wait = max(0.0, min(next_round, first) - time.monotonic())
            self._stopping.wait(wait)

    def _expire(self, now: float) -> None:
        """Stop the cameras whose lease ran out by this worker's reckoning."""
        with self._lock:
            for camera, deadline in list(self._held.items()):
                if deadline <= now:
                    log.warning("lease of camera %s ran out unrenewed: stopping it", camera)
                    self._drop(camera, release=False)

    def run_once(self) -> None:
        """One round: renew, then acquire or release towards the fair share."""
        with self._lock:
            sent = time.monotonic()
            mine = list(self._held)
            kept = self.store.renew_many(mine, self.worker_id, self.ttl_s)
            for camera in mine:
                if camera in kept:
                    self._held[camera] = sent + self.ttl_s - self.margin_s
                else:
                    log.warning("lost the lease of camera %s: stopping it", camera)
                    self._drop(camera, release=False)
            self._expire(time.monotonic())
            self.store.acquire(self.presence, self.worker_id, self.ttl_s)
            holders = self.store.holders()
            if self._stopping.is_set():
                return
            live = {worker for worker, _ in holders.values()} | {self.worker_id}
            share = math.ceil(len(self.cameras) / len(live))
            excess = len(self._held) - share
            if excess > 0:
                for camera in list(self._held)[-math.ceil(excess / 2) :]:
                    self._drop(camera, release=True)
                return
            now = time.monotonic()
            free = [
                c
                for c in self.cameras
                if c not in holders
                and c not in self._held
                and self._start_failed.get(c, (0.0, 0.0))[0] <= now
            ]
            random.shuffle(free)
            for camera in free:
                if len(self._held) >= share or self._stopping.is_set():
                    break
                sent = time.monotonic()
                if self.store.acquire(camera, self.worker_id, self.ttl_s):
                    self._held[camera] = sent + self.ttl_s - self.margin_s
                    self._start(camera)

    def _start(self, camera: str) -> None:
        """``on_start`` a camera just acquired; if it raises, stop it and give the lease up."""
        if self.on_start is None:
            return
        try:
            self.on_start(camera)
        except Exception:
            _, delay = self._start_failed.get(camera, (0.0, self.renew_every_s))
            self._start_failed[camera] = (
                time.monotonic() + delay,
                min(delay * 2, max(START_RETRY_MAX_S, self.renew_every_s)),
            )
            log.exception(
                "camera %s: on_start failed: releasing its lease; this worker tries it again "
                "in %.0f s at the earliest",
                camera,
                delay,
            )
            self._drop(camera, release=True)
            return
        self._start_failed.pop(camera, None)

    def _drop(self, camera: str, release: bool) -> None:
        """Stop a camera, then (``release``) give its lease up."""
        self._held.pop(camera, None)
        self._call(self.on_stop, camera)
        if release:
            try:
                self.store.release(camera, self.worker_id)
            except Exception:  # it runs out by itself
                log.warning("could not release the lease of camera %s", camera, exc_info=True)

    def _call(self, callback: Callable[[str], object] | None, camera: str) -> None:
        if callback is None:
            return
        try:
            callback(camera)
        except Exception:
            log.exception("camera %s: %s failed", camera, getattr(callback, "__name__", "callback"))
