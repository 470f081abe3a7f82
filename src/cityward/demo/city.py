"""The demo city's SUMO scenario, generated locally: a georeferenced network and a day of demand.

Two kinds of network:

* **a grid** (the default): SUMO's ``netgenerate`` builds ``rows`` x ``cols`` signalised
  junctions ``spacing`` m apart, two lanes per direction, left turns allowed (permissive, from
  the left lane), and a fringe edge attached to every outer junction so that traffic enters and
  leaves at the edge of the grid. ``netgenerate`` has no projection options, and ``netconvert
  --proj`` on a SUMO network only stamps the projection string on it (its ``origBoundary``
  stays cartesian and nothing centres the grid); a round trip through plain XML in lon/lat
  does project it, but rounds every node to 1e-6 degrees (junctions move by centimetres). So
  the ``<location>`` element of netgenerate's output is rewritten instead: a transverse
  Mercator projection centred on :data:`CENTRE` (Ghent's Korenmarkt) and a ``netOffset`` that
  puts the grid's centre there, ``origBoundary`` in lon/lat from the same projection's inverse
  (:func:`_tmerc_inverse`). SUMO's ``simulation.convertGeo`` then gives lon/lat for any network
  point (+x east, +y north), which is what :mod:`cityward.traffic.bankfeed` reads.
* **an OpenStreetMap extract** (``osm=``): ``netconvert`` turns it into a car network with its
  signals (from OSM's ``traffic_signals`` nodes), projected to UTM by netconvert itself.

Demand is a list of ``<trip>`` elements (SUMO routes them itself when they depart), ``hours``
hours long, following a weekday profile (quiet at night, peaks at 8:00 and 17:00; second 0 of
the simulation is midnight). Most trips cross the network from one fringe edge to another, the
rest start or end inside it. The peak rate is proportional to the network's size (its lane
kilometres): about 1,600 vehicles per hour on the default 4x4 grid, enough to keep the signals
busy without locking the grid up. Departures are a Poisson process thinned by the profile,
drawn from ``random.Random(seed)``: the same arguments give the same file.

:func:`build_city` is idempotent: ``city.json`` records the parameters and the file names, and
a second call with the same parameters returns the existing files at once. Everything is built
in a temporary folder and moved into place, ``city.json`` last, so an interrupted build is never
mistaken for a complete one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Ghent, Belgium: the demo grid is centred on its Korenmarkt (lon, lat). The same value as
# cityward.demo.CENTRE; kept here so that this module does not depend on the package's
# __init__ (which may import this module).
CENTRE = (3.7215, 51.0543)

FORMAT = 1  # version of city.json's layout and of the generator: a change rebuilds old cities
NET_NAME = "city.net.xml"
ROUTES_NAME = "city.rou.xml"
CFG_NAME = "city.sumocfg"
META_NAME = "city.json"

# Peak demand per lane kilometre of the car network (vehicles per hour). The default grid
# (4x4, 200 m, 2 lanes each way, 200 m fringe edges) has 29.3 lane km: 1,600 veh/h (its
# busiest hours see ~1,450 trips; the grid takes four times that without locking up).
PEAK_PER_LANE_KM = 55.0
INNER_SHARE = 0.25  # trips that start or end on an inner edge (the rest cross the network)

# Hourly demand as a fraction of the peak, for the hour starting at the index (the usual
# weekday shape of urban traffic counts: morning peak 8:00, evening peak 17:00).
PROFILE = (
    0.08, 0.05, 0.04, 0.04, 0.06, 0.15, 0.40, 0.80,
    0.98, 0.72, 0.56, 0.56, 0.62, 0.60, 0.60, 0.70,
    0.88, 1.00, 0.80, 0.56, 0.40, 0.30, 0.22, 0.14,
)  # fmt: skip

WGS84_A = 6378137.0
WGS84_F = 1 / 298.257223563


@dataclass(frozen=True)
class DemoCity:
    """A built scenario: its folder and files, and the simulated time span of its demand."""

    directory: Path
    net: Path  # georeferenced .net.xml
    routes: Path  # demand, .rou.xml
    sumocfg: Path  # names both; begin 0, end = hours * 3600
    begin: float
    end: float


def tmerc_proj(lon: float, lat: float) -> str:
    """A transverse Mercator projection (PROJ string) with its origin at ``lon``, ``lat``."""
    return (
        f"+proj=tmerc +lat_0={lat} +lon_0={lon} +k=1 +x_0=0 +y_0=0 +ellps=WGS84 +units=m +no_defs"
    )


def build_city(
    directory: Path,
    *,
    osm: Path | None = None,
    seed: int = 7,
    hours: float = 24.0,
    rows: int = 4,
    cols: int = 4,
    spacing: float = 200.0,
) -> DemoCity:
    """Build (or reuse) the demo city's network, demand and SUMO configuration in ``directory``.

    Without ``osm``, a ``rows`` x ``cols`` grid of signalised junctions ``spacing`` m apart,
    centred on :data:`CENTRE`; with it, the car network of that OpenStreetMap file (``rows``,
    ``cols`` and ``spacing`` are then unused). Raises ``RuntimeError`` when SUMO's tools are
    missing or fail, ``ValueError`` for an OSM file netconvert cannot use.
    """
    if hours <= 0:
        raise ValueError(f"hours must be positive, not {hours}")
    directory = Path(directory)
    params: dict[str, Any] = {"format": FORMAT, "seed": seed, "hours": float(hours)}
    if osm is not None:
        osm = Path(osm).resolve()
        if not osm.is_file():
            raise FileNotFoundError(f"OSM file {osm} does not exist")
        params["osm"] = {"path": str(osm), "sha256": _sha256(osm)}
    else:
        if rows < 2 or cols < 2 or rows > 26 or cols > 26:
            raise ValueError(f"a grid needs 2 to 26 rows and columns, not {rows}x{cols}")
        if spacing < 50:
            raise ValueError(f"junctions must be at least 50 m apart, not {spacing}")
        params["grid"] = {"rows": rows, "cols": cols, "spacing": float(spacing)}
    end = float(hours) * 3600.0
    city = DemoCity(
        directory, directory / NET_NAME, directory / ROUTES_NAME, directory / CFG_NAME, 0.0, end
    )
    if _existing_params(directory) == params and all(
        p.is_file() for p in (city.net, city.routes, city.sumocfg)
    ):
        return city

    directory.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=directory))
    try:
        net = work / NET_NAME
        if osm is not None:
            _osm_net(osm, net)
        else:
            _grid_net(net, rows, cols, spacing)
        demand = write_demand(net, work / ROUTES_NAME, seed=seed, end=end)
        (work / CFG_NAME).write_text(_sumocfg(NET_NAME, ROUTES_NAME, 0.0, end), encoding="utf-8")
        meta = {
            "params": params,
            "files": {"net": NET_NAME, "routes": ROUTES_NAME, "sumocfg": CFG_NAME},
            "begin": 0.0,
            "end": end,
            "demand": demand,
        }
        (work / META_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        # the old description goes first: between here and the last rename no city.json
        # claims files that are half replaced
        (directory / META_NAME).unlink(missing_ok=True)
        for name in (NET_NAME, ROUTES_NAME, CFG_NAME, META_NAME):
            os.replace(work / name, directory / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return city


def load_city(directory: Path) -> DemoCity:
    """The city described by ``directory/city.json`` (as :func:`build_city` left it)."""
    directory = Path(directory)
    meta = json.loads((directory / META_NAME).read_text(encoding="utf-8"))
    files = meta["files"]
    return DemoCity(
        directory,
        directory / files["net"],
        directory / files["routes"],
        directory / files["sumocfg"],
        float(meta["begin"]),
        float(meta["end"]),
    )


def city_params(city: DemoCity) -> dict[str, Any]:
    """The parameters a city was built with (from its ``city.json``; empty when it has none)."""
    params = _existing_params(city.directory)
    return params if params is not None else {}


def _existing_params(directory: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((directory / META_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    params = meta.get("params") if isinstance(meta, dict) else None
    return params if isinstance(params, dict) else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- SUMO's tools -----------------------------------------------------------------------------


def sumo_tool(name: str) -> str:
    """The path of a SUMO binary (``netgenerate``, ``netconvert``, ...): the eclipse-sumo
    package's, else the one beside this Python, else one on PATH."""
    candidates: list[Path] = []
    try:
        import sumo

        candidates.append(Path(sumo.SUMO_HOME) / "bin" / name)
    except ImportError:
        pass
    candidates.append(Path(sys.executable).parent / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"SUMO's {name} was not found (install the eclipse-sumo package)")
    return found


