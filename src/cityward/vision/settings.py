"""The ``[vision]`` settings: the cameras a worker may analyse, and how workers share them.

Each ``[[vision.cameras]]`` entry is one camera: where its frames come from, how often to
analyse, which detector, and its analytics rules (lines, zones, an optional homography). The
settings of the detector, tracker, anonymizer and rules are validated by those plugins when
the camera starts (:func:`cityward.vision.pipeline.build`), so an error names the camera and
the setting.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_CAMERA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class MotionSettings(BaseModel):
    """Motion gating: detection is skipped on frames where nothing moves."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    width: int = Field(default=160, ge=32, le=1920, description="Width the gate looks at (px).")
    pixel_threshold: int = Field(
        default=18, ge=1, le=255, description="Grey-level change that counts as motion."
    )
    min_fraction: float = Field(
        default=0.0015,
        ge=0,
        le=1,
        description="Fraction of changed pixels above which the frame is analysed.",
    )
    max_skip_s: float = Field(
        default=1.0,
        ge=0,
        le=60,
        description="Analyse at least this often even when nothing moves (new objects that "
        "arrive very slowly, lighting).",
    )

    def for_privacy(self) -> MotionSettings:
        """These settings, each made at least as sensitive as its default, for a gate whose
        "still" lets a frame that is encoded be anonymized with the previous frame's boxes.
        A less sensitive gate (``min_fraction = 1``, ``max_skip_s = 60``) saves detector runs
        on frames only counted, but it let moving cars be anonymized with boxes up to a minute
        old and their plates stayed readable: those values hold for counting only."""
        d = MotionSettings()
        return self.model_copy(
            update={
                "width": max(self.width, d.width),
                "pixel_threshold": min(self.pixel_threshold, d.pixel_threshold),
                "min_fraction": min(self.min_fraction, d.min_fraction),
                "max_skip_s": min(self.max_skip_s, d.max_skip_s),
            }
        )


class SnapshotSettings(BaseModel):
    """Snapshots attached to alerts: small, anonymized JPEGs."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    width: int = Field(default=320, ge=64, le=1280, description="Stored width (px).")
    quality: int = Field(default=70, ge=10, le=95, description="JPEG quality.")


class CameraSettings(BaseModel):
    """One camera."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Short name, unique in the city (letters, digits, . _ -).")
    url: str = Field(description="A video file, or an rtsp://, http(s):// stream OpenCV can open.")
    name: str = Field(default="", description="What the operations room calls it.")
    location: tuple[float, float] | None = Field(
        default=None, description="[longitude, latitude] of the camera (WGS84)."
    )
    source: str = Field(
        default="traffic-cameras",
        description="The governance data source the camera belongs to: its retention applies "
        "to the camera's snapshots.",
    )
    analysis_fps: float = Field(
        default=5.0,
        gt=0,
        le=120,
        description="Analysed frames per second at most (frames in between are skipped).",
    )
    realtime: bool = Field(
        default=True,
        description="A file is played at its own frame rate, as a live camera would deliver "
        "it (false: as fast as it can be read).",
    )
    loop: bool = Field(default=False, description="A file starts again at its end.")
    reconnect_max_s: float = Field(
        default=30.0, gt=0, le=3600, description="Longest wait between reconnect attempts."
    )
    detector: str = Field(default="yolox", description="Object detector (`vision detectors`).")
    detector_config: dict[str, Any] = Field(default_factory=dict)
    tracker: dict[str, Any] = Field(default_factory=dict, description="Tracker settings.")
    anonymizer: dict[str, Any] = Field(default_factory=dict, description="Anonymizer settings.")
    motion: MotionSettings = Field(default_factory=MotionSettings)
    rules: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Analytics rules: tables with `type` (`vision rules`) and its settings.",
    )
    homography: list[list[float]] | None = Field(
        default=None, description="3x3 matrix from image pixels to ground metres."
    )
    interval_s: float = Field(
        default=60.0, ge=1, le=3600, description="Counts are written to the bank this often."
    )
    snapshots: SnapshotSettings = Field(default_factory=SnapshotSettings)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _CAMERA_ID.fullmatch(value):
            raise ValueError(
                f"camera id {value!r}: use 1-64 letters, digits, '.', '_' or '-' (it becomes "
                "part of entity ids)"
            )
        return value

    @field_validator("homography")
    @classmethod
    def _homography(cls, value: list[list[float]] | None) -> list[list[float]] | None:
        if value is not None and (len(value) != 3 or any(len(r) != 3 for r in value)):
            raise ValueError("homography must be a 3x3 matrix (three rows of three numbers)")
        return value


class LeaseSettings(BaseModel):
    """How several workers share the camera list."""

    model_config = ConfigDict(extra="forbid")

    store: Literal["auto", "bank", "nats"] = Field(
        default="auto",
        description="Where leases live: the bank's database, NATS JetStream (a key-value "
        'bucket), or auto: NATS when [bus] kind = "nats", else the bank.',
    )
    ttl_s: float = Field(
        default=15.0,
        ge=2,
        le=300,
        description="A lease not renewed for this long expires and another worker takes the "
        "camera over.",
    )
    renew_every_s: float = Field(default=5.0, gt=0, le=100, description="Renewal period.")

    @model_validator(mode="after")
    def _renew(self) -> LeaseSettings:
        if self.renew_every_s * 2 > self.ttl_s:
            raise ValueError(
                f"renew_every_s ({self.renew_every_s}) must be at most half of ttl_s "
                f"({self.ttl_s}), or a slow renewal loses the lease"
            )
        return self


class VisionSettings(BaseModel):
    """The ``[vision]`` table."""

    model_config = ConfigDict(extra="forbid")

    models_dir: Path | None = Field(
        default=None, description="Folder of the ONNX models (default: $CITYWARD_MODELS_DIR)."
    )
    tenant: str = Field(default="", description="NGSI-LD tenant written to ('' = default).")
    cameras: list[CameraSettings] = Field(default_factory=list)
    leases: LeaseSettings = Field(default_factory=LeaseSettings)

    @model_validator(mode="after")
    def _unique(self) -> VisionSettings:
        seen: set[str] = set()
        for cam in self.cameras:
            if cam.id in seen:
                raise ValueError(f"two cameras have the id {cam.id!r}")
            seen.add(cam.id)
        return self
