"""How much of the others' delay change with emergency vehicles is preemption, and how much is
what adding any vehicle does to a simulation.

The traffic bench compares, per seed, the others' average delay with emergency vehicles against
the same seed without them. SUMO is chaotic near capacity: a few extra vehicles shift every later
decision and random draw, and the others' delay moves by several percent either way whatever
the signals do. This script measures that floor. Per scenario and seed it runs:

- *base*: the scenario alone;
- *emergency*: plus ``--ev-per-hour`` emergency runs, preempted for (as in the bench);
- *as cars*: the same runs, same departures and routes, driven as ordinary cars, no preemption.

It prints, per scenario, the others' delay change against *base* for both (median and mean over
``--seeds``, and the median over the first three seeds, the bench's protocol) and writes
``bench/results/ev_noise.json``.

    .venv/bin/python bench/ev_noise.py --scenario ingolstadt7 --scenario cologne8 --seeds 1-10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from cityward.traffic.bench import find_scenarios, run_one

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "traffic"
VARIANTS = ("base", "emergency", "as cars")


def seeds_of(text: str) -> list[int]:
    """``1-10`` or ``1,2,3``."""
    if "-" in text:
        a, b = text.split("-", 1)
        return list(range(int(a), int(b) + 1))
    return [int(x) for x in text.split(",")]


def job(args: tuple[Path, str, str, int, str, float, Path]) -> tuple[str, int, str, float]:
    root, scenario, controller, seed, variant, per_hour, out = args
    sc = find_scenarios(root)[scenario]
    row = run_one(
        sc,
        controller,
        seed,
        out / scenario / variant.replace(" ", "_") / str(seed),
        ev_per_hour=0.0 if variant == "base" else per_hour,
        ev_as_cars=variant == "as cars",
    )
    return scenario, seed, variant, float(row["avg_delay_s"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scenario", action="append", help="repeatable (default: every scenario)")
    ap.add_argument("--scenarios", type=Path, default=SHARED)
    ap.add_argument("--controller", default="adaptive")
    ap.add_argument("--seeds", default="1-10")
    ap.add_argument("--ev-per-hour", type=float, default=6.0)
    ap.add_argument("--jobs", type=int, default=2, help="simulations in parallel (processes)")
    args = ap.parse_args()
    if not args.scenarios.is_dir():
        print(f"no scenarios at {args.scenarios} (pass --scenarios DIR)", file=sys.stderr)
        return 2
    found = find_scenarios(args.scenarios)
    names = args.scenario or sorted(found)
    unknown = [n for n in names if n not in found]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    seeds = seeds_of(args.seeds)
    delay: dict[tuple[str, int, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [
            (args.scenarios, n, args.controller, sd, v, args.ev_per_hour, Path(tmp))
            for n in names
            for sd in seeds
            for v in VARIANTS
        ]
        with Progress() as progress, Pool(args.jobs, maxtasksperchild=1) as pool:
            task = progress.add_task("simulations", total=len(jobs))
            for scenario, seed, variant, d in pool.imap_unordered(job, jobs):
                delay[(scenario, seed, variant)] = d
                progress.advance(task)
    table = Table(
        title=f"others' delay change against the same seed alone, {args.ev_per_hour:g} runs/h, "
        f"seeds {args.seeds}"
    )
    table.add_column("scenario", no_wrap=True)
    for v in ("EVs", "as cars"):
        for what in ("median", "mean", "med 1-3"):
            table.add_column(f"{v} {what}", justify="right")
    out: list[dict[str, Any]] = []
    for n in names:
        row: dict[str, Any] = {"scenario": n, "controller": args.controller, "seeds": seeds}
        cells = [n]
        for v in VARIANTS[1:]:
            ch = [100.0 * (delay[(n, sd, v)] / delay[(n, sd, "base")] - 1.0) for sd in seeds]
            first = ch[:3]
            stats = {
                "median_pct": statistics.median(ch),
                "mean_pct": statistics.mean(ch),
                "median_first3_pct": statistics.median(first),
                "per_seed_pct": ch,
            }
            row[v.replace(" ", "_")] = stats
            cells += [f"{stats[k]:+.1f}%" for k in ("median_pct", "mean_pct", "median_first3_pct")]
        row["base_delay_s"] = [delay[(n, sd, "base")] for sd in seeds]
        out.append(row)
        table.add_row(*cells)
    Console().print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ev_noise.json").write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
