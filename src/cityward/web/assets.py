"""The dashboard's files: our own page, script and style, and the vendored libraries.

MapLibre GL JS (the map) and Chart.js (the charts) come from PyPI wheels installed with
cityward (``maplibre`` and ``chartkick``), never from a CDN: the dashboard works on a city's
closed network. Each file is read once, gzip-compressed once, and served with an ETag; our
own files are revalidated on every load (they change with cityward), the vendored ones are
cached for a day.

Hand-written rather than Starlette's ``StaticFiles``: the files live in three packages, and a
precompressed copy keeps the first load under a megabyte on the wire (see bench/dashboard.py).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import importlib.util
import threading
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path

# name under /ui/ -> (package, path inside the package, media type); cached VENDOR_MAX_AGE s
VENDOR: dict[str, tuple[str, str, str]] = {
    "maplibre-gl.js": ("maplibre", "srcjs/maplibre-gl.js", "text/javascript; charset=utf-8"),
    "maplibre-gl.css": ("maplibre", "srcjs/maplibre-gl.css", "text/css; charset=utf-8"),
    "chart.js": (
        "chartkick",
        "django/static/chartkick/Chart.bundle.js",
        "text/javascript; charset=utf-8",
    ),
}
OWN: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
VENDOR_MAX_AGE = 86400


class AssetMissing(LookupError):
    """A vendored library is not installed (a broken install)."""


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes
    media_type: str
    etag: str
    max_age: int  # 0: revalidate every time


def _load(source: Traversable | Path, media_type: str, max_age: int) -> Asset:
    return _make(source.read_bytes(), media_type, max_age)


def _make(body: bytes, media_type: str, max_age: int) -> Asset:
    return Asset(
        body=body,
        gzipped=gzip.compress(body, compresslevel=6, mtime=0),
        media_type=media_type,
        etag='"' + hashlib.sha256(body).hexdigest()[:20] + '"',
        max_age=max_age,
    )


def _package_dir(package: str) -> Path:
    """Where a package is installed, without importing it (``maplibre`` imports its Jupyter
    and Shiny bindings and logs warnings; we only want its files)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(package)
    return Path(next(iter(spec.submodule_search_locations)))


def with_config(page: Asset, mark: bytes, config: bytes) -> Asset:
    """``page`` with ``mark`` replaced by ``config``: the page of one app, made once."""
    return _make(page.body.replace(mark, config), page.media_type, page.max_age)


_cache: dict[str, Asset] = {}
_lock = threading.Lock()


def asset(name: str) -> Asset | None:
    """The file served at ``/ui/{name}``; None for a name we do not serve."""
    with _lock:
        hit = _cache.get(name)
        if hit is not None:
            return hit
        if name in OWN:
            src = importlib.resources.files("cityward.web") / "static" / name
            found = _load(src, OWN[name], 0)
        elif name in VENDOR:
            package, path, media = VENDOR[name]
            try:
                src = _package_dir(package).joinpath(*path.split("/"))
                found = _load(src, media, VENDOR_MAX_AGE)
            except (ModuleNotFoundError, FileNotFoundError) as exc:
                raise AssetMissing(
                    f"the dashboard needs {path} from the {package!r} package, which is not "
                    f"installed: pip install {package} (it is a dependency of cityward)"
                ) from exc
        else:
            return None
        _cache[name] = found
        return found
