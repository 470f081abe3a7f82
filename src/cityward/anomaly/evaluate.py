"""``cityward anomaly nab``: run a detector over a NAB-layout corpus and score it.

The corpus is a folder of ``<category>/<name>.csv`` files (``timestamp,value``). Every file gets
a fresh detector that sees its values one at a time, in order (the streaming contract). Results
are written in NAB's results layout, ``OUT/<detector>/<category>/<detector>_<name>.csv`` with
``timestamp,value,anomaly_score,label``, so NAB's own scorer can read them too, and our scorer's
figures go to ``OUT/scores.json``.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from cityward.anomaly.detectors import DEFAULT, create, load_builtin

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


@dataclass(frozen=True)
class Series:
    key: str  # "<category>/<name>.csv", as in NAB's label files
    timestamps: list[datetime]
    values: np.ndarray


def find_files(data: Path) -> list[Path]:
    """Every ``<category>/<name>.csv`` under ``data``, sorted."""
    files = sorted(p for p in data.glob("*/*.csv") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no <category>/<name>.csv files under {data}")
    return files


def read_series(path: Path, key: str) -> Series:
    """A NAB data file: header ``timestamp,value``, one row per time."""
    stamps: list[datetime] = []
    values: list[float] = []
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["timestamp", "value"]:
            raise ValueError(f"{path}: the header must be 'timestamp,value', not {header}")
        for n, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                stamp = datetime.fromisoformat(row[0]).replace(tzinfo=UTC)
                value = float(row[1])
            except (ValueError, IndexError) as e:
                raise ValueError(f"{path}, line {n}: {e}") from None
            if not math.isfinite(value):  # one nan poisoned every detector for the rest
                raise ValueError(f"{path}, line {n}: the value {row[1]!r} is not a number")
            stamps.append(stamp)
            values.append(value)
    return Series(key, stamps, np.asarray(values, dtype=float))


def run_series(series: Series, detector: str, config: dict[str, Any] | None) -> np.ndarray:
    """Scores of a fresh detector fed the series one value at a time."""
    d = create(detector, config)
    out = np.empty(len(series.values))
    for i, (ts, x) in enumerate(zip(series.timestamps, series.values.tolist(), strict=True)):
        out[i] = d.process(x, ts.timestamp())
    return out


def _run_file(
    args: tuple[Path, str, str, dict[str, Any] | None],
) -> tuple[Series, np.ndarray, float]:
    path, key, detector, config = args
    series = read_series(path, key)
    t0 = time.process_time()
    scores = run_series(series, detector, config)
    return series, scores, time.process_time() - t0


@dataclass
class CorpusRun:
    detector: str
    series: list[Series]
    scores: list[np.ndarray]
    cpu_s: float  # detector CPU time, all files

    @property
    def points(self) -> int:
        return sum(len(s.values) for s in self.series)

    @property
    def points_per_s(self) -> float:
        return self.points / self.cpu_s if self.cpu_s > 0 else float("inf")


def run_corpus(
    data: Path,
    detector: str = "default",
    config: dict[str, Any] | None = None,
    *,
    jobs: int | None = None,
    on_file: Callable[[str], None] | None = None,
) -> CorpusRun:
    """Run ``detector`` over every file of the corpus (``jobs`` processes in parallel)."""
    load_builtin()
    name = DEFAULT if detector == "default" else detector
    create(name, config)  # fail on a bad name or config before starting workers
    files = find_files(data)
    args = [(p, f"{p.parent.name}/{p.name}", name, config) for p in files]
    jobs = jobs or os.cpu_count() or 1
    results: dict[str, tuple[Series, np.ndarray, float]] = {}
    if jobs == 1:
        for a in args:
            results[a[1]] = _run_file(a)
            if on_file:
                on_file(a[1])
    else:
        with ProcessPoolExecutor(jobs) as pool:
            for a, r in zip(args, pool.map(_run_file, args), strict=True):
                results[a[1]] = r
                if on_file:
                    on_file(a[1])
    keys = [a[1] for a in args]
    return CorpusRun(
        name,
        [results[k][0] for k in keys],
        [results[k][1] for k in keys],
        sum(results[k][2] for k in keys),
    )


def write_results(
    run: CorpusRun, windows: dict[str, list[tuple[datetime, datetime]]], out: Path
) -> list[Path]:
    """The result CSVs in NAB's layout; returns their paths."""
    from cityward.anomaly.nab import labels_for

    written = []
    for s, scores in zip(run.series, run.scores, strict=True):
        category, fname = s.key.split("/", 1)
        path = out / run.detector / category / f"{run.detector}_{fname}"
        path.parent.mkdir(parents=True, exist_ok=True)
        labels = labels_for(s.timestamps, windows.get(s.key, []))
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["timestamp", "value", "anomaly_score", "label"])
            for ts, v, sc, lb in zip(
                s.timestamps, s.values.tolist(), scores.tolist(), labels.tolist(), strict=True
            ):
                w.writerow([ts.strftime(TIME_FORMAT), repr(v), f"{sc:.6f}", int(lb)])
        tmp.replace(path)  # never a half-written result file
        written.append(path)
    return written


def score_run(
    run: CorpusRun, windows: dict[str, list[tuple[datetime, datetime]]]
) -> dict[str, Any]:
    """NAB scores (three profiles) of a run, with the details of each."""
    from cityward.anomaly.nab import FileScores, score_corpus

    missing = [s.key for s in run.series if s.key not in windows]
    if missing:
        raise ValueError(f"no label entry for {len(missing)} files, e.g. {missing[:3]}")
    files = [
        FileScores(s.key, s.timestamps, sc) for s, sc in zip(run.series, run.scores, strict=True)
    ]
    return score_corpus(files, windows)


def write_scores(out: Path, scores: dict[str, Any], extra: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scores.json"
    path.write_bytes(orjson.dumps({**scores, **extra}, option=orjson.OPT_INDENT_2))
    return path


__all__: Sequence[str] = ["CorpusRun", "Series", "find_files", "read_series", "run_corpus"]