class ToolFailed(RuntimeError):
    """A SUMO tool ran and failed (its ``stderr`` says why)."""

    def __init__(self, cmd: Sequence[str], returncode: int, stderr: str) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"{' '.join(cmd)} failed (exit {returncode}): {self.stderr}")


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run a SUMO tool; ``RuntimeError`` with the command and its stderr when it fails."""
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"{' '.join(cmd)} could not run: {exc}") from exc
    if done.returncode != 0:
        raise ToolFailed(cmd, done.returncode, done.stderr)
    return done


# -- the grid ---------------------------------------------------------------------------------


def _grid_net(out: Path, rows: int, cols: int, spacing: float) -> None:
    """netgenerate's grid, then georeferenced around CENTRE."""
    _run(
        [
            sumo_tool("netgenerate"),
            "--grid",
            "--grid.x-number",
            str(cols),
            "--grid.y-number",
            str(rows),
            "--grid.length",
            f"{spacing:g}",
            # a fringe edge at every outer junction, as long as a block: vehicles enter and
            # leave there, and it holds a queue that spills back out of the grid
            "--grid.attach-length",
            f"{spacing:g}",
            "--default.lanenumber",
            "2",
            "--default.speed",
            "13.89",  # 50 km/h, a city street
            # signals where they are needed: the inner junctions (the fringe ends are
            # dead ends); SUMO's own fixed-time programs are the baseline
            "--tls.guess",
            "--tls.default-type",
            "static",
            "--tls.yellow.time",
            "3",
            "--no-turnarounds",
            "true",
            "--seed",
            "1",
            "--output.street-names",
            "false",
            "-o",
            str(out),
        ]
    )
    georeference(out, CENTRE)


