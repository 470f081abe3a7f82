"""``cityward vision run``: the cameras this worker holds, each on its own thread.

The camera list is shared by every worker of the city: a :class:`~cityward.vision.leases.
CameraLeaser` leases each camera to exactly one worker (the bank's database, or NATS JetStream
when the bus is NATS) and moves the cameras of a dead worker to the living ones. A camera
thread reads frames, runs the pipeline, and hands counts and alerts to the emitter; the raw
frames stay on that thread and are dropped after analysis.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cityward.redact import redact, redact_url
from cityward.vision.detectors import ObjectDetector
from cityward.vision.emitter import CameraEmitter, Sink, SnapshotStore
from cityward.vision.pipeline import CameraPipeline, StageClock, make_detector
from cityward.vision.settings import _CAMERA_ID, CameraSettings, VisionSettings
from cityward.vision.source import SourceError, VideoSource, is_stream

log = logging.getLogger("cityward.vision.worker")

#: in each camera's snapshot folder: the governance source of the camera, so that its
#: snapshots keep that source's retention once the camera is no longer configured
SOURCE_FILE = ".source"
#: a snapshot is written to ``<name>.tmp`` and renamed at once (:meth:`SnapshotStore.save`):
#: a temporary file older than this was left by a crash mid-write
STALE_TMP_S = 600.0


@dataclass
class CameraStatus:
    """What the status line shows for one camera."""

    id: str
    state: str = "starting"
    frames: int = 0
    detected: int = 0
    total_frames: int = 0
    position: int = 0
    crossings: int = 0
    alerts: int = 0
    error: str = ""
    started: float = field(default_factory=time.monotonic)
    #: when its source opened and frames began (the worker's clock); None before
    running_since: float | None = None
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=50))

    @property
    def fps(self) -> float:
        if len(self.recent) < 2:
            return 0.0
        span = self.recent[-1] - self.recent[0]
        return (len(self.recent) - 1) / span if span > 0 else 0.0


#: a stream (or looping file) camera that failed starts again after this, doubling each time;
#: so does any camera that could not be started at all. A camera that had run for at least
#: RESTART_MAX_S before it failed starts again after RESTART_S: a failure after an hour of
#: good frames is a new incident, not the next in a series
RESTART_S = 5.0
RESTART_MAX_S = 60.0


@dataclass
class _Retry:
    """A held camera waiting to be started again: why it is not running, and when it starts."""

    error: str
    at: float  # the worker's clock (time.monotonic()) at the next start
    timer: threading.Timer


class CameraRunner:
    """One camera: source -> pipeline -> emitter, on a thread, until stopped or the file ends."""

    def __init__(
        self,
        camera: CameraSettings,
        sink: Sink,
        *,
        models_dir: Path | str | None,
        detector: ObjectDetector | None = None,
        snapshots: SnapshotStore | None = None,
        on_done: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.camera = camera
        self._clock = clock
        self.status = CameraStatus(camera.id)
        self.stop_event = threading.Event()
        self.pipeline = CameraPipeline(camera, models_dir, detector=detector)
        self.emitter = CameraEmitter(camera, sink, snapshots=snapshots)
        self.finished = threading.Event()
        self._on_done = on_done
        self._thread = threading.Thread(target=self._run, name=f"camera-{camera.id}", daemon=True)

    @property
    def clock(self) -> StageClock:
        return self.pipeline.clock

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self.stop_event.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        cam = self.camera
        st = self.status
        try:
            source = VideoSource(
                cam.url,
                analysis_fps=cam.analysis_fps,
                realtime=cam.realtime,
                loop=cam.loop,
                reconnect_max_s=cam.reconnect_max_s,
                stop=self.stop_event,
            )
        except Exception as exc:  # SourceError, or whatever OpenCV raised: the camera is
            # reported failed (and started again), not left "starting" on a dead thread
            st.state = "error"
            st.error = redact(str(exc) if isinstance(exc, SourceError) else _oneline(exc))
            log.error("camera %s: %s", cam.id, st.error)
            self.emitter.status("error")
            self.finished.set()
            if self._on_done:
                self._on_done(cam.id)
            return
        st.total_frames = source.frame_count
        st.state = "running"
        st.running_since = self._clock()
        last_t = 0.0
        try:
            # inside the try: a sink that fails here (a full disk) fails the camera, which is
            # then started again, where it ended the thread and left the camera dead
            self.emitter.status("running")
            t_read = time.perf_counter()
            for frame in source:
                self.pipeline.clock.add("decode", time.perf_counter() - t_read)
                result = self.pipeline.process(frame)
                with self.pipeline.clock.timed("emit"):
                    self.emitter.emit(frame.t, result.crossings, result.events, result.anonymized)
                    if self.emitter.due(frame.t):
                        self.emitter.sink.put(
                            self.emitter.flows(frame.t, self.pipeline.intervals())
                        )
                        self.emitter.status("running", st.fps)
                st.frames += 1
                st.detected += int(result.detected)
                st.position = frame.index + 1
                st.crossings += len(result.crossings)
                st.alerts += len(result.events)
                st.recent.append(time.monotonic())
                last_t = frame.t
                t_read = time.perf_counter()
        except Exception as exc:  # one camera's failure never stops the others
            st.state, st.error = "error", redact(_oneline(exc))
            # the traceback masked as well: an exception that quotes the camera URL (OpenCV's,
            # a sink's) must not write its password into the log
            log.error("camera %s failed: %s", cam.id, _traceback(exc))
        finally:
            source.close()
            if st.state != "error":
                st.state = "stopped" if self.stop_event.is_set() else "finished"
            try:
                # the last, partial interval is written too: nothing counted is lost
                self.emitter.sink.put(self.emitter.rest(last_t, self.pipeline.intervals()))
                self.emitter.status(st.state, st.fps)
            except Exception as exc:  # the sink failing still lets the worker restart it
                log.error(
                    "camera %s: its last counts and status were not written: %s",
                    cam.id,
                    _traceback(exc),  # masked, as the camera's own failure is logged
                )
            self.finished.set()
            if self._on_done:
                self._on_done(cam.id)


class VisionWorker:
    """Runs the cameras this worker is given (by the leaser, or all of them).

    ``snapshots_root``: where the alerts' snapshots go (``<root>/<camera>/``), None for none;
    ``retention_s``: a governance source's retention in seconds, raising KeyError for a
    source that is not declared (default: 30 days for any); ``clock``: the monotonic clock of
    the restart back-off (how long a camera ran, when it starts again)."""

    def __init__(
        self,
        settings: VisionSettings,
        sink: Sink,
        *,
        snapshots_root: Path | None = None,
        retention_s: Callable[[str], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self.sink = sink
        self.cameras = {c.id: c for c in settings.cameras}
        self.runners: dict[str, CameraRunner] = {}
        self._detectors: dict[str, ObjectDetector] = {}
        self._lock = threading.Lock()
        self._snapshots_root = snapshots_root
        self._retention = retention_s or (lambda _source: 30 * 86400.0)
        self.done: set[str] = set()
        self._restart_s: dict[str, float] = {}  # a failed camera's next back-off
        self._retries: dict[str, _Retry] = {}  # held cameras waiting to start again

    def _detector(self, cam: CameraSettings) -> ObjectDetector:
        """One detector per distinct configuration, shared by the cameras that use it."""
        import orjson

        key = cam.detector + orjson.dumps(cam.detector_config, option=orjson.OPT_SORT_KEYS).decode()
        det = self._detectors.get(key)
        if det is None:
            det = self._detectors[key] = make_detector(
                cam.detector, cam.detector_config, self.settings.models_dir, cam.id
            )
        return det

    def check_camera(self, camera_id: str) -> None:
        """Build the camera's pipeline once and check its source exists: a wrong setting or a
        missing model is reported at start-up, with the camera named, not on a thread."""
        cam = self.cameras[camera_id]
        if not is_stream(cam.url) and not Path(cam.url).is_file():
            raise SourceError(f"camera {cam.id}: video file {redact_url(cam.url)!r} not found")
        CameraPipeline(cam, self.settings.models_dir, detector=self._detector(cam))

    def start_camera(self, camera_id: str) -> None:
        """Start a camera this worker now holds (the leaser's ``on_start``).

        A camera that cannot be started (its models folder or video file briefly unavailable,
        an unwritable snapshot folder) is tried again with the same back-off as a camera that
        failed while running, its status saying why meanwhile: left dead under a lease this
        worker keeps renewing, no other worker would ever take it over."""
        with self._lock:
            if camera_id in self.runners or camera_id in self.done or camera_id in self._retries:
                return
            self._start(camera_id)

    def _start(self, camera_id: str) -> None:
        """Build and start the camera's runner, or schedule the next try (under the lock)."""
        cam = self.cameras[camera_id]
        try:
            snaps = None
            if self._snapshots_root is not None:
                if cam.snapshots.enabled:
                    self._record_source(self._snapshots_root / cam.id, cam.source)
                snaps = SnapshotStore(
                    self._snapshots_root,
                    self._retention(cam.source),
                    cam.snapshots.width,
                    cam.snapshots.quality,
                    base=self._snapshots_root.parent.parent,
                )
            runner = CameraRunner(
                cam,
                self.sink,
                models_dir=self.settings.models_dir,
                detector=self._detector(cam),
                snapshots=snaps,
                on_done=self._finished,
                clock=self._clock,
            )
        except Exception as exc:
            self._retry_later(camera_id, redact(_oneline(exc)), "could not start")
            return
        self.runners[camera_id] = runner
        log.info("camera %s: started", camera_id)
        runner.start()

    def _retry_later(self, camera_id: str, error: str, what: str) -> None:
        """Start the camera again after its next back-off (under the lock)."""
        delay = self._restart_s.get(camera_id, RESTART_S)
        self._restart_s[camera_id] = min(delay * 2, RESTART_MAX_S)
        log.warning("camera %s %s (%s): starting it again in %.0f s", camera_id, what, error, delay)
        timer = threading.Timer(delay, self._restart, args=(camera_id,))
        timer.daemon = True
        self._retries[camera_id] = _Retry(error, self._clock() + delay, timer)
        timer.start()

    def stop_camera(self, camera_id: str) -> None:
        with self._lock:
            runner = self.runners.pop(camera_id, None)
            retry = self._retries.pop(camera_id, None)
        if retry is not None:
            retry.timer.cancel()
        if runner is not None:
            runner.stop()
            log.info("camera %s: stopped", camera_id)

    def _finished(self, camera_id: str) -> None:
        with self._lock:
            runner = self.runners.get(camera_id)
            if runner is None or runner.stop_event.is_set() or not runner.finished.is_set():
                return  # stopped, or a stopped runner finishing late beside its successor
            cam = self.cameras[camera_id]
            if runner.status.state == "error" and (is_stream(cam.url) or cam.loop):
                # a camera that never ends failed (a decoder or runtime error, a full disk): it
                # is started again with back-off. Marked done, as a file that ended, it stood
                # still for good while this worker kept renewing its lease, so no other worker
                # took it.
                since = runner.status.running_since
                if since is not None and self._clock() - since >= RESTART_MAX_S:
                    # it ran well for a long while: this failure starts a new series, and the
                    # camera is back after the first back-off, not the longest one
                    self._restart_s.pop(camera_id, None)
                self._retry_later(camera_id, runner.status.error, "failed")
                return
            self.done.add(camera_id)  # a file that ended is not restarted by a renewed lease

    def _restart(self, camera_id: str) -> None:
        with self._lock:
            retry = self._retries.get(camera_id)
            if retry is None or retry.timer is not threading.current_thread():
                return  # stopped meanwhile (its lease went, or the worker stops)
            del self._retries[camera_id]
            self.runners.pop(camera_id, None)  # the failed runner, if it ran at all
            self._start(camera_id)

    def all_done(self) -> bool:
        return bool(self.cameras) and self.done >= set(self.cameras)

    def stop(self) -> None:
        for cid in list(self.runners) + list(self._retries):
            self.stop_camera(cid)

    def purge_snapshots(self, now: float | None = None) -> int:
        """Delete the snapshots past their retention in every camera folder under the
        snapshots root, the cameras' that are no longer configured included, and the
        temporary files a crash left behind; how many files.

        A configured camera's folder has its source's retention. The folder of a camera no
        longer configured keeps the retention of the source recorded in it
        (:data:`SOURCE_FILE`) while that source is still declared; otherwise it gets the
        shortest retention of the camera sources this worker knows: a snapshot whose own
        retention is unknown is kept no longer than any camera's (privacy first). Only
        ``*.jpg`` and stale ``*.tmp`` files directly in a camera folder are deleted; anything
        else under the root (files beside the folders, folders that no camera id can name,
        subfolders, symbolic links) is left alone."""
        root = self._snapshots_root
        if root is None or not root.is_dir():
            return 0
        now = time.time() if now is None else now
        # the shortest retention of any source a camera uses, or the default one
        sources = {c.source for c in self.cameras.values()}
        sources.add(str(CameraSettings.model_fields["source"].default))
        known = [r for r in (self._retention_of(s) for s in sources) if r is not None]
        shortest = min(known, default=None)
        gone = 0
        for folder in sorted(root.iterdir()):
            if folder.is_symlink() or not folder.is_dir() or not _CAMERA_ID.fullmatch(folder.name):
                continue
            cam = self.cameras.get(folder.name)
            if cam is not None:
                self._record_source(folder, cam.source)
                retention = self._retention_of(cam.source)
            else:
                recorded = self._recorded_source(folder)
                retention = self._retention_of(recorded) if recorded else None
            retention = shortest if retention is None else retention
            if retention is None:
                log.warning("snapshots %s: no retention is known, nothing purged", folder)
            gone += _purge_folder(folder, now, retention)
        return gone

    def _retention_of(self, source: str) -> float | None:
        """The retention of a governance source in seconds; None when it is not declared."""
        try:
            return self._retention(source)
        except KeyError:
            return None

    @staticmethod
    def _record_source(folder: Path, source: str) -> None:
        path = folder / SOURCE_FILE
        try:
            if path.is_file() and path.read_text("utf-8").strip() == source:
                return
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(source + "\n", "utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            # not fatal: the purge then falls back to the shortest camera retention
            log.warning("snapshots %s: cannot record the source: %s", folder, exc)

    @staticmethod
    def _recorded_source(folder: Path) -> str | None:
        try:
            return (folder / SOURCE_FILE).read_text("utf-8").strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def status_rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        now = self._clock()
        for cid, cam in self.cameras.items():
            r = self.runners.get(cid)
            retry = self._retries.get(cid)
            if r is None and retry is None:
                rows.append({"camera": cid, "state": "done" if cid in self.done else "elsewhere"})
                continue
            # a camera that could not start has no runner: its row says so, with zero counts
            st = r.status if r is not None else CameraStatus(cid, state="error")
            row: dict[str, Any] = {
                "camera": cid,
                "name": cam.name,
                "state": st.state,
                "frames": st.frames,
                "position": st.position,
                "total": st.total_frames,
                "fps": st.fps,
                "detected": st.detected,
                "crossings": st.crossings,
                "alerts": st.alerts,
                "ms": r.clock.ms_per_frame(st.frames) if r is not None else {},
                "error": st.error,
            }
            if retry is not None:
                row["state"] = "error"
                row["error"] = f"{retry.error}, retrying in {max(0.0, retry.at - now):.0f} s"
            rows.append(row)
        return rows


def _oneline(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _traceback(exc: BaseException) -> str:
    """``exc``'s traceback as the log shows it, every URL in it masked."""
    return redact("".join(traceback.format_exception(exc)).rstrip())


def _purge_folder(folder: Path, now: float, retention_s: float | None) -> int:
    """Delete the snapshots in ``folder`` older than ``retention_s`` (None: none of them)
    and its stale temporary files; how many."""
    gone = 0
    for path in folder.iterdir():
        if path.suffix == ".jpg" and retention_s is not None:
            limit = retention_s
        elif path.suffix == ".tmp":
            limit = STALE_TMP_S
        else:
            continue
        try:
            if path.is_symlink() or not path.is_file() or now - path.stat().st_mtime <= limit:
                continue
            path.unlink()
            gone += 1
        except FileNotFoundError:  # another worker's purge, or the rename, was first
            continue
    return gone
