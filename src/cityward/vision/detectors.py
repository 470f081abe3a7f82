"""COCO object detectors on ONNX Runtime: self-registering plugins with a typed configuration.

A detector turns one BGR ``uint8`` frame (H x W x 3, any size) into :class:`Detections` in that
frame's pixels: boxes clipped to the frame, a confidence, a COCO class id. The work is split in
three so a benchmark can time the network alone:

* :meth:`ObjectDetector.preprocess` - frame -> (input tensor, :class:`Meta`), the meta telling
  how the model's input pixels map back to the frame (resize / letterbox scale, frame size);
* :meth:`ObjectDetector.infer` - tensor -> the raw outputs of ``session.run``;
* :meth:`ObjectDetector.postprocess` - outputs -> detections: decoding, score threshold, class
  filter, mapping back to frame pixels, clipping, class-aware NMS.

:meth:`ObjectDetector.detect` is the three in a row. A detector keeps no per-frame state, so
one instance can serve several cameras and threads (an ONNX Runtime session may be run from
several threads at once).

Decoding is vectorised numpy. The anchor grid of a given input size (cell column, row and
stride of every output row) is computed once and cached; the score threshold is applied before
any box is decoded, so only the few candidate rows are decoded at all.

Every candidate row keeps its best class only (the argmax over the 80 scores, as the
reference demos of both models do); rows whose best class is not in ``classes`` are dropped,
and NMS is then run per class (a car never suppresses the person beside it).

**Privacy.** The anonymizer hides the heads of the persons and the plate band of the vehicles
this detector finds, so what a camera's settings narrow (``classes``, ``score_threshold``,
``nms_iou``, ``max_detections``) must narrow the analytics only: with ``classes = [0]`` or
``score_threshold = 0.9`` the anonymizer used to get no car, and every plate on a stored
snapshot was readable. :meth:`ObjectDetector.detect_split` returns both: the detections the
settings ask for, and the persons and vehicles at the privacy floor (:data:`PRIVACY_CLASSES`
from :data:`PRIVACY_SCORE_THRESHOLD`, NMS at :data:`PRIVACY_NMS_IOU` or looser, up to
:data:`PRIVACY_MAX_DETECTIONS`) whatever the settings. When the settings reach that floor
(:attr:`ObjectDetector.covers_privacy`, the defaults do) the second set is a class filter of the
first and costs nothing.

Two plugins: ``yolox`` (YOLOX-nano, 416x416, the default) and ``nanodet`` (NanoDet-m, 320x320).
``cityward vision detectors`` lists them with their settings; ``cityward models fetch`` gets
their files. :func:`make_session` is shared with the face detectors (``faces.py``).
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from cityward.plugins import register
from cityward.vision.detections import PERSON, VEHICLES, Detections, nms
from cityward.vision.models import resolve

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
#: a BGR uint8 H x W x 3 image (typed loosely, as OpenCV returns it; checked at run time)
Frame = npt.NDArray[Any]

REGISTRY: dict[str, type[ObjectDetector]] = {}
#: the detector a camera gets when its settings name none
DEFAULT = "yolox"
#: person, bicycle, car, motorcycle, bus, truck: what the city analytics count
DEFAULT_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 5, 7)

#: what the anonymizer gets whatever the camera's detector settings: persons (their heads are
#: hidden) and vehicles (their plate band)
PRIVACY_CLASSES: frozenset[int] = frozenset({PERSON}) | VEHICLES
#: the anonymizer's boxes are reported from this confidence up (or the configured
#: ``score_threshold`` when lower): the default threshold, at which tests/vision/test_privacy.py
#: measured that no synthetic plate is read after anonymization
PRIVACY_SCORE_THRESHOLD = 0.3
#: NMS of the anonymizer's boxes drops a box only above this IoU (or the configured ``nms_iou``
#: when higher): a stricter NMS would drop one of two overlapping cars, and its plate
PRIVACY_NMS_IOU = 0.45
#: at least this many anonymizer boxes per frame (the default ``max_detections``)
PRIVACY_MAX_DETECTIONS = 300

Providers = Literal["auto", "cpu", "cuda", "tensorrt"]
_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"
_TRT = "TensorrtExecutionProvider"


def execution_providers(providers: str | Sequence[str] | None = "auto") -> list[str]:
    """The ONNX Runtime execution providers to ask for, best first, always ending with CPU.

    ``"auto"``: CUDA when this onnxruntime build has it (``onnxruntime-gpu``), else CPU.
    TensorRT is used only when asked for by name (``"tensorrt"``): it builds an engine per
    model on first use, which takes minutes and needs the TensorRT libraries installed, so it
    is no safe default. ``"cuda"``/``"tensorrt"`` fall back to CPU when the build lacks them.
    ``None`` or ``"cpu"``: CPU only. A sequence: those provider names, as given, plus CPU.
    """
    available = set(ort.get_available_providers())
    if providers is None or providers == "cpu":
        wanted: list[str] = []
    elif providers == "auto" or providers == "cuda":
        wanted = [_CUDA]
    elif providers == "tensorrt":
        wanted = [_TRT, _CUDA]
    elif isinstance(providers, str):
        raise ValueError(f"providers {providers!r}: use auto, cpu, cuda, tensorrt or a list")
    else:
        wanted = list(providers)
    if not isinstance(providers, str) and providers is not None:
        unknown = [p for p in wanted if p not in available]
        if unknown:
            raise ValueError(
                f"execution providers {unknown} are not in this onnxruntime build "
                f"(available: {sorted(available)})"
            )
    chosen = [p for p in wanted if p in available and p != _CPU]
    return [*chosen, _CPU]


def make_session(
    path: Path | str, threads: int = 0, providers: str | Sequence[str] | None = "auto"
) -> ort.InferenceSession:
    """An ONNX Runtime session for the model file at ``path``.

    ``threads``: intra-op threads (0: ONNX Runtime's default, one per core); inter-op work runs
    on one thread (these graphs are sequential). ``providers``: see
    :func:`execution_providers` (``None``: CPU only). The session's log level is "error", which
    silences the harmless "initializer appears in graph inputs" warnings that older exports
    (NanoDet, YuNet) print, without changing the process-wide ONNX Runtime logger.
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = max(0, int(threads))
    opts.inter_op_num_threads = 1
    no_spinning(opts)
    return ort.InferenceSession(
        str(path), sess_options=opts, providers=execution_providers(providers)
    )


def no_spinning(opts: ort.SessionOptions) -> None:
    """Threads that finish their share of an operator sleep instead of spinning for the next.
    A camera worker runs several sessions one after the other (object detector, face
    detector) and several cameras at once: spinning threads of one session took the cores the
    next session needed (measured: the pipeline's detector ran at half its bare speed)."""
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")


class DetectorConfig(BaseModel):
    """Settings of an object detector."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(default="", description="Model file name in the models directory.")
    score_threshold: float = Field(
        default=0.3, ge=0.0, le=1.0, description="Lowest confidence reported."
    )
    nms_iou: float = Field(
        default=0.45, gt=0.0, le=1.0, description="IoU above which NMS drops the weaker box."
    )
    classes: list[int] = Field(
        default=list(DEFAULT_CLASSES),  # pydantic copies a mutable default per instance
        description="COCO class ids to report (empty: all 80).",
    )
    max_detections: int = Field(
        default=300, ge=1, le=10_000, description="At most this many boxes per frame."
    )
    threads: int = Field(
        default=0, ge=0, le=256, description="ONNX Runtime intra-op threads (0: its default)."
    )
    providers: Providers = Field(
        default="auto", description="auto (CUDA when available, else CPU), cpu, cuda, tensorrt."
    )


@dataclass(frozen=True)
class Meta:
    """How one frame became the model input: input pixel = frame pixel x scale (per axis),
    and the frame's size (to clip the boxes to)."""

    scale_x: float
    scale_y: float
    width: int
    height: int


@dataclass(frozen=True)
class Candidates:
    """Decoded rows above the score threshold, before NMS: boxes in *model input* pixels."""

    xyxy: F32
    score: F32
    class_id: I32


class ObjectDetector(abc.ABC):
    """A COCO object detector: ``Detector(config, models_dir).detect(frame_bgr)``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type[DetectorConfig]] = DetectorConfig
    #: the input size (width, height) to use when the model's input shape is dynamic
    default_input: ClassVar[tuple[int, int]] = (416, 416)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        register(REGISTRY, cls, "object detector")

    def __init__(self, config: DetectorConfig, models_dir: Path | str | None = None) -> None:
        self.config = config
        self.model_path = resolve(config.model, models_dir)
        self.session = make_session(self.model_path, config.threads, config.providers)
        inp = self.session.get_inputs()[0]
        self.input_name: str = inp.name
        shape = list(inp.shape)
        h, w = shape[2], shape[3]
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
            self.input_size: tuple[int, int] = (w, h)
        else:
            self.input_size = self.default_input
        self.output_names: list[str] = [o.name for o in self.session.get_outputs()]
        self._classes: I32 | None = (
            np.asarray(sorted(set(config.classes)), np.int32) if config.classes else None
        )
        self._privacy_classes: I32 = np.asarray(sorted(PRIVACY_CLASSES), np.int32)
        #: whether the configured detections already hold every privacy detection, so that
        #: :meth:`detect_split` is :meth:`detect` plus a class filter (see the module docstring)
        self.covers_privacy: bool = (
            (not config.classes or PRIVACY_CLASSES.issubset(config.classes))
            and config.score_threshold <= PRIVACY_SCORE_THRESHOLD
            and config.nms_iou >= PRIVACY_NMS_IOU
            and config.max_detections >= PRIVACY_MAX_DETECTIONS
        )

    @property
    def providers(self) -> list[str]:
        """The execution providers the session really uses."""
        return list(self.session.get_providers())

    # -- the three steps ---------------------------------------------------------------------

    @abc.abstractmethod
    def preprocess(self, frame: Frame) -> tuple[F32, Meta]:
        """The (1, 3, H, W) float32 input tensor of ``frame`` and how it maps back."""

    def infer(self, tensor: F32) -> list[npt.NDArray[Any]]:
        """The model's raw outputs (in :attr:`output_names` order) for one input tensor."""
        outputs: list[npt.NDArray[Any]] = self.session.run(
            self.output_names, {self.input_name: tensor}
        )
        return outputs

    @abc.abstractmethod
    def decode(
        self, outputs: Sequence[npt.NDArray[Any]], threshold: float | None = None
    ) -> Candidates:
        """Rows whose best score reaches ``threshold`` (None: the configured one), in model
        input pixels (no NMS)."""

    def postprocess(self, outputs: Sequence[npt.NDArray[Any]], meta: Meta) -> Detections:
        """Decode, keep the configured classes, map to frame pixels, clip, class-aware NMS."""
        cand = self.decode(outputs)
        if self._classes is not None:
            cand = _select(cand, np.isin(cand.class_id, self._classes))
        return self._finish(cand, meta, self.config.nms_iou, self.config.max_detections)

    def postprocess_split(
        self, outputs: Sequence[npt.NDArray[Any]], meta: Meta
    ) -> tuple[Detections, Detections]:
        """(:meth:`postprocess`, the privacy detections): see :meth:`detect_split`."""
        cfg = self.config
        floor = min(cfg.score_threshold, PRIVACY_SCORE_THRESHOLD)
        cand = self.decode(outputs, floor)
        objects = _select(cand, cand.score >= cfg.score_threshold)
        if self._classes is not None:
            objects = _select(objects, np.isin(objects.class_id, self._classes))
        private = _select(cand, np.isin(cand.class_id, self._privacy_classes))
        return (
            self._finish(objects, meta, cfg.nms_iou, cfg.max_detections),
            self._finish(
                private,
                meta,
                max(cfg.nms_iou, PRIVACY_NMS_IOU),
                max(cfg.max_detections, PRIVACY_MAX_DETECTIONS),
            ),
        )

    @staticmethod
    def _finish(cand: Candidates, meta: Meta, nms_iou: float, limit: int) -> Detections:
        """Candidates to frame pixels, clipped, class-aware NMS, the best ``limit``."""
        if len(cand.score) == 0:
            return Detections.empty()
        k = np.array([meta.scale_x, meta.scale_y, meta.scale_x, meta.scale_y], np.float32)
        xyxy = cand.xyxy / k
        np.clip(xyxy[:, 0::2], 0.0, float(meta.width), out=xyxy[:, 0::2])
        np.clip(xyxy[:, 1::2], 0.0, float(meta.height), out=xyxy[:, 1::2])
        keep = nms(xyxy, cand.score, nms_iou, cand.class_id)
        keep = keep[:limit]
        return Detections(xyxy[keep], cand.score[keep], cand.class_id[keep])

    def detect(self, frame: Frame) -> Detections:
        """The objects in one BGR uint8 frame, in its pixels, best first."""
        tensor, meta = self.preprocess(frame)
        return self.postprocess(self.infer(tensor), meta)

    def detect_split(self, frame: Frame) -> tuple[Detections, Detections]:
        """(the objects the settings ask for, as :meth:`detect`; the persons and vehicles the
        anonymizer must hide, whatever the settings narrow: every :data:`PRIVACY_CLASSES` box
        from ``min(score_threshold, PRIVACY_SCORE_THRESHOLD)``, NMS at ``max(nms_iou,
        PRIVACY_NMS_IOU)``, up to ``max(max_detections, PRIVACY_MAX_DETECTIONS)``). One
        inference. When :attr:`covers_privacy` both come from the same candidates, NMS and
        limit, so the second is the first, class-filtered (NMS is per class)."""
        if self.covers_privacy:
            objects = self.detect(frame)
            return objects, objects.with_classes(PRIVACY_CLASSES)
        tensor, meta = self.preprocess(frame)
        return self.postprocess_split(self.infer(tensor), meta)


def _select(c: Candidates, mask: npt.NDArray[np.bool_]) -> Candidates:
    return Candidates(c.xyxy[mask], c.score[mask], c.class_id[mask])


def _check_frame(frame: Frame) -> Frame:
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(
            f"a detector takes a BGR uint8 H x W x 3 frame, got {frame.dtype} {frame.shape}"
        )
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"empty frame {frame.shape}")
    return np.ascontiguousarray(frame)


