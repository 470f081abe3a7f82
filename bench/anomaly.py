"""NAB scores and throughput of every registered anomaly detector, in one table.

For each detector (``--detector``, repeatable; default: all registered) it runs the NAB corpus
(``--data``, default ../shared/data/nab/data; labels ``--labels``) through
``cityward.anomaly.evaluate``, one fresh detector per file, and scores the three NAB profiles
with ``cityward.anomaly.nab``. Throughput is measured apart, in one process on one core: each
detector's ``process`` over every file's values, ``--rounds`` times; the table gives the median
points per second (detector work only; reading the CSV files is not counted).

    .venv/bin/python bench/anomaly.py [--detector ensemble] [--rounds 3] [--output DIR]

Writes DIR/anomaly.json (default bench-results/anomaly.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from cityward.anomaly.cli import default_nab
from cityward.anomaly.detectors import create, load_builtin
from cityward.anomaly.evaluate import find_files, read_series, run_corpus, score_run
from cityward.anomaly.nab import load_windows


def throughput(name: str, series: list[tuple[list[float], list[float]]]) -> float:
    """Points per second of one detector on one core, all files once."""
    points = sum(len(v) for v, _ in series)
    t0 = time.perf_counter()
    for values, times in series:
        d = create(name)
        p = d.process
        for x, t in zip(values, times, strict=True):
            p(x, t)
    return points / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--detector", action="append", help="detector (repeatable; default: all)")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--labels", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=0, help="processes for the NAB runs (0: cores)")
    ap.add_argument("--output", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    root = default_nab()
    data = args.data or root / "data"
    labels = args.labels or root / "labels" / "combined_windows.json"
    if not data.is_dir() or not labels.is_file():
        print(f"NAB data not found ({data}, {labels}); pass --data and --labels", file=sys.stderr)
        return 2
    names = args.detector or sorted(load_builtin())
    windows = load_windows(labels)
    files = find_files(data)
    loaded = []
    for p in files:
        s = read_series(p, f"{p.parent.name}/{p.name}")
        loaded.append((s.values.tolist(), [ts.timestamp() for ts in s.timestamps]))
    console = Console()
    rows = []
    for name in names:
        run = run_corpus(data, name, jobs=args.jobs or None)
        scores = score_run(run, windows)
        rates = [throughput(name, loaded) for _ in range(args.rounds)]
        rows.append(
            {
                "detector": name,
                "files": len(run.series),
                "points": run.points,
                **{p: round(r.normalized, 2) for p, r in scores.items()},
                "windows": scores["standard"].windows,
                "windows_detected": scores["standard"].windows_detected,
                "threshold": scores["standard"].threshold,
                "points_per_s_per_core": round(statistics.median(rates)),
                "rounds": [round(r) for r in rates],
            }
        )
        console.print(f"{name}: done")
    title = f"NAB ({len(files)} files), our scorer; throughput: median of {args.rounds}"
    table = Table(title=title)
    cols = ["detector", "standard", "reward_low_FP", "reward_low_FN", "detected", "points/s/core"]
    for c in cols:
        table.add_column(c, justify="left" if c == "detector" else "right")
    for r in rows:
        table.add_row(
            r["detector"],
            f"{r['standard']:.2f}",
            f"{r['reward_low_FP']:.2f}",
            f"{r['reward_low_FN']:.2f}",
            f"{r['windows_detected']}/{r['windows']}",
            f"{r['points_per_s_per_core']:,}",
        )
    console.print(table)
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / "anomaly.json"
    out.write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    console.print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
