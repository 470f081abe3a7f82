"""The cost of control: cityward's loop (libsumo, safety guards, a controller, preemption
checks) against SUMO running the same scenario alone with its own fixed programs.

For each scenario, alternating order, ``--rounds`` times:

- *bare*: the ``sumo`` binary on the scenario, with the same options and outputs as the bench
  (tripinfo with emissions), no TraCI;
- *cityward*: ``cityward.traffic.bench.run_one`` with the controller (SUMO in process through
  libsumo, every step through the control loop).

It reports median wall times, their ratio (target: under 5x on ingolstadt21) and the median
time a controller takes per intersection per decision (target: under 1 ms).

    .venv/bin/python bench/traffic_cost.py [--scenario ingolstadt21] [--controller adaptive]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from cityward.traffic.bench import find_scenarios, run_one
from cityward.traffic.sumo import scenario_args, sumo_binary

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "traffic"


def bare(cfg: Path, seed: int, out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sumo_binary(), *scenario_args(cfg, seed, out)], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", action="append", help="repeatable; default ingolstadt21")
    ap.add_argument("--controller", default="adaptive")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scenarios", type=Path, default=SHARED)
    args = ap.parse_args()
    if not args.scenarios.is_dir():
        sys.exit(f"no scenarios at {args.scenarios}")
    found = find_scenarios(args.scenarios)
    names = args.scenario or ["ingolstadt21"]
    console = Console()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            sc = found[name]
            walls: dict[str, list[float]] = {"bare": [], "cityward": []}
            decide: list[float] = []
            for r in range(args.rounds):
                order = ["bare", "cityward"] if r % 2 == 0 else ["cityward", "bare"]
                for kind in order:
                    out = Path(tmp) / f"{name}-{kind}-{r}"
                    if kind == "bare":
                        walls[kind].append(bare(sc.cfg, 1, out))
                    else:
                        t0 = time.perf_counter()
                        row = run_one(sc, args.controller, 1, out)
                        walls[kind].append(time.perf_counter() - t0)
                        decide.append(row["_decide_ms_per_intersection"])
                console.print(
                    f"{name} round {r + 1}: bare {walls['bare'][-1]:.1f} s, "
                    f"cityward {walls['cityward'][-1]:.1f} s"
                )
            b = statistics.median(walls["bare"])
            c = statistics.median(walls["cityward"])
            rows.append(
                {
                    "scenario": name,
                    "controller": args.controller,
                    "bare_sumo_s": round(b, 2),
                    "cityward_s": round(c, 2),
                    "ratio": round(c / b, 2),
                    "decide_ms_per_intersection": round(statistics.median(decide), 4),
                    "rounds": args.rounds,
                }
            )
    table = Table(title=f"cost of control ({args.controller}), median of {args.rounds}")
    for col in ("scenario", "bare SUMO s", "cityward s", "ratio", "ms/intersection/decision"):
        table.add_column(col, justify="left" if col == "scenario" else "right")
    for row in rows:
        table.add_row(
            str(row["scenario"]),
            f"{row['bare_sumo_s']:.1f}",
            f"{row['cityward_s']:.1f}",
            f"{row['ratio']:.2f}x",
            f"{row['decide_ms_per_intersection']:.3f}",
        )
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "traffic_cost.json"
    path.write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    console.print(f"written: {path}")


if __name__ == "__main__":
    main()
