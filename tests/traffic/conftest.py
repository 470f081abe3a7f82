"""A small real SUMO network (a 3x3 grid of signalised junctions) with random demand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cityward.traffic.sumo import sumo_binary


def build_grid(
    folder: Path,
    seed: int = 7,
    period: float = 1.2,
    end: int = 900,
    *,
    number: int = 3,
    lanes: int = 2,
    layout: str = "opposites",
) -> Path:
    """netgenerate + randomTrips: a ``number`` x ``number`` grid with traffic lights (``layout``
    "incoming": a green phase of its own for each approach); returns its .sumocfg."""
    import sumo

    folder.mkdir(parents=True, exist_ok=True)
    net = folder / "grid.net.xml"
    subprocess.run(
        [
            sumo_binary("netgenerate"),
            "--grid",
            "--grid.number",
            str(number),
            "--grid.length",
            "150",
            "--grid.attach-length",
            "100",
            "--default-junction-type",
            "traffic_light",
            "--tls.yellow.time",
            "3",
            "--tls.layout",
            layout,
            "--default.lanenumber",
            str(lanes),
            "--no-turnarounds",
            "true",
            "-o",
            str(net),
        ],
        check=True,
        capture_output=True,
    )
    routes = folder / "grid.rou.xml"
    subprocess.run(
        [
            sys.executable,
            str(Path(sumo.SUMO_HOME) / "tools" / "randomTrips.py"),
            "-n",
            str(net),
            "-r",
            str(routes),
            "-o",
            str(folder / "trips.xml"),
            "-e",
            str(end),
            "-p",
            str(period),
            "--seed",
            str(seed),
            "--fringe-factor",
            "100",
            "--min-distance",
            "300",
            "--validate",
        ],
        check=True,
        capture_output=True,
    )
    cfg = folder / "grid.sumocfg"
    cfg.write_text(
        f"""<configuration>
  <input><net-file value="{net.name}"/><route-files value="{routes.name}"/></input>
  <time><begin value="0"/><end value="{end}"/></time>
</configuration>
"""
    )
    return cfg


@pytest.fixture(scope="session")
def grid_cfg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_grid(tmp_path_factory.mktemp("grid"))
