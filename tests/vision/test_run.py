"""End to end: a video file through `cityward vision run` into the data bank, and `cityward
vision analyze` into events.json and an anonymized video; both checked by the privacy attacker
(tests/vision/attack.py) on everything they stored."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from cityward.api.app import create_app
from cityward.bank.store.sqlite import SqliteStore
from cityward.config import Settings
from cityward.vision.worker import SOURCE_FILE
from tests.conftest import shared_path
from tests.vision.attack import attack_frames

CLI = [sys.executable, "-m", "cityward.cli"]
#: across the street where the cars come towards the camera (street_cars_ahmetozlu.mp4)
STREET_LINE = [[150, 200], [620, 235]]
#: a snapshot left from a year ago (street_run)
STALE = "20251101T000000Z-old.jpg"
#: the cars parked on the right of the street all clip long
PARKED = [[290, 100], [430, 100], [430, 170], [290, 170]]


def _run(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("CITYWARD_MODELS_DIR", None)
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _config(tmp: Path, models: Path, video: Path, **camera: Any) -> Path:
    rules = camera.pop(
        "rules",
        [
            {"type": "line", "name": "northbound", "line": STREET_LINE},
            {"type": "stopped", "name": "no-parking", "polygon": PARKED, "min_stopped_s": 3},
        ],
    )
    cam = {
        "id": "street-1",
        "name": "Residential street",
        "url": str(video),
        "realtime": False,
        "analysis_fps": 5,
        "interval_s": 3600,
        "location": [3.7174, 51.0543],
        "rules": rules,
        **camera,
    }

    def toml(v: Any) -> str:
        if isinstance(v, str):
            return orjson.dumps(v).decode()
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(toml(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {toml(x)}" for k, x in v.items()) + "}"
        return str(v)

    lines = ["[vision]", f"models_dir = {toml(str(models))}", "", "[[vision.cameras]]"]
    lines += [f"{k} = {toml(v)}" for k, v in cam.items()]
    path = tmp / "city.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def street_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """One `vision run` of the street clip into a fresh embedded bank."""
    tmp = tmp_path_factory.mktemp("vision-run")
    models = shared_path("data", "vision", "models")
    video = shared_path("data", "vision", "videos", "street_cars_ahmetozlu.mp4")
    config = _config(tmp, models, video)
    # a snapshot from a year ago, past any retention: the run must purge it when it starts
    stale = tmp / "data" / "vision" / "snapshots" / "street-1" / STALE
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\xff\xd8 not really a picture")
    year_ago = time.time() - 366 * 86400
    os.utime(stale, (year_ago, year_ago))
    proc = _run(
        [
            "vision",
            "run",
            str(config),
            "--data-dir",
            str(tmp / "data"),
            "--exit-when-done",
            "--no-live",
        ],
        tmp,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield tmp / "data", proc.stdout


@pytest.fixture(scope="module")
def api(street_run: tuple[Path, str]) -> Iterator[TestClient]:
    data, _ = street_run
    store = SqliteStore(data / "cityward.db")
    settings = Settings(data_dir=data, no_auth=True, context_fetch=False)
    with TestClient(create_app(settings, store)) as client:
        yield client
    store.close()


def _entities(api: TestClient, etype: str) -> list[dict[str, Any]]:
    r = api.get("/ngsi-ld/v1/entities", params={"type": etype, "limit": 1000})
    assert r.status_code == 200, r.text
    out: list[dict[str, Any]] = r.json()
    return out


def test_run_writes_counts_camera_and_alert_into_the_bank(
    street_run: tuple[Path, str], api: TestClient
) -> None:
    cams = _entities(api, "Camera")
    assert [c["id"] for c in cams] == ["urn:ngsi-ld:Camera:street-1"]
    assert cams[0]["status"]["value"] == "finished"
    assert cams[0]["location"]["value"]["coordinates"] == [3.7174, 51.0543]
    flows = {f["id"]: f for f in _entities(api, "TrafficFlowObserved")}
    inbound = flows["urn:ngsi-ld:TrafficFlowObserved:camera:street-1:northbound:in"]
    # the clip: cars come down the street towards the camera; a handful in 38 s, none away
    assert 4 <= inbound["intensity"]["value"] <= 14
    assert inbound["vehicleCounts"]["value"].get("car", 0) >= 4
    outbound = flows["urn:ngsi-ld:TrafficFlowObserved:camera:street-1:northbound:out"]
    assert outbound["intensity"]["value"] <= 1
    assert inbound["refDevice"]["object"] == "urn:ngsi-ld:Camera:street-1"
    crowd = _entities(api, "CrowdFlowObserved")
    assert [c["id"] for c in crowd] == ["urn:ngsi-ld:CrowdFlowObserved:camera:street-1:northbound"]
    alerts = _entities(api, "Alert")
    stopped = [a for a in alerts if a["subCategory"]["value"] == "carStopped"]
    assert stopped, [a["description"]["value"] for a in alerts]
    alert = stopped[0]
    assert alert["category"]["value"] == "traffic"
    assert alert["alertSource"]["object"] == "urn:ngsi-ld:Camera:street-1"
    assert alert["data"]["value"]["rule"] == "no-parking"
    # counts and events only: no track id, box or trajectory reaches the bank
    text = orjson.dumps([*cams, *flows.values(), *crowd, *alerts]).decode()
    for word in ("tracker", "track_id", "trajectory", "xyxy", "box"):
        assert word not in text


def test_the_run_purges_snapshots_past_their_retention_when_it_starts(
    street_run: tuple[Path, str],
) -> None:
    """Not an hour after the machine booted: the purge was timed from time.monotonic()'s 0."""
    data, _ = street_run
    assert not (data / "vision" / "snapshots" / "street-1" / STALE).exists()