_LOCATION = re.compile(rb"<location\b[^>]*/>")
_BOUNDARY = re.compile(rb'convBoundary="([^"]*)"')


def georeference(net: Path, centre: tuple[float, float]) -> None:
    """Put a cartesian network's centre on ``centre`` (lon, lat): rewrite its ``<location>``.

    The network's coordinates stay as they are; the projection (transverse Mercator with its
    origin at ``centre``) and a ``netOffset`` equal to the centre of ``convBoundary`` tell SUMO
    how they map to lon/lat (SUMO: network = projected + netOffset).
    """
    data = net.read_bytes()
    loc = _LOCATION.search(data)
    bnd = _BOUNDARY.search(loc.group(0)) if loc else None
    if loc is None or bnd is None:
        raise RuntimeError(f"{net}: no <location convBoundary=...> to georeference")
    x0, y0, x1, y1 = (float(v) for v in bnd.group(1).decode().split(","))
    ox, oy = (x0 + x1) / 2, (y0 + y1) / 2
    lon, lat = centre
    corners = [_tmerc_inverse(x - ox, y - oy, lon, lat) for x, y in ((x0, y0), (x1, y1))]
    # in a transverse Mercator the meridians converge slightly: take the outer corners' extent
    (w, s), (e, n) = corners
    element = (
        f'<location netOffset="{ox:.2f},{oy:.2f}" '
        f'convBoundary="{x0:.2f},{y0:.2f},{x1:.2f},{y1:.2f}" '
        f'origBoundary="{w:.6f},{s:.6f},{e:.6f},{n:.6f}" '
        f'projParameter="{tmerc_proj(lon, lat)}"/>'
    )
    _atomic_write_bytes(net, data[: loc.start()] + element.encode() + data[loc.end() :])