@functools.lru_cache(maxsize=16)
def anchor_grid(width: int, height: int, strides: tuple[int, ...]) -> tuple[F32, F32, F32]:
    """Column, row and stride of every output row of a dense head: for each stride in order,
    the (height/stride) x (width/stride) cells in row-major order. Cached per input size;
    the arrays are read-only."""
    cols: list[F32] = []
    rows: list[F32] = []
    steps: list[F32] = []
    for s in strides:
        gh, gw = -(-height // s), -(-width // s)
        r, c = np.meshgrid(np.arange(gh, dtype=np.float32), np.arange(gw, dtype=np.float32))
        cols.append(c.T.reshape(-1))
        rows.append(r.T.reshape(-1))
        steps.append(np.full(gh * gw, s, np.float32))
    out = (np.concatenate(cols), np.concatenate(rows), np.concatenate(steps))
    for a in out:
        a.flags.writeable = False
    return out


def _best_class(scores: F32, threshold: float) -> tuple[I32, F32, I32]:
    """(rows reaching the threshold, their best score, their best class)."""
    cls = scores.argmax(axis=1).astype(np.int32)
    best = np.take_along_axis(scores, cls[:, None], axis=1)[:, 0]
    rows = np.flatnonzero(best >= threshold).astype(np.int32)
    return rows, best[rows].astype(np.float32), cls[rows]


class YoloxConfig(DetectorConfig):
    model: str = Field(
        default="yolox_nano_416x416.onnx", description="Model file name in the models directory."
    )


class Yolox(ObjectDetector):
    """YOLOX (Megvii), exported without box decoding in the graph.

    Input: the frame letterboxed into the model's square input: scaled by
    ``r = min(416 / h, 416 / w)`` and pasted at the top-left of a canvas of grey 114; BGR,
    0-255, no normalisation. Output (1, N, 85): x, y, log w, log h, objectness, 80 class
    scores (sigmoid already applied) for the cells of strides 8, 16 and 32. A box is
    ``cx = (x + col) * s``, ``w = exp(log w) * s``; the score is objectness x class score.
    """

    name = "yolox"
    summary = "YOLOX-nano COCO detector (416x416), the default: best on small, far objects"
    Config = YoloxConfig
    strides: ClassVar[tuple[int, ...]] = (8, 16, 32)
    pad_value: ClassVar[int] = 114

    def preprocess(self, frame: Frame) -> tuple[F32, Meta]:
        frame = _check_frame(frame)
        h, w = frame.shape[:2]
        iw, ih = self.input_size
        r = min(iw / w, ih / h)
        nw, nh = max(1, min(iw, round(w * r))), max(1, min(ih, round(h * r)))
        canvas = np.full((ih, iw, 3), self.pad_value, np.uint8)
        canvas[:nh, :nw] = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_LINEAR)
        tensor = canvas.transpose(2, 0, 1)[None].astype(np.float32)
        # the scale actually applied per axis (rounding the resized size changes it slightly)
        return tensor, Meta(nw / w, nh / h, w, h)

    def decode(
        self, outputs: Sequence[npt.NDArray[Any]], threshold: float | None = None
    ) -> Candidates:
        raw = np.asarray(outputs[0], np.float32)[0]
        iw, ih = self.input_size
        col, row, stride = anchor_grid(iw, ih, self.strides)
        if len(raw) != len(col):
            raise ValueError(f"yolox output has {len(raw)} rows, the grid {len(col)}")
        scores = raw[:, 4:5] * raw[:, 5:]
        rows, score, cls = _best_class(
            scores, self.config.score_threshold if threshold is None else threshold
        )
        sel, s = raw[rows], stride[rows]
        cx = (sel[:, 0] + col[rows]) * s
        cy = (sel[:, 1] + row[rows]) * s
        hw = np.exp(sel[:, 2]) * s / 2
        hh = np.exp(sel[:, 3]) * s / 2
        xyxy = np.stack([cx - hw, cy - hh, cx + hw, cy + hh], axis=1).astype(np.float32)
        return Candidates(xyxy, score, cls)