def test_alert_snapshots_are_small_anonymized_jpegs(
    street_run: tuple[Path, str], api: TestClient
) -> None:
    data, _ = street_run
    alerts = [a for a in _entities(api, "Alert") if "snapshot" in a]
    assert alerts
    images = []
    for a in alerts:
        path = data / a["snapshot"]["value"]
        assert path.suffix == ".jpg" and path.is_file()
        img = cv2.imread(str(path))
        assert img is not None and img.shape[1] <= 320
        images.append(np.asarray(img, np.uint8))
    stored = [p for p in (data / "vision" / "snapshots").rglob("*") if p.is_file()]
    # besides the snapshots, only each camera's record of its source (for the purge)
    markers = [p for p in stored if p.name == SOURCE_FILE]
    assert [(p.parent.name, p.read_text()) for p in markers] == [("street-1", "traffic-cameras\n")]
    assert set(stored) - set(markers) == {data / a["snapshot"]["value"] for a in alerts}
    report = attack_frames(images)
    assert report.faces == [] and report.plates == [], report.summary()


def test_snapshots_past_the_retention_are_deleted(tmp_path: Path) -> None:
    from cityward.vision.emitter import SnapshotStore

    store = SnapshotStore(tmp_path / "snapshots", retention_s=3600)
    img = np.full((200, 400, 3), 128, np.uint8)
    old = tmp_path / store.save("cam", "old", img)
    new = tmp_path / store.save("cam", "new", img)
    small = cv2.imread(str(new))
    assert small is not None and small.shape[1] == 320
    os.utime(old, (1_000_000, 1_000_000))
    assert store.purge() == 1
    assert not old.exists() and new.exists()