def _tmerc_inverse(x: float, y: float, lon0: float, lat0: float) -> tuple[float, float]:
    """(lon, lat) of a point ``x`` m east and ``y`` m north of the origin of a transverse
    Mercator projection (WGS84, scale 1) at ``lon0``, ``lat0`` (Snyder 1987, eqs. 8-12 to 8-25;
    millimetre accurate within tens of kilometres of the central meridian)."""
    a, f = WGS84_A, WGS84_F
    e2 = f * (2 - f)
    ep2 = e2 / (1 - e2)

    def meridian(phi: float) -> float:
        return a * (
            (1 - e2 / 4 - 3 * e2**2 / 64 - 5 * e2**3 / 256) * phi
            - (3 * e2 / 8 + 3 * e2**2 / 32 + 45 * e2**3 / 1024) * math.sin(2 * phi)
            + (15 * e2**2 / 256 + 45 * e2**3 / 1024) * math.sin(4 * phi)
            - (35 * e2**3 / 3072) * math.sin(6 * phi)
        )

    m = meridian(math.radians(lat0)) + y
    mu = m / (a * (1 - e2 / 4 - 3 * e2**2 / 64 - 5 * e2**3 / 256))
    e1 = (1 - math.sqrt(1 - e2)) / (1 + math.sqrt(1 - e2))
    phi1 = (
        mu
        + (3 * e1 / 2 - 27 * e1**3 / 32) * math.sin(2 * mu)
        + (21 * e1**2 / 16 - 55 * e1**4 / 32) * math.sin(4 * mu)
        + (151 * e1**3 / 96) * math.sin(6 * mu)
        + (1097 * e1**4 / 512) * math.sin(8 * mu)
    )
    sin1, cos1, tan1 = math.sin(phi1), math.cos(phi1), math.tan(phi1)
    c1 = ep2 * cos1**2
    t1 = tan1**2
    n1 = a / math.sqrt(1 - e2 * sin1**2)
    r1 = a * (1 - e2) / (1 - e2 * sin1**2) ** 1.5
    d = x / n1
    phi = phi1 - (n1 * tan1 / r1) * (
        d**2 / 2
        - (5 + 3 * t1 + 10 * c1 - 4 * c1**2 - 9 * ep2) * d**4 / 24
        + (61 + 90 * t1 + 298 * c1 + 45 * t1**2 - 252 * ep2 - 3 * c1**2) * d**6 / 720
    )
    lam = (
        d
        - (1 + 2 * t1 + c1) * d**3 / 6
        + (5 - 2 * c1 + 28 * t1 - 3 * c1**2 + 8 * ep2 + 24 * t1**2) * d**5 / 120
    ) / cos1
    return lon0 + math.degrees(lam), math.degrees(phi)


# -- OpenStreetMap ----------------------------------------------------------------------------


def _osm_net(osm: Path, out: Path) -> None:
    """netconvert's car network of an OSM file, projected to UTM."""
    cmd = [
        sumo_tool("netconvert"),
        "--osm-files",
        str(osm),
        "--keep-edges.by-vclass",
        "passenger",
        "--remove-edges.isolated",
        "--geometry.remove",
        "--ramps.guess",
        "--roundabouts.guess",
        "--junctions.join",
        # signals where OSM maps them, one per junction cluster; static programs (SUMO's
        # fixed-time plans are the baseline cityward's controllers are compared with)
        "--tls.guess-signals",
        "--tls.discard-simple",
        "--tls.join",
        "--tls.default-type",
        "static",
        "--tls.yellow.time",
        "3",
        "--proj.utm",
        "--output.street-names",
        "--seed",
        "1",
        "-o",
        str(out),
    ]
    try:
        _run(cmd)
    except ToolFailed as exc:
        raise ValueError(f"netconvert cannot build a network from {osm}: {exc.stderr}") from exc
    if not out.is_file() or b"<edge " not in out.read_bytes().replace(b'function="internal"', b""):
        raise ValueError(f"{osm}: no roads for cars in this OpenStreetMap file")


# -- demand -----------------------------------------------------------------------------------


@dataclass
class _Graph:
    entries: list[str]  # where trips come in (nothing but a turnaround leads to them)
    exits: list[str]  # where they leave (they lead nowhere but back)
    inner: list[str]  # the rest of the strongly connected core
    lane_km: float


def _graph(n: Any, net: Path) -> _Graph:
    """The car network's edges that trips can use (``n``: ``net`` read by sumolib), and where
    the network's edge is."""
    edges = {
        e.getID(): e
        for e in n.getEdges()
        if e.getFunction() != "internal" and e.allows("passenger")
    }
    succ: dict[str, set[str]] = {e: set() for e in edges}  # all connections
    pred: dict[str, set[str]] = {e: set() for e in edges}
    succ_nt: dict[str, set[str]] = {e: set() for e in edges}  # turnarounds left out
    pred_nt: dict[str, set[str]] = {e: set() for e in edges}
    for eid, e in edges.items():
        for to, conns in e.getOutgoing().items():
            tid = to.getID()
            if tid not in edges:
                continue
            ok = [c for c in conns if c.getToLane().allows("passenger")]
            if not ok:
                continue
            succ[eid].add(tid)
            pred[tid].add(eid)
            if any(c.getDirection() not in ("t", "T") for c in ok):
                succ_nt[eid].add(tid)
                pred_nt[tid].add(eid)
    core = max(_sccs(succ), key=len, default=[])
    if len(core) < 2:
        raise ValueError(f"{net}: the car network has no connected core to route trips in")
    core_set = set(core)
    sources = _closure(core_set, pred)  # edges from which the core can be reached
    sinks = _closure(core_set, succ)  # edges the core leads to
    entries = sorted(e for e in sources if not pred_nt[e])
    exits = sorted(e for e in sinks if not succ_nt[e])
    inner = sorted(core_set - set(entries) - set(exits))
    if len(entries) < 2 or len(exits) < 2:  # no boundary to speak of: anywhere to anywhere
        entries, exits = sorted(sources), sorted(sinks)
    if not inner:
        inner = sorted(core_set)
    used = sources | sinks
    lane_km = sum(
        edges[e].getLength() * sum(1 for ln in edges[e].getLanes() if ln.allows("passenger"))
        for e in used
    )
    return _Graph(entries, exits, inner, lane_km / 1000.0)