class NanoDetConfig(DetectorConfig):
    model: str = Field(
        default="nanodet_m_320.onnx", description="Model file name in the models directory."
    )


class NanoDet(ObjectDetector):
    """NanoDet-m (RangiLyu), the first NanoDet with a GFL head.

    Input: the frame resized to 320x320 (no letterbox: x and y scale apart), BGR, normalised
    with mean (103.53, 116.28, 123.675) and std (57.375, 57.12, 58.395). Outputs per stride
    s in 8, 16, 32: ``cls_pred_stride_s`` (1, N, 80) class scores (sigmoid applied) and
    ``dis_pred_stride_s`` (1, N, 32): for each side (left, top, right, bottom) a distribution
    over the distances 0..7 (x s) from the cell centre ``(col * s + (s - 1) / 2, ...)``.
    General focal loss decoding: softmax over the 8 bins, the distance is its expectation.
    """

    name = "nanodet"
    summary = "NanoDet-m COCO detector (320x320): slightly faster, weaker on far objects"
    Config = NanoDetConfig
    default_input = (320, 320)
    strides: ClassVar[tuple[int, ...]] = (8, 16, 32)
    reg_max: ClassVar[int] = 7
    mean: ClassVar[F32] = np.array([103.53, 116.28, 123.675], np.float32)
    std: ClassVar[F32] = np.array([57.375, 57.12, 58.395], np.float32)

    def __init__(self, config: DetectorConfig, models_dir: Path | str | None = None) -> None:
        super().__init__(config, models_dir)
        order = [f"cls_pred_stride_{s}" for s in self.strides] + [
            f"dis_pred_stride_{s}" for s in self.strides
        ]
        missing = [n for n in order if n not in self.output_names]
        if missing:
            raise ValueError(f"{self.model_path} is no NanoDet-m export: no outputs {missing}")
        self.output_names = order  # infer() returns them in this order
        self._bins = np.arange(self.reg_max + 1, dtype=np.float32)

    def preprocess(self, frame: Frame) -> tuple[F32, Meta]:
        frame = _check_frame(frame)
        h, w = frame.shape[:2]
        iw, ih = self.input_size
        img = cv2.resize(frame, (iw, ih), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        img = (img - self.mean) / self.std
        tensor = np.ascontiguousarray(img.transpose(2, 0, 1)[None], dtype=np.float32)
        return tensor, Meta(iw / w, ih / h, w, h)

    def decode(
        self, outputs: Sequence[npt.NDArray[Any]], threshold: float | None = None
    ) -> Candidates:
        n = len(self.strides)
        scores = np.concatenate([np.asarray(o, np.float32)[0] for o in outputs[:n]])
        dis = np.concatenate([np.asarray(o, np.float32)[0] for o in outputs[n : 2 * n]])
        iw, ih = self.input_size
        col, row, stride = anchor_grid(iw, ih, self.strides)
        if len(scores) != len(col):
            raise ValueError(f"nanodet outputs have {len(scores)} rows, the grid {len(col)}")
        rows, score, cls = _best_class(
            scores, self.config.score_threshold if threshold is None else threshold
        )
        s = stride[rows]
        logits = dis[rows].reshape(-1, 4, self.reg_max + 1)
        p = np.exp(logits - logits.max(axis=2, keepdims=True))
        p /= p.sum(axis=2, keepdims=True)
        dist = (p @ self._bins) * s[:, None]  # (n, 4): left, top, right, bottom
        cx = col[rows] * s + (s - 1) / 2
        cy = row[rows] * s + (s - 1) / 2
        xyxy = np.stack(
            [cx - dist[:, 0], cy - dist[:, 1], cx + dist[:, 2], cy + dist[:, 3]], axis=1
        ).astype(np.float32)
        return Candidates(xyxy, score, cls)


def create(
    name: str, config: dict[str, Any] | None = None, models_dir: Path | str | None = None
) -> ObjectDetector:
    """The registered detector ``name`` (``default``: :data:`DEFAULT`), settings validated."""
    if name == "default":
        name = DEFAULT
    cls = REGISTRY.get(name)
    if cls is None:
        raise KeyError(f"no object detector named {name!r}; registered: {', '.join(REGISTRY)}")
    return cls(cls.Config.model_validate(config or {}), models_dir)
