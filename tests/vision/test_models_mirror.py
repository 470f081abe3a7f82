"""``cityward models fetch --mirror``: a mirror URL's credentials never reach the output.

An internal mirror often takes its user and password in the URL
(``https://user:password@mirror/...``). Every failure (HTTP error, refused connection, invalid
URL, sha256 mismatch) names the URL with the user and the password masked, as camera URLs are.
The servers are real and local: an HTTP server on 127.0.0.1 and a port where nothing listens.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cityward.cli import app
from cityward.vision.models import CATALOGUE, ModelFile
from cityward.vision.models_cli import FetchError, fetch
from tests.vision.conftest import QuietHandler, serve_folder

runner = CliRunner()

USER = "mirroruser"
SECRET = "S3cretPass"
MODEL = "yunet_s_320_320.onnx"


class _Handler(QuietHandler):
    """Serves its folder; ``/broken/...`` answers HTTP 500."""

    def do_GET(self) -> None:
        if self.path.startswith("/broken/"):
            self.send_error(500, "mirror broken")
            return
        super().do_GET()


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A folder served over HTTP on 127.0.0.1, and its port."""
    root = tmp_path / "www"
    root.mkdir()
    with serve_folder(root, _Handler) as port:
        yield root, port


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _assert_hidden(text: str) -> None:
    assert SECRET not in text
    assert USER not in text


def _fetch_cli(models: Path, mirror_url: str) -> str:
    result = runner.invoke(
        app,
        ["models", "fetch", MODEL, "--models-dir", str(models), "--mirror", mirror_url],
        env={"COLUMNS": "400"},  # one message, one line
    )
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "not fetched" in result.output
    return result.output


def test_cli_failures_do_not_show_the_mirror_credentials(
    mirror: tuple[Path, int], tmp_path: Path
) -> None:
    root, port = mirror
    models = tmp_path / "models"
    cases = {
        # the mirror answers 404: the file is not there
        f"http://{USER}:{SECRET}@127.0.0.1:{port}/m": "answered HTTP 404",
        # the mirror answers 500
        f"http://{USER}:{SECRET}@127.0.0.1:{port}/broken": "answered HTTP 500",
        # nothing listens
        f"http://{USER}:{SECRET}@127.0.0.1:{_closed_port()}/m": "failed",
        # an invalid URL (no closing bracket): a message, not a traceback
        f"http://{USER}:{SECRET}@[::1/m": "failed",
    }
    for url, why in cases.items():
        out = _fetch_cli(models, url)
        _assert_hidden(out)
        assert why in out, out
        assert "http://***@" in out, out
    # a mirror that serves another file under the model's name: refused, masked as well
    (root / MODEL).write_bytes(b"not the model")
    out = _fetch_cli(models, f"http://{USER}:{SECRET}@127.0.0.1:{port}")
    _assert_hidden(out)
    assert "sha256 mismatch" in out and "http://***@127.0.0.1" in out
    assert not models.exists() or list(models.iterdir()) == []


def test_fetch_errors_mask_the_credentials(mirror: tuple[Path, int], tmp_path: Path) -> None:
    _, port = mirror
    published = CATALOGUE[MODEL]
    models = tmp_path / "models"
    for base in (
        f"https://{USER}:{SECRET}@127.0.0.1:{_closed_port()}/m",
        f"http://{USER}:{SECRET}@127.0.0.1:{port}/m",
    ):
        with pytest.raises(FetchError) as exc:
            fetch(published, models, mirror=base)
        _assert_hidden(str(exc.value))
        assert "://***@127.0.0.1:" in str(exc.value)
    # the archive of a catalogued member: its mismatch names the masked URL too
    wheel = ModelFile(
        "thing.onnx",
        "https://x/pkg.whl",
        "0" * 64,
        "MIT",
        "t",
        member="pkg/a",
        archive_sha256="1" * 64,
    )
    (mirror[0] / "pkg.whl").write_bytes(b"not a wheel")
    with pytest.raises(FetchError, match="the archive") as exc:
        fetch(wheel, models, mirror=f"http://{USER}:{SECRET}@127.0.0.1:{port}")
    _assert_hidden(str(exc.value))
