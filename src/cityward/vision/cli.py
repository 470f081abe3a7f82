"""``cityward vision``: run cameras into the data bank, analyse one video, list the plugins."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cityward.cliutil import settings_or_exit

if TYPE_CHECKING:
    from cityward.governance.sources import Catalog
    from cityward.vision.settings import CameraSettings

app = typer.Typer(
    help="Camera analytics that anonymize at the edge: counts and events, never identities.",
    no_args_is_help=True,
)
console = Console()


def retention_seconds(source: Any) -> float:
    period = source.retention_period
    return float(period.months * 30.44 * 86400 + period.micros / 1e6)


def source_problem(camera: CameraSettings, catalog: Catalog) -> str | None:
    """Why the catalog would not read, keep and notify everything ``camera`` writes under the
    camera's ``source`` alone (None when it would).

    Its Alerts name the source in their id; its Camera and flow entities are attributed by the
    catalog's id patterns and types. Started anyway, a camera of a public-safety source wrote
    a Camera entity that was undeclared data, or flows that another source's purposes read.
    An id that another source's pattern matches too is refused as well: by id it belongs to
    the source declared first, but a query lists it to the purposes of either.
    """
    from cityward.governance.sources import derived_source
    from cityward.vision.emitter import CAMERA_TYPE, emitted_ids

    own = camera.source
    missing: list[tuple[str, str]] = []  # (id, type): needs an id pattern of its own source
    reasons: list[str] = []
    shared: dict[str, list[str]] = {}  # other source -> the camera's ids its patterns match
    for eid, typ in emitted_ids(camera):
        got = catalog.source_of(eid, [typ]).id
        others = []
        if derived_source(eid) is None:
            others = [
                s.id
                for s in catalog.sources
                if s.id != own and any(p.search(eid) for p in s.compiled_patterns)
            ]
        if others:
            reasons.append(f"{eid} ({typ}) matches an id pattern of {', '.join(map(repr, others))}")
            for sid in others:
                shared.setdefault(sid, []).append(eid)
        elif got != own:
            reasons.append(f"{eid} ({typ}) goes to {got!r}")
            missing.append((eid, typ))
    if not reasons:
        return None
    fixes = []
    if missing:
        cam = camera.id
        flows = sorted({t for _, t in missing if t not in (CAMERA_TYPE, "Alert")})
        patterns = []
        if any(t == CAMERA_TYPE for _, t in missing):
            patterns.append(f"urn:ngsi-ld:{CAMERA_TYPE}:{cam}")
        if flows:
            kinds = flows[0] if len(flows) == 1 else "(" + "|".join(flows) + ")"
            patterns.append(f"urn:ngsi-ld:{kinds}:camera:{cam}:.+")
        if any(t == "Alert" for _, t in missing):  # the built-in source's ids, redeclared
            patterns.append(f"urn:ngsi-ld:Alert:camera:{cam}:.+")
        fixes.append(f"add to the id_patterns of source {own!r}: {', '.join(map(repr, patterns))}")
    for sid in shared:
        fixes.append(f"narrow the id_patterns of source {sid!r} to leave out this camera's ids")
    return (
        f"field 'source': its entities must belong to its source {own!r} alone, but in the "
        f"governance catalog {'; '.join(reasons)}. To fix: {'; '.join(fixes)}"
    )


@app.command("detectors")
def detectors() -> None:
    """The object detectors this build has, and their settings."""
    from cityward.plugins import settings_table
    from cityward.vision.detectors import REGISTRY

    console.print(settings_table("object detectors", REGISTRY))


@app.command("rules")
def rules() -> None:
    """The analytics rules a camera can use, and their settings."""
    from cityward.plugins import settings_table
    from cityward.vision.analytics import REGISTRY

    console.print(settings_table("analytics rules", REGISTRY))


def _status_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="cameras")
    for col in ("camera", "state", "frame", "fps", "detected", "crossings", "alerts", "ms/frame"):
        table.add_column(col)
    for r in rows:
        if "frames" not in r:
            table.add_row(r["camera"], r["state"], "", "", "", "", "", "")
            continue
        pos = f"{r['position']}/{r['total']}" if r["total"] else str(r["position"])
        ms = sum(v for k, v in r["ms"].items() if k != "decode")
        table.add_row(
            r["camera"],
            r["state"] + (f" ({r['error']})" if r["error"] else ""),
            pos,
            f"{r['fps']:.1f}",
            str(r["detected"]),
            str(r["crossings"]),
            str(r["alerts"]),
            f"{ms:.1f}",
        )
    return table


@app.command("run")
def run(
    config: Annotated[
        Path, typer.Argument(exists=True, help="TOML configuration with \\[\\[vision.cameras]].")
    ],
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Data folder (SQLite bank, snapshots).")
    ] = None,
    database_url: Annotated[
        str | None, typer.Option("--database-url", help="postgresql://... for a PostgreSQL bank.")
    ] = None,
    worker_id: Annotated[
        str | None, typer.Option(help="This worker's name in the camera leases.")
    ] = None,
    exit_when_done: Annotated[
        bool, typer.Option(help="Stop once every camera that reads a file has reached its end.")
    ] = False,
    live: Annotated[bool, typer.Option(help="Show the live status table.")] = True,
) -> None:
    """Analyse the configured cameras and feed the data bank, until SIGINT or SIGTERM.

    Workers on several machines share the camera list: each camera is leased to one worker;
    a dead worker's cameras move to the others within the lease time (docs/vision.md).
    """
    from rich.live import Live

    from cityward.bank.history import History
    from cityward.bank.jsonld import ContextResolver
    from cityward.bank.service import Bank
    from cityward.bank.store import open_store
    from cityward.governance.runtime import build_catalog
    from cityward.vision.emitter import BankSink
    from cityward.vision.leases import CameraLeaser, default_worker_id, lease_store
    from cityward.vision.models import ModelMissing
    from cityward.vision.pipeline import PipelineConfigError
    from cityward.vision.source import SourceError, is_stream
    from cityward.vision.worker import VisionWorker

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_or_exit(config, data_dir=data_dir, database_url=database_url)
    vision = settings.vision
    # a video file named relative to the configuration file
    cams = []
    for cam in vision.cameras:
        if not is_stream(cam.url) and not Path(cam.url).is_absolute():
            cam = cam.model_copy(update={"url": str(config.parent / cam.url)})
        cams.append(cam)
    vision = vision.model_copy(update={"cameras": cams})
    if not vision.cameras:
        console.print(f"[red]{escape(str(config))}[/]: no \\[\\[vision.cameras]] configured")
        raise typer.Exit(2)
    resolver = ContextResolver(preload=settings.contexts, allow_fetch=False)
    catalog = build_catalog(settings.governance.sources, resolver)
    by_id = {s.id: s for s in catalog.all_sources()}
    for cam in vision.cameras:
        if cam.source not in by_id:
            console.print(f"[red]camera {cam.id}[/]: source {cam.source!r} is not declared")
            raise typer.Exit(2)
        problem = source_problem(cam, catalog)
        if problem:
            # emoji off: rich drew ":camera:" in the suggested patterns as a camera icon
            console.print(f"[red]camera {cam.id}[/]: {escape(problem)}", emoji=False)
            raise typer.Exit(2)
    store = open_store(
        settings.database_url,
        settings.data_dir,
        connect_timeout_s=settings.database_connect_timeout_s,
    )
    bank = Bank(store)
    History(store, bank)
    sink = BankSink(bank, tenant=vision.tenant, context=resolver.core)
    worker = VisionWorker(
        vision,
        sink,
        snapshots_root=settings.data_dir / "vision" / "snapshots",
        retention_s=lambda source: retention_seconds(by_id[source]),
    )
    # fail early, with the file named, when a model or a camera's settings are wrong
    try:
        for cam in vision.cameras:
            worker.check_camera(cam.id)
    except (ModelMissing, PipelineConfigError, SourceError) as exc:
        console.print(f"[red]{exc}[/]")
        sink.close()
        store.close()
        raise typer.Exit(2) from exc
    name = worker_id or default_worker_id()
    leases = lease_store(vision.leases, settings.bus, store)
    leaser = CameraLeaser(
        leases,
        [c.id for c in vision.cameras],
        worker_id=name,
        ttl_s=vision.leases.ttl_s,
        renew_every_s=vision.leases.renew_every_s,
        on_start=worker.start_camera,
        on_stop=worker.stop_camera,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    leaser.start()
    console.print(f"[green]vision[/] worker {name}: {len(vision.cameras)} camera(s) in the list")
    try:
        # at start, then hourly: time.monotonic() counts from boot, so a first purge "an hour
        # after 0.0" waited for the machine's first hour up
        worker.purge_snapshots()
        last_purge = time.monotonic()
        with Live(_status_table(worker.status_rows()), console=console, auto_refresh=False) as ui:
            while not stop.wait(0.5):
                if live:
                    ui.update(_status_table(worker.status_rows()), refresh=True)
                if exit_when_done and worker.all_done():
                    break
                if time.monotonic() - last_purge > 3600:
                    last_purge = time.monotonic()
                    worker.purge_snapshots()
            ui.update(_status_table(worker.status_rows()), refresh=True)
    finally:
        # the leaser first: its thread ends (no more renewals nor new cameras), then it
        # stops each camera it holds and releases that lease right after. Stopping the worker
        # first left the leaser renewing, even acquiring, the leases of cameras that no
        # longer ran, and no other worker could take them over meanwhile. The worker's own
        # stop then ends whatever the leaser did not hold (nothing, normally).
        leaser.stop()
        worker.stop()
        sink.close()
        leases.close()
        store.close()
    console.print(
        f"written: {sink.written} entities, {sink.refused} refused, {sink.dropped} dropped"
    )


@app.command("analyze")
def analyze(
    video: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A video file.")],
    line: Annotated[
        list[str] | None,
        typer.Option("--line", help="A counting line X1,Y1,X2,Y2 in image pixels (repeatable)."),
    ] = None,
    output: Annotated[Path, typer.Option("--output", help="Folder for the results.")] = Path(
        "vision-output"
    ),
    detector: Annotated[str, typer.Option(help="Object detector (`vision detectors`).")] = "yolox",
    fps: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=120,
            help="Analyse at most this many frames/s, up to 120 (default or 0: all).",
        ),
    ] = None,
    motion: Annotated[bool, typer.Option(help="Skip detection on still frames.")] = False,
    models_dir: Annotated[
        Path | None, typer.Option(help="Models folder (default: $CITYWARD_MODELS_DIR).")
    ] = None,
) -> None:
    """Count line crossings in one video; write OUTPUT/events.json and OUTPUT/anonymized.mp4.

    The anonymized video has faces and plates blurred, with boxes, tracks and lines drawn on
    it, for a person to look at. Nothing else is written.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from cityward.vision.analyze import analyze_video, parse_line
    from cityward.vision.models import ModelMissing
    from cityward.vision.pipeline import PipelineConfigError
    from cityward.vision.source import SourceError

    try:
        lines = [parse_line(x) for x in line or []]
    except ValueError as exc:
        console.print(f"[red]--line[/]: {exc}")
        raise typer.Exit(2) from exc
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} frames"),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(video.name, total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        try:
            result = analyze_video(
                video,
                lines,
                output=output,
                detector=detector,
                models_dir=models_dir,
                analysis_fps=fps,
                motion=motion,
                progress=progress,
            )
        except (ModelMissing, PipelineConfigError, SourceError) as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from exc
    table = Table(title=f"{video.name}: {result.frames} frames at {result.fps:.1f} frames/s")
    table.add_column("line")
    table.add_column("direction")
    table.add_column("counts")
    for ln, dirs in sorted(result.counts().items()):
        for d, classes in sorted(dirs.items()):
            table.add_row(ln, d, ", ".join(f"{k} {v}" for k, v in sorted(classes.items())))
    console.print(table)
    if result.events:
        console.print(f"{len(result.events)} alert(s): " + ", ".join(e.kind for e in result.events))
    ms = result.clock.ms_per_frame(result.frames)
    console.print("ms per frame: " + ", ".join(f"{k} {v:.1f}" for k, v in ms.items() if v))
    console.print(f"wrote {output / 'events.json'} and {output / 'anonymized.mp4'}")