def test_the_purge_reaches_every_camera_folder(tmp_path: Path) -> None:
    """Snapshots of cameras no longer configured are purged too: with the retention of the
    source recorded in their folder while it is declared, else with the shortest camera
    retention; temporary files a crash left are deleted; nothing else under the root is."""
    from cityward.vision.emitter import SnapshotStore
    from cityward.vision.settings import VisionSettings
    from cityward.vision.worker import STALE_TMP_S, VisionWorker

    day = 86400.0
    now = 2_000_000_000.0
    root = tmp_path / "data" / "vision" / "snapshots"
    declared = {"traffic-cameras": 30 * day, "long-cams": 90 * day, "short-cams": 7 * day}

    class Sink:
        """Keeps what it is given (the purge gives it nothing)."""

        def __init__(self) -> None:
            self.entities: list[Any] = []

        def put(self, entities: Sequence[Any], *, urgent: bool = False) -> None:
            self.entities.extend(entities)

    sink = Sink()

    def worker(cameras: dict[str, str], retention: dict[str, float]) -> VisionWorker:
        settings = VisionSettings.model_validate(
            {"cameras": [{"id": c, "url": "x.mp4", "source": s} for c, s in cameras.items()]}
        )
        return VisionWorker(settings, sink, snapshots_root=root, retention_s=retention.__getitem__)

    store = SnapshotStore(root, 30 * day)
    img = np.full((120, 160, 3), 128, np.uint8)
    ages = {"10d": 10 * day, "40d": 40 * day, "100d": 100 * day}
    folders = ("kept", "gone-long", "gone-dropped", "never-recorded")
    saved = [root.parent / store.save(c, a, img) for c in folders for a in ages]
    # yesterday's configuration: the purge records each camera's source in its folder
    before = {"kept": "traffic-cameras", "gone-long": "long-cams", "gone-dropped": "dropped"}
    assert worker(before, {**declared, "dropped": 60 * day}).purge_snapshots() == 0
    for path in saved:
        os.utime(path, (now - ages[path.stem], now - ages[path.stem]))
    assert (root / "gone-long" / SOURCE_FILE).read_text() == "long-cams\n"
    assert not (root / "never-recorded" / SOURCE_FILE).exists()  # a folder of an older version
    # what must survive: not ours, or not a snapshot
    old = (now - 400 * day, now - 400 * day)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    keep = [root / "README.jpg", root / ".trash" / "a.jpg", root / "kept" / "sub" / "a.jpg"]
    keep += [root / "kept" / "notes.txt", outside / "a.jpg", root / "kept" / "fresh.tmp"]
    for path in keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, old)
    os.utime(root / "kept" / "fresh.tmp", (now - 10, now - 10))  # being written right now
    (root / "linked").symlink_to(outside)
    (root / "kept" / "link.jpg").symlink_to(outside / "a.jpg")
    crashed = root / "gone-long" / "crashed.tmp"
    crashed.write_bytes(b"x")
    os.utime(crashed, (now - STALE_TMP_S - 1, now - STALE_TMP_S - 1))

    # today: two cameras removed, "dropped" no longer declared, a 7-day camera source added
    today = worker({"kept": "traffic-cameras", "new": "short-cams"}, declared)
    assert today.purge_snapshots(now) == 2 + 1 + 3 + 3 + 1

    def left(cam: str) -> list[str]:
        return sorted(p.stem for p in (root / cam).glob("*.jpg") if not p.is_symlink())

    assert left("kept") == ["10d"]  # its source: 30 days
    assert left("gone-long") == ["10d", "40d"]  # the recorded source, still declared: 90 days
    assert left("gone-dropped") == []  # recorded source gone: the shortest, 7 days
    assert left("never-recorded") == []  # no record: the shortest
    assert not crashed.exists()
    assert all(p.exists() for p in keep)
    assert (root / "kept" / "link.jpg").is_symlink()
    assert today.purge_snapshots(now) == 0
    assert sink.entities == []


