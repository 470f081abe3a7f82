"""``cityward vision analyze``: one video file in, counts, events and an anonymized video out.

For a person to check what a camera configuration does before it goes live: every analysed
frame is anonymized (faces and plates blurred), then boxes, track numbers, the counting lines
and the running counts are drawn on it and it is written to ``anonymized.mp4``. Only that
anonymized video and ``events.json`` are written: the raw frames are dropped here as in the
worker.
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import orjson

from cityward.vision.analytics import Crossing, VisionEvent
from cityward.vision.detectors import ObjectDetector
from cityward.vision.pipeline import CameraPipeline, StageClock, draw
from cityward.vision.settings import CameraSettings, MotionSettings
from cityward.vision.source import VideoSource

Line = tuple[float, float, float, float]


def parse_line(text: str) -> Line:
    """``X1,Y1,X2,Y2`` in image pixels."""
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4:
        raise ValueError(f"line {text!r}: give four numbers X1,Y1,X2,Y2 (image pixels)")
    return (values[0], values[1], values[2], values[3])


def line_rule(name: str, line: Line) -> dict[str, Any]:
    """The settings of a counting-line rule for a line given as X1,Y1,X2,Y2."""
    x1, y1, x2, y2 = line
    return {"type": "line", "name": name, "line": [[x1, y1], [x2, y2]]}


@dataclass
class AnalyzeResult:
    crossings: list[Crossing] = field(default_factory=list)
    events: list[VisionEvent] = field(default_factory=list)
    frames: int = 0
    detected: int = 0
    video_frames: int = 0
    seconds: float = 0.0
    clock: StageClock = field(default_factory=StageClock)
    output_video: Path | None = None

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """{line: {direction: {class: n}}}"""
        out: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
        for c in self.crossings:
            out[c.line][c.direction][c.class_name] += 1
        return {ln: {d: dict(cs) for d, cs in ds.items()} for ln, ds in out.items()}

    def document(self) -> dict[str, Any]:
        return {
            "crossings": [
                {
                    "frame": c.frame,
                    "time_s": round(c.time_s, 3),
                    "class": c.class_name,
                    "line": c.line,
                    "direction": c.direction,
                }
                for c in self.crossings
            ],
            "counts": self.counts(),
            "alerts": [
                {
                    "frame": e.frame,
                    "time_s": round(e.time_s, 3),
                    "kind": e.kind,
                    "rule": e.rule,
                    "class": e.class_name,
                    "category": e.category,
                    "subCategory": e.sub_category,
                    "severity": e.severity,
                    "description": e.description,
                }
                for e in self.events
            ],
            "frames": {"analysed": self.frames, "detected": self.detected},
        }


def analyze_video(
    video: Path,
    lines: Sequence[Line] = (),
    *,
    output: Path | None = None,
    rules: Sequence[dict[str, Any]] = (),
    detector: str = "yolox",
    detector_config: dict[str, Any] | None = None,
    models_dir: Path | str | None = None,
    analysis_fps: float | None = None,
    motion: bool = False,
    write_video: bool = True,
    shared_detector: ObjectDetector | None = None,
    homography: list[list[float]] | None = None,
    anonymize: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> AnalyzeResult:
    """Analyse ``video``: count crossings of ``lines`` (named line1, line2, ...) plus any
    ``rules``. ``analysis_fps``: analyse at most this many frames per second (None: every
    frame). ``motion``: skip detection on still frames. With ``output``, writes
    ``events.json`` and (``write_video``) ``anonymized.mp4`` there."""
    all_rules = [line_rule(f"line{i}", ln) for i, ln in enumerate(lines, 1)] + list(rules)
    camera = CameraSettings(
        id="analyze",
        url=str(video),
        analysis_fps=analysis_fps or 120.0,
        realtime=False,
        detector=detector,
        detector_config=detector_config or {},
        rules=all_rules,
        homography=homography,
        motion=MotionSettings(enabled=motion),
    )
    source = VideoSource(str(video), analysis_fps=analysis_fps)
    pipe = CameraPipeline(
        camera,
        models_dir,
        detector=shared_detector,
        anonymize_all=anonymize and output is not None and write_video,
    )
    result = AnalyzeResult(clock=pipe.clock, video_frames=source.frame_count)
    writer: cv2.VideoWriter | None = None
    drawn_lines = [(f"line{i}", ln) for i, ln in enumerate(lines, 1)]
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
    # the video is written under another name and put in place with events.json once the run
    # ends well: an interrupted run left a truncated anonymized.mp4 beside the events.json of
    # the run before, and nothing said the two did not belong together
    partial: Path | None = None
    if output is not None and write_video:
        result.output_video = output / "anonymized.mp4"
        partial = output / ".anonymized.partial.mp4"  # the suffix picks the container
        out_fps = analysis_fps if analysis_fps and analysis_fps < source.fps else source.fps
        w, h = source.size
        writer = cv2.VideoWriter(str(partial), cv2.VideoWriter.fourcc(*"mp4v"), out_fps, (w, h))
        if not writer.isOpened():
            raise RuntimeError(f"cannot write {result.output_video} (mp4v)")
    totals: Counter[str] = Counter()
    started = time.perf_counter()
    t_read = time.perf_counter()
    try:
        for frame in source:
            pipe.clock.add("decode", time.perf_counter() - t_read)
            res = pipe.process(frame)
            result.frames += 1
            result.detected += int(res.detected)
            result.crossings.extend(res.crossings)
            result.events.extend(res.events)
            for c in res.crossings:
                totals[c.class_name] += 1
            if writer is not None and res.anonymized is not None:
                with pipe.clock.timed("emit"):
                    caption = "  ".join(f"{k} {v}" for k, v in sorted(totals.items()))
                    writer.write(draw(res.anonymized, res.tracks, drawn_lines, caption))
            if progress is not None:
                progress(frame.index + 1, source.frame_count)
            t_read = time.perf_counter()
    except BaseException:
        if writer is not None:
            writer.release()
            writer = None
        if partial is not None:
            partial.unlink(missing_ok=True)
        raise
    finally:
        source.close()
        if writer is not None:
            writer.release()
    result.seconds = time.perf_counter() - started
    if output is not None:
        events = output / ".events.partial.json"
        events.write_bytes(orjson.dumps(result.document(), option=orjson.OPT_INDENT_2))
        if partial is not None and result.output_video is not None:
            os.replace(partial, result.output_video)
        os.replace(events, output / "events.json")
    return result
