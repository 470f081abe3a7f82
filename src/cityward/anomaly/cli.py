"""``cityward anomaly``: list detectors, score them on the Numenta Anomaly Benchmark."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cityward.shared import shared_data

app = typer.Typer(help="Streaming anomaly detection.", no_args_is_help=True)
console = Console()


def default_nab() -> Path:
    """../shared/data/nab beside the checkout (or beside the current folder)."""
    return shared_data("nab")


@app.command("detectors")
def detectors() -> None:
    """List the registered detectors and their settings."""
    from cityward.anomaly.detectors import DEFAULT, load_builtin
    from cityward.plugins import settings_table

    console.print(settings_table(f"anomaly detectors (default: {DEFAULT})", load_builtin()))


def _config(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"not JSON: {e}", param_hint="--config") from None
    if not isinstance(value, dict):
        raise typer.BadParameter("give a JSON object", param_hint="--config")
    return value


@app.command("nab")
def nab(
    data: Annotated[
        Path | None,
        typer.Option(help="Folder of <category>/*.csv files (default ../shared/data/nab/data)."),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            help="combined_windows.json (default ../shared/data/nab/labels/combined_windows.json)."
        ),
    ] = None,
    detector: Annotated[
        str, typer.Option(help="Detector name; 'default' is the platform's default.")
    ] = "default",
    config: Annotated[
        str | None, typer.Option("--config", help="Detector settings as a JSON object.")
    ] = None,
    output: Annotated[Path, typer.Option(help="Results folder.")] = Path("nab-results"),
    jobs: Annotated[int, typer.Option(min=0, help="Processes (0: one per CPU core).")] = 0,
) -> None:
    """Run a detector over a NAB corpus, write NAB-layout results and scores.json."""
    from pydantic import ValidationError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from cityward.anomaly.detectors import create
    from cityward.anomaly.evaluate import (
        find_files,
        run_corpus,
        score_run,
        write_results,
        write_scores,
    )
    from cityward.anomaly.nab import load_windows

    root = default_nab()
    data = data or root / "data"
    labels = labels or root / "labels" / "combined_windows.json"
    if not data.is_dir():
        raise typer.BadParameter(f"no folder at {data}", param_hint="--data")
    if not labels.is_file():
        raise typer.BadParameter(f"no file at {labels}", param_hint="--labels")
    cfg = _config(config)
    try:
        create(detector, cfg)
    except KeyError as e:
        raise typer.BadParameter(str(e.args[0]), param_hint="--detector") from None
    except ValidationError as e:
        raise typer.BadParameter(str(e), param_hint="--config") from None
    try:
        windows = load_windows(labels)
        files = find_files(data)
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from None
    t0 = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console
    ) as progress:
        task = progress.add_task(f"{detector}: files", total=len(files))

        def done(key: str) -> None:
            progress.update(task, description=f"{detector}: {key}")
            progress.advance(task)

        try:
            run = run_corpus(data, detector, cfg, jobs=jobs or None, on_file=done)
        except ValueError as e:  # a data file that cannot be read: its name and line
            raise typer.BadParameter(str(e), param_hint="--data") from None
    try:
        scores = score_run(run, windows)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--labels") from None
    write_results(run, windows, output)
    summary = {p: round(r.normalized, 4) for p, r in scores.items()}
    path = write_scores(
        output,
        summary,
        {
            "detector": run.detector,
            "config": cfg or {},
            "files": len(run.series),
            "points": run.points,
            "points_per_s_per_core": round(run.points_per_s),
            "wall_s": round(time.perf_counter() - t0, 2),
            "details": {p: dataclasses.asdict(r) for p, r in scores.items()},
        },
    )
    table = Table(title=f"NAB scores: {run.detector}, {len(run.series)} files")
    for col in ("profile", "score", "threshold", "windows detected", "rows firing outside"):
        table.add_column(col, justify="left" if col == "profile" else "right")
    for p, r in scores.items():
        table.add_row(
            p,
            f"{r.normalized:.2f}",
            f"{r.threshold:.4f}",
            f"{r.windows_detected}/{r.windows}",
            str(r.fp),
        )
    console.print(table)
    console.print(
        f"{run.points:,} points, {run.points_per_s:,.0f} points/s per core; "
        f"results in {output / run.detector}, scores in {path}"
    )