def _closure(start: set[str], nxt: dict[str, set[str]]) -> set[str]:
    seen = set(start)
    stack = list(start)
    while stack:
        for m in nxt[stack.pop()]:
            if m not in seen:
                seen.add(m)
                stack.append(m)
    return seen


def _sccs(succ: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(succ):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(succ[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, todo = work[-1]
            if todo:
                w = todo.pop()
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, sorted(succ[w])))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp: list[str] = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(comp)
    return out


def profile(t: float) -> float:
    """Demand at simulation time ``t`` (s after midnight) as a fraction of the peak: the hourly
    :data:`PROFILE`, linear between the middles of the hours, repeating every day."""
    h = (t / 3600.0 - 0.5) % 24.0
    k = int(h)
    frac = h - k
    return PROFILE[k] * (1 - frac) + PROFILE[(k + 1) % 24] * frac


def write_demand(net: Path, out: Path, *, seed: int, end: float) -> dict[str, Any]:
    """Trips from 0 to ``end`` s on ``net`` (see the module's description); returns a summary."""
    import sumolib

    n = sumolib.net.readNet(str(net))
    g = _graph(n, net)

    xmin, ymin, xmax, ymax = n.getBoundary()
    min_dist = min(300.0, 0.25 * math.hypot(xmax - xmin, ymax - ymin))
    # a trip goes from where its first edge starts to where its last edge ends
    starts = {e: n.getEdge(e).getFromNode().getCoord()[:2] for e in {*g.entries, *g.inner}}
    ends = {e: n.getEdge(e).getToNode().getCoord()[:2] for e in {*g.exits, *g.inner}}
    peak = PEAK_PER_LANE_KM * g.lane_km
    rng = random.Random(seed)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', "<routes>"]
    t = 0.0
    count = 0
    hourly = [0] * max(1, math.ceil(end / 3600.0))
    while True:
        t += rng.expovariate(peak / 3600.0)
        if t >= end:
            break
        if rng.random() >= profile(t):
            continue
        src, dst = _pair(rng, g, starts, ends, min_dist)
        lines.append(
            f'    <trip id="v{count}" depart="{t:.2f}" from="{src}" to="{dst}" '
            'departLane="best" departSpeed="max"/>'
        )
        hourly[int(t // 3600)] += 1
        count += 1
    lines.append("</routes>")
    _atomic_write_bytes(out, ("\n".join(lines) + "\n").encode())
    return {
        "trips": count,
        "peak_per_hour": round(peak, 1),
        "lane_km": round(g.lane_km, 2),
        "per_hour": hourly,
    }


def _pair(
    rng: random.Random,
    g: _Graph,
    starts: dict[str, Sequence[float]],
    ends: dict[str, Sequence[float]],
    min_dist: float,
) -> tuple[str, str]:
    """An origin and a destination edge at least ``min_dist`` apart (best of a few draws)."""
    best: tuple[float, str, str] | None = None
    for _ in range(8):
        r = rng.random()
        if r < 1 - INNER_SHARE:
            src, dst = rng.choice(g.entries), rng.choice(g.exits)
        elif r < 1 - INNER_SHARE / 2:
            src, dst = rng.choice(g.inner), rng.choice(g.exits)
        else:
            src, dst = rng.choice(g.entries), rng.choice(g.inner)
        if src == dst:
            continue
        (ax, ay), (bx, by) = starts[src], ends[dst]
        d = math.hypot(ax - bx, ay - by)
        if d >= min_dist:
            return src, dst
        if best is None or d > best[0]:
            best = (d, src, dst)
    if best is None:
        return g.entries[0], g.exits[-1]
    return best[1], best[2]


def _sumocfg(net: str, routes: str, begin: float, end: float) -> str:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<configuration>
    <input>
        <net-file value="{net}"/>
        <route-files value="{routes}"/>
    </input>
    <time>
        <begin value="{begin:g}"/>
        <end value="{end:g}"/>
    </time>
</configuration>
"""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