def test_analyze_writes_events_and_an_anonymized_video(tmp_path: Path) -> None:
    video = shared_path("data", "vision", "videos", "face-demographics-walking.gif")
    models = shared_path("data", "vision", "models")
    out = tmp_path / "out"
    proc = _run(
        [
            "vision",
            "analyze",
            str(video),
            "--line",
            "0,135,480,135",
            "--output",
            str(out),
            "--models-dir",
            str(models),
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = orjson.loads((out / "events.json").read_bytes())
    assert set(events) >= {"crossings", "counts", "alerts"}
    assert events["frames"]["analysed"] == 35
    cap = cv2.VideoCapture(str(out / "anonymized.mp4"))
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(np.asarray(img, np.uint8))
    assert len(frames) == 35 and frames[0].shape == (270, 480, 3)
    # people walking towards the camera, faces in every frame: none may be found in the output
    report = attack_frames(frames, plates=False)
    assert report.faces == [], report.summary()
    assert "anonymized.mp4" in proc.stdout


def test_an_interrupted_analysis_leaves_the_last_whole_output(tmp_path: Path) -> None:
    """Ctrl-C mid-clip left a truncated anonymized.mp4 beside the events.json of the run
    before, and nothing told them apart: the outputs now appear together, once a run ends."""
    from cityward.vision.analyze import analyze_video

    video = shared_path("data", "vision", "videos", "face-demographics-walking.gif")
    models = shared_path("data", "vision", "models")
    out = tmp_path / "out"
    out.mkdir()
    (out / "events.json").write_bytes(b'{"from": "the run before"}')
    (out / "anonymized.mp4").write_bytes(b"the run before")

    def interrupt(done: int, total: int) -> None:
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        analyze_video(
            video, [(0.0, 135.0, 480.0, 135.0)], output=out, models_dir=models, progress=interrupt
        )
    assert sorted(p.name for p in out.iterdir()) == ["anonymized.mp4", "events.json"]
    assert (out / "events.json").read_bytes() == b'{"from": "the run before"}'
    assert (out / "anonymized.mp4").read_bytes() == b"the run before"
    result = analyze_video(video, [(0.0, 135.0, 480.0, 135.0)], output=out, models_dir=models)
    assert sorted(p.name for p in out.iterdir()) == ["anonymized.mp4", "events.json"]
    assert orjson.loads((out / "events.json").read_bytes())["frames"]["analysed"] == result.frames
    assert cv2.VideoCapture(str(out / "anonymized.mp4")).get(cv2.CAP_PROP_FRAME_COUNT) == 35


def test_a_config_without_cameras_is_named_with_its_brackets(tmp_path: Path) -> None:
    """Rich read [[vision.cameras]] as markup: the message and the help said 'with []'."""
    config = tmp_path / "cameras[bold].toml"
    config.write_text("[vision]\n")
    proc = _run(["vision", "run", str(config), "--data-dir", str(tmp_path / "d")], tmp_path)
    assert proc.returncode != 0
    said = "".join((proc.stdout + proc.stderr).split())  # however the console wrapped it
    assert "cameras[bold].toml:no[[vision.cameras]]configured" in said
    help_text = "".join(_run(["vision", "run", "--help"], tmp_path).stdout.split())
    assert "TOMLconfigurationwith[[vision.cameras]]." in help_text


def test_missing_model_and_bad_rule_are_clear_errors(tmp_path: Path) -> None:
    video = shared_path("data", "vision", "videos", "people-detection.gif")
    empty = tmp_path / "no-models"
    empty.mkdir()
    config = _config(tmp_path, empty, video)
    proc = _run(["vision", "run", str(config), "--data-dir", str(tmp_path / "d")], tmp_path)
    assert proc.returncode == 2
    assert "yolox_nano_416x416.onnx" in proc.stdout and "models fetch" in proc.stdout
    models = shared_path("data", "vision", "models")
    config = _config(
        tmp_path, models, video, rules=[{"type": "line", "name": "l", "line": [[0, 0]]}]
    )
    proc = _run(["vision", "run", str(config), "--data-dir", str(tmp_path / "d")], tmp_path)
    assert proc.returncode == 2
    assert "camera street-1" in proc.stdout and "line" in proc.stdout


def test_a_weakened_anonymizer_stops_the_worker_at_start(tmp_path: Path) -> None:
    video = shared_path("data", "vision", "videos", "people-detection.gif")
    models = shared_path("data", "vision", "models")
    weak = {"plate_fraction": 0, "blocks": 64}
    config = _config(tmp_path, models, video, anonymizer=weak)
    proc = _run(["vision", "run", str(config), "--data-dir", str(tmp_path / "d")], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = " ".join(proc.stdout.split())  # the console wraps long lines
    assert "camera street-1: anonymizer: plate_fraction: " in out, out
    assert "blocks: Input should be less than or equal to 4" in out, out
    # a face detector that does not exist: it was a traceback, without the camera named
    config = _config(tmp_path, models, video, anonymizer={"face_detector": "yunet-n"})
    proc = _run(["vision", "run", str(config), "--data-dir", str(tmp_path / "d")], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = " ".join(proc.stdout.split())
    assert "camera street-1: anonymizer: unknown face detector 'yunet-n'" in out, out
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("fps", ["-1", "500"])
def test_analyze_refuses_a_frame_rate_out_of_range_as_a_usage_error(
    tmp_path: Path, fps: str
) -> None:
    video = shared_path("data", "vision", "videos", "people-detection.gif")
    proc = _run(
        ["vision", "analyze", str(video), "--fps", fps, "--output", str(tmp_path)], tmp_path
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Invalid value for '--fps'" in proc.stderr and "Traceback" not in proc.stderr


def test_two_workers_share_cameras_and_take_over_a_killed_ones(tmp_path: Path) -> None:
    """Two `vision run` processes on one bank: the cameras are split between them; SIGKILL
    one and the other holds every camera within the lease time plus a renewal round, told
    by the leases' own records: the killed one's leases end at most the lease time (3 s)
    after the kill, and the other takes the cameras in its first rounds after that."""
    import signal
    import time

    from cityward.vision.leases import PRESENCE_PREFIX, BankLeaseStore

    models = shared_path("data", "vision", "models")
    video = shared_path("data", "vision", "videos", "people-detection.gif")
    cams = "\n".join(
        f'[[vision.cameras]]\nid = "cam-{i}"\nurl = "{video}"\nloop = true\nanalysis_fps = 1\n'
        for i in range(4)
    )
    config = tmp_path / "city.toml"
    config.write_text(
        f'[vision]\nmodels_dir = "{models}"\n\n[vision.leases]\nttl_s = 3\nrenew_every_s = 1\n\n'
        + cams
    )
    data = tmp_path / "data"
    env = {**os.environ}
    env.pop("CITYWARD_MODELS_DIR", None)

    def worker(name: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                *CLI,
                "vision",
                "run",
                str(config),
                "--data-dir",
                str(data),
                "--worker-id",
                name,
                "--no-live",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    store: SqliteStore | None = None
    first = worker("w1")
    second: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 60
        while not (data / "cityward.db").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        store = SqliteStore(data / "cityward.db")
        leases = BankLeaseStore(store)

        def held() -> dict[str, str]:
            return {c: w for c, (w, _) in leases.holders().items() if c.startswith("cam-")}

        while len(held()) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert set(held().values()) == {"w1"}, held()
        second = worker("w2")
        while sorted(held().values()).count("w2") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        split = sorted(held().values())
        assert split == ["w1", "w1", "w2", "w2"], split
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed = time.time()  # after w1's last write, on the leases' clock (this machine's)
        left = [end for w, end in leases.holders().values() if w == "w1"]
        assert left, "w1 held no lease at its death"
        end = max(left)  # when the last of w1's leases (cameras and presence) runs out
        assert end <= killed + 3, f"w1's leases ran {end - killed:.2f} s past the kill"
        # each round of w2 renews its presence lease: its recorded end less 3 s is the round's
        # time. Counted: w2's rounds that began once w1's leases had ended, until all is w2's
        rounds: set[float] = set()
        give_up = time.monotonic() + 60  # liveness only
        while True:
            now = leases.holders()
            rounds |= {e - 3 for c, (w, e) in now.items() if c == PRESENCE_PREFIX + "w2"}
            owners = [w for c, (w, _) in now.items() if c.startswith("cam-")]
            if owners == ["w2"] * 4:
                break
            assert time.monotonic() < give_up, f"w2 never took w1's cameras over: {held()}"
            time.sleep(0.05)
        after = sorted(t - end for t in rounds if t >= end)
        # the round that took them, and the next one should this poll have come late
        assert len(after) <= 2, f"w2 took them over in its round {len(after)} after: {after}"
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
        if store is not None:
            store.close()
