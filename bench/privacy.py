"""The privacy attack at full length: every shared clip through `vision analyze`, then the
attacker on what it wrote.

    .venv/bin/python bench/privacy.py [--ocr-every 5] [--videos a.mp4,b.gif]

For each clip in ../shared/data/vision/videos, ``analyze_video`` writes the anonymized,
annotated video (every frame anonymized); the attacker of tests/vision/attack.py (YuNet and
CenterFace at low thresholds, RapidOCR with a plate-like filter) then looks at every frame of
that output for faces, and at every ``--ocr-every``-th frame for plate-like text (OCR costs
~0.7 s a frame here). The same attack on the raw frames shows what there was to find. Prints a
table and writes bench/results/privacy.json. (CI runs the same attack on a subsample:
tests/vision/test_privacy.py and tests/vision/test_run.py.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.vision.attack import find_faces, read_plates  # noqa: E402

from cityward.shared import shared_data  # noqa: E402
from cityward.vision.analyze import analyze_video  # noqa: E402

console = Console()
VISION = shared_data("vision")


def frames_of(path: Path) -> list[np.ndarray[Any, Any]]:
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        out.append(np.asarray(img, np.uint8))
    cap.release()
    return out


def attack(frames: list[np.ndarray[Any, Any]], ocr_every: int) -> dict[str, Any]:
    faces = [len(find_faces(f)) for f in frames]
    plates: list[str] = []
    for i in range(0, len(frames), ocr_every):
        plates.extend(read_plates(frames[i]))
    return {
        "frames": len(frames),
        "faces": sum(faces),
        "face_frames": sum(1 for n in faces if n),
        "ocr_frames": len(range(0, len(frames), ocr_every)),
        "plates": plates,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ocr-every", type=int, default=5)
    ap.add_argument("--videos", default="")
    args = ap.parse_args()
    names = (
        args.videos.split(",")
        if args.videos
        else sorted(p.name for p in (VISION / "videos").iterdir())
    )
    table = Table(title="privacy attack: raw frames vs the anonymized output of vision analyze")
    for col in (
        "clip",
        "frames",
        "faces raw",
        "faces anonymized",
        "OCR frames",
        "plates raw",
        "plates anonymized",
    ):
        table.add_column(col)
    results: dict[str, Any] = {"ocr_every": args.ocr_every, "clips": {}}
    t0 = time.perf_counter()
    for name in names:
        video = VISION / "videos" / name
        with tempfile.TemporaryDirectory() as tmp:
            analyze_video(video, output=Path(tmp), models_dir=VISION / "models")
            anon = frames_of(Path(tmp) / "anonymized.mp4")
        raw = frames_of(video)
        r, a = attack(raw, args.ocr_every), attack(anon, args.ocr_every)
        results["clips"][name] = {"raw": r, "anonymized": a}
        table.add_row(
            name,
            str(a["frames"]),
            f"{r['faces']} in {r['face_frames']} frames",
            f"{a['faces']} in {a['face_frames']} frames",
            str(a["ocr_frames"]),
            str(len(r["plates"])),
            str(len(a["plates"])),
        )
        console.print(f"{name}: done ({time.perf_counter() - t0:.0f} s)")
    console.print(table)
    out = ROOT / "bench" / "results" / "privacy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
