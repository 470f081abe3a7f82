"""Camera analytics throughput, counting fidelity and event latency, per video.

    .venv/bin/python bench/vision.py [--videos street_cars_ahmetozlu.mp4,...] [--runs 3]
        [--threads 0,1,2] [--frames 300]

Per video (read from ../shared/data/vision/videos; models from ../shared/data/vision/models):

- **bare detector**: YOLOX-nano ``session.run`` alone on frames decoded beforehand
  (frames/s = 1000 / median ms), and with its pre/post-processing;
- **pipeline, streaming**: decode, motion gate (off), detection, tracking, anonymization of
  *every* frame (as for a stream or a recording), analytics with a counting line, drawing
  none; frames/s over the whole clip, and ms per stage (means over the analysed frames);
- **pipeline, static scene**: the same with motion gating on a still scene (the clip's first
  frame repeated, with sensor noise): frames/s, and the ratio to the streaming figure;
- **cameras per machine**: the counting pipeline as ``vision run`` runs it (5 analysed
  frames/s of a 24 fps camera, motion gating on, anonymization only for snapshots): analysed
  frames/s over the clip / 5;
- **fidelity**: counts on the line of the fast pipeline (motion gating, ``--fast-fps``
  analysed frames/s) against the full-rate, full-resolution reference (every frame, no
  gating), per class and direction;
- **event latency**: frame read to Alert committed in an embedded bank (SQLite), p50/p95, with
  a no-stopping zone over the parked cars of the street clip, played in real
  time.

Each throughput figure is the median of ``--runs`` runs. ``--threads`` sets ONNX Runtime's
intra-op threads (0: its default, one per core). Writes bench/results/vision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cityward.shared import shared_data  # noqa: E402
from cityward.vision.analyze import analyze_video, line_rule  # noqa: E402
from cityward.vision.detectors import REGISTRY as DETECTORS  # noqa: E402
from cityward.vision.detectors import ObjectDetector  # noqa: E402
from cityward.vision.pipeline import CameraPipeline, StageClock  # noqa: E402
from cityward.vision.settings import CameraSettings, MotionSettings  # noqa: E402
from cityward.vision.source import Frame, VideoSource  # noqa: E402

RESULTS = ROOT / "bench" / "results"
console = Console()
VISION = shared_data("vision")
MODELS = VISION / "models"

#: a counting line per clip (image pixels), across where the traffic passes
LINES: dict[str, tuple[float, float, float, float]] = {
    "street_cars_ahmetozlu.mp4": (150.0, 200.0, 620.0, 235.0),
    "car-detection.mp4": (0.0, 216.0, 768.0, 216.0),
    "one-by-one-person-detection.mp4": (384.0, 0.0, 384.0, 432.0),
}


def _detector(threads: int) -> ObjectDetector:
    cls = DETECTORS["yolox"]
    return cls(cls.Config(threads=threads), MODELS)


def _frames(video: Path, limit: int) -> list[np.ndarray[Any, Any]]:
    out = []
    for f in VideoSource(str(video)):
        out.append(f.image)
        if len(out) >= limit:
            break
    return out


def bare(det: ObjectDetector, frames: list[np.ndarray[Any, Any]]) -> dict[str, float]:
    """Median ms of session.run alone and of detect() (pre + run + post)."""
    tensors = [det.preprocess(f) for f in frames]
    for tensor, _meta in tensors[:5]:
        det.infer(tensor)
    run_ms = []
    for tensor, _meta in tensors:
        t0 = time.perf_counter()
        det.infer(tensor)
        run_ms.append(1000 * (time.perf_counter() - t0))
    full_ms = []
    for f in frames:
        t0 = time.perf_counter()
        det.detect(f)
        full_ms.append(1000 * (time.perf_counter() - t0))
    return {
        "infer_ms": statistics.median(run_ms),
        "infer_fps": 1000 / statistics.median(run_ms),
        "detect_ms": statistics.median(full_ms),
        "detect_fps": 1000 / statistics.median(full_ms),
    }


def pipeline_run(
    video: Path,
    det: ObjectDetector,
    *,
    fps: float | None,
    motion: bool,
    anonymize_all: bool,
    frames: list[np.ndarray[Any, Any]] | None = None,
    source_fps: float = 24.0,
    max_frames: int = 0,
) -> tuple[float, StageClock, int]:
    """Analysed frames/s over the clip (decode included), the stage clock and the frames."""
    line = LINES.get(video.name, (0.0, 0.0, 1.0, 1.0))
    cam = CameraSettings(
        id="bench",
        url=str(video),
        analysis_fps=fps or 120.0,
        realtime=False,
        rules=[line_rule("line1", line)],
        motion=MotionSettings(enabled=motion),
    )
    pipe = CameraPipeline(cam, MODELS, detector=det, anonymize_all=anonymize_all)
    n = 0
    t0 = time.perf_counter()
    if frames is not None:  # a constructed clip, already decoded
        step = 1.0 / source_fps
        for i, img in enumerate(frames):
            pipe.process(Frame(i, i * step, img.copy()))
            n += 1
    else:
        t_read = time.perf_counter()
        for frame in VideoSource(str(video), analysis_fps=fps):
            pipe.clock.add("decode", time.perf_counter() - t_read)
            pipe.process(frame)
            n += 1
            if max_frames and n >= max_frames:
                break
            t_read = time.perf_counter()
    seconds = time.perf_counter() - t0
    return n / seconds, pipe.clock, n


def static_clip(video: Path, n: int, seed: int = 0) -> list[np.ndarray[Any, Any]]:
    first = next(iter(VideoSource(str(video)))).image
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        noise = rng.normal(0, 2.0, first.shape)
        out.append(np.clip(first.astype(np.float32) + noise, 0, 255).astype(np.uint8))
    return out


def fidelity(video: Path, det: ObjectDetector, fast_fps: float) -> dict[str, Any]:
    line = LINES[video.name]
    ref = analyze_video(video, [line], shared_detector=det, models_dir=MODELS)
    fast = analyze_video(
        video, [line], shared_detector=det, models_dir=MODELS, analysis_fps=fast_fps, motion=True
    )

    def flat(counts: dict[str, Any]) -> dict[str, int]:
        return {
            f"{d}/{c}": n
            for dirs in counts.values()
            for d, cs in dirs.items()
            for c, n in cs.items()
        }

    r, f = flat(ref.counts()), flat(fast.counts())
    total_r, total_f = sum(r.values()), sum(f.values())
    return {
        "reference": r,
        "fast": f,
        "reference_total": total_r,
        "fast_total": total_f,
        "error_pct": 100.0 * abs(total_f - total_r) / max(total_r, 1),
        "abs_class_error_pct": 100.0
        * sum(abs(f.get(k, 0) - r.get(k, 0)) for k in set(r) | set(f))
        / max(total_r, 1),
    }


def latency(det: ObjectDetector, passes: int = 2) -> dict[str, Any]:
    """Frame read to Alert committed, with the worker's own pipeline, emitter and bank sink:
    the street clip played in real time (a live camera), analysed at 5 frames/s, with a
    no-stopping zone over the cars parked on the right (each pass a new camera run)."""
    from cityward.bank.history import History
    from cityward.bank.service import Bank
    from cityward.bank.store import open_store
    from cityward.vision.emitter import BankSink, CameraEmitter, SnapshotStore

    video = VISION / "videos" / "street_cars_ahmetozlu.mp4"
    lat: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(None, Path(tmp))
        bank = Bank(store)
        History(store, bank)
        read_at: dict[str, float] = {}

        def written(batch: Any, at: float) -> None:
            for doc in batch:
                if doc["id"] in read_at:
                    lat.append(at - read_at.pop(doc["id"]))

        sink = BankSink(bank, on_written=written)
        for p in range(passes):
            cam = CameraSettings(
                id=f"street-{p}",
                url=str(video),
                analysis_fps=5,
                realtime=True,
                rules=[
                    {
                        "type": "stopped",
                        "name": "no-parking",
                        "polygon": [[290, 100], [640, 100], [640, 200], [290, 200]],
                        "min_stopped_s": 2.0,
                    }
                ],
            )
            pipe = CameraPipeline(cam, MODELS, detector=det)
            emitter = CameraEmitter(cam, sink, snapshots=SnapshotStore(Path(tmp) / "s", 3600))
            for frame in VideoSource(str(video), analysis_fps=5, realtime=True):
                t_read = time.time()
                res = pipe.process(frame)
                if res.events:
                    docs = [emitter.alert(e, res.anonymized) for e in res.events]
                    for d in docs:
                        read_at[d["id"]] = t_read
                    sink.put(docs, urgent=True)
        sink.close()
        store.close()
    if not lat:
        return {"alerts": 0}
    lat.sort()
    return {
        "alerts": len(lat),
        "p50_s": statistics.median(lat),
        "p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
        "max_s": lat[-1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--videos", default=",".join(LINES))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", default="0")
    ap.add_argument("--frames", type=int, default=200, help="frames for the bare detector")
    ap.add_argument("--fast-fps", type=float, default=8.0)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    results: dict[str, Any] = {"cpu_count": os.cpu_count(), "videos": {}}
    table = Table(title="vision pipeline (frames/s; medians of runs)")
    for col in (
        "video",
        "threads",
        "bare infer",
        "count",
        "count/bare",
        "stream",
        "stream/bare",
        "static stream",
        "static/stream",
        "cameras@5fps",
    ):
        table.add_column(col)
    stage_table = Table(title="ms per analysed frame, per stage (streaming pipeline)")
    stage_table.add_column("video")
    for s in ("decode", "motion", "detect", "track", "anonymize", "analytics"):
        stage_table.add_column(s)
    for name in args.videos.split(","):
        video = VISION / "videos" / name
        for threads in (int(x) for x in args.threads.split(",")):
            det = _detector(threads)
            frames = _frames(video, args.frames)
            still = static_clip(video, 240)
            runs: list[dict[str, Any]] = []
            clocks: list[tuple[StageClock, int]] = []
            # each run measures everything once, back to back, so that a slower or faster
            # moment of this shared machine weighs on the bare detector and the pipelines alike
            for _ in range(args.runs):
                b = bare(det, frames)
                stream_fps, clock, n = pipeline_run(
                    video,
                    det,
                    fps=None,
                    motion=False,
                    anonymize_all=True,
                    max_frames=args.frames * 2,
                )
                clocks.append((clock, n))
                count_fps, _, _ = pipeline_run(
                    video,
                    det,
                    fps=None,
                    motion=False,
                    anonymize_all=False,
                    max_frames=args.frames * 2,
                )
                static_fps, _, _ = pipeline_run(
                    video, det, fps=None, motion=True, anonymize_all=True, frames=still
                )
                counting_fps, _, _ = pipeline_run(
                    video, det, fps=5.0, motion=True, anonymize_all=False
                )
                runs.append(
                    {
                        **b,
                        "stream_fps": stream_fps,
                        "count_fps": count_fps,
                        "static_fps": static_fps,
                        "counting_5fps_fps": counting_fps,
                        "stream_ratio": stream_fps / b["infer_fps"],
                        "count_ratio": count_fps / b["infer_fps"],
                        "static_ratio": static_fps / stream_fps,
                    }
                )

            def med(key: str, runs: list[dict[str, Any]] = runs) -> float:
                return statistics.median(float(r[key]) for r in runs)

            clock, n_frames = clocks[len(clocks) // 2]
            row: dict[str, Any] = {
                "threads": threads,
                "runs": runs,
                "bare_infer_fps": med("infer_fps"),
                "bare_detect_fps": med("detect_fps"),
                "bare_infer_ms": med("infer_ms"),
                "stream_fps": med("stream_fps"),
                "stream_ratio": med("stream_ratio"),
                "count_fps": med("count_fps"),
                "count_ratio": med("count_ratio"),
                "static_fps": med("static_fps"),
                "static_ratio": med("static_ratio"),
                "counting_5fps_fps": med("counting_5fps_fps"),
                # a 24 fps camera analysed at 5 fps (grabbing the frames in between included)
                "cameras_at_5fps": med("counting_5fps_fps") / 5.0,
                "stage_ms": clock.ms_per_frame(n_frames),
            }
            results["videos"].setdefault(name, []).append(row)
            table.add_row(
                name,
                str(threads),
                f"{row['bare_infer_fps']:.1f}",
                f"{row['count_fps']:.1f}",
                f"{row['count_ratio']:.2f}",
                f"{row['stream_fps']:.1f}",
                f"{row['stream_ratio']:.2f}",
                f"{row['static_fps']:.1f}",
                f"{row['static_ratio']:.2f}",
                f"{row['cameras_at_5fps']:.1f}",
            )
            ms = row["stage_ms"]
            stage_table.add_row(
                f"{name} ({threads})",
                *(
                    f"{ms.get(s, 0.0):.2f}"
                    for s in ("decode", "motion", "detect", "track", "anonymize", "analytics")
                ),
            )
        console.print(table)
    console.print(stage_table)
    det = _detector(0)
    fid_table = Table(
        title=f"counting fidelity: fast ({args.fast_fps} fps, motion gating) vs full-rate reference"
    )
    for col in ("video", "reference", "fast", "total error %", "per-class error %"):
        fid_table.add_column(col)
    results["fidelity"] = {}
    for name in args.videos.split(","):
        fid = fidelity(VISION / "videos" / name, det, args.fast_fps)
        results["fidelity"][name] = fid
        fid_table.add_row(
            name,
            str(fid["reference"]),
            str(fid["fast"]),
            f"{fid['error_pct']:.1f}",
            f"{fid['abs_class_error_pct']:.1f}",
        )
    console.print(fid_table)
    results["latency"] = latency(det)
    console.print(f"event latency (frame read -> Alert in the bank): {results['latency']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vision.json").write_text(json.dumps(results, indent=2))
    console.print(f"wrote {RESULTS / 'vision.json'}")


if __name__ == "__main__":
    main()
