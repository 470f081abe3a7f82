"""End-to-end benchmark of the cityward data bank over HTTP, on SQLite and/or PostgreSQL.

For each backend it starts ``cityward serve`` as a subprocess on a free port with a fresh data
folder (PostgreSQL: a fresh database ``cityward_bench_<random>``, dropped afterwards), loads N
TrafficFlowObserved-like entities through batch upsert with two concurrent keep-alive
connections, then measures GET by id, a type+q query, a geo ``near`` query and the server's
resident memory. Every figure is computed from the samples taken in this run.

    .venv/bin/python bench/bank.py                 # both backends, 100,000 entities
    .venv/bin/python bench/bank.py --quick         # 10,000 entities, a fast check
    .venv/bin/python bench/bank.py --backend sqlite --py-spy

See bench/README.md.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime as dt
import math
import os
import platform
import queue
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
import psutil
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
API = "/ngsi-ld/v1"
ENTITY_TYPE = "TrafficFlowObserved"
ID_PREFIX = f"urn:ngsi-ld:{ENTITY_TYPE}:bench-"
ATTRS_PER_ENTITY = 5
BATCH_SIZE = 1000
LOAD_CONNECTIONS = 2
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"

# The city: a ~20 x 20 km square centred on Ghent (lon, lat).
CENTER_LON, CENTER_LAT = 3.7250, 51.0540
SIDE_KM = 20.0
KM_PER_DEG_LAT = 111.32
HALF_LAT = SIDE_KM / 2 / KM_PER_DEG_LAT
HALF_LON = SIDE_KM / 2 / (KM_PER_DEG_LAT * math.cos(math.radians(CENTER_LAT)))

INTENSITY_MAX = 2400  # vehicles/hour, uniform in [0, INTENSITY_MAX)
LANES = 4  # laneId uniform in 1..LANES, so laneId==2 keeps a quarter
NEAR_M = 500
MAX_FAILURES = 10  # failed requests of one kind before that kind is given up

# Targets (printed next to the figures).
T_UPSERT_VALUES_S = 50_000.0
T_GET_P99_MS = 5.0
T_Q_P99_MS = 20.0
T_GEO_P99_MS = 30.0
T_RSS_MB = 300.0
T_RSS_AT = 100_000

console = Console()


# -- data --------------------------------------------------------------------------------------
def entity_id(n: int) -> str:
    return f"{ID_PREFIX}{n:08d}"


def make_entity(n: int, rng: random.Random) -> dict[str, Any]:
    """One TrafficFlowObserved-like entity with five attributes."""
    lon = CENTER_LON + rng.uniform(-HALF_LON, HALF_LON)
    lat = CENTER_LAT + rng.uniform(-HALF_LAT, HALF_LAT)
    observed = dt.datetime(2024, 5, 1, tzinfo=dt.UTC) + dt.timedelta(
        seconds=rng.randrange(0, 30 * 86400)
    )
    return {
        "id": entity_id(n),
        "type": ENTITY_TYPE,
        "intensity": {"type": "Property", "value": rng.randrange(INTENSITY_MAX)},
        "occupancy": {"type": "Property", "value": round(rng.random(), 4)},
        "averageVehicleSpeed": {
            "type": "Property",
            "value": round(rng.uniform(5.0, 90.0), 1),
            "unitCode": "KMH",
            "observedAt": observed.strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "laneId": {"type": "Property", "value": rng.randint(1, LANES)},
        "location": {
            "type": "GeoProperty",
            "value": {"type": "Point", "coordinates": [round(lon, 6), round(lat, 6)]},
        },
    }


def make_batch(index: int, total: int, seed: int) -> bytes:
    """The JSON body of batch ``index``: deterministic whatever order batches are sent in."""
    rng = random.Random(seed * 1_000_003 + index)
    start = index * BATCH_SIZE
    stop = min(start + BATCH_SIZE, total)
    return orjson.dumps([make_entity(n, rng) for n in range(start, stop)])


@dataclass
class Dataset:
    """What the checks need of the loaded entities, regenerated from the same seeds."""

    lon: list[float]
    lat: list[float]
    intensity: list[int]
    lane: list[int]
    # intensities of the laneId==2 entities, sorted: the type+q answer size by bisection
    lane2_sorted: list[int] = field(default_factory=list)
    # ~NEAR_M-sized grid cells -> entity numbers, for the geo check
    grid: dict[tuple[int, int], list[int]] = field(default_factory=dict)

    @classmethod
    def build(cls, total: int, seed: int) -> Dataset:
        ds = cls([], [], [], [])
        for index in range(math.ceil(total / BATCH_SIZE)):
            rng = random.Random(seed * 1_000_003 + index)
            for n in range(index * BATCH_SIZE, min((index + 1) * BATCH_SIZE, total)):
                e = make_entity(n, rng)
                lon, lat = e["location"]["value"]["coordinates"]
                ds.lon.append(lon)
                ds.lat.append(lat)
                ds.intensity.append(e["intensity"]["value"])
                ds.lane.append(e["laneId"]["value"])
                ds.grid.setdefault(ds.cell(lon, lat), []).append(n)
        ds.lane2_sorted = sorted(i for i, ln in zip(ds.intensity, ds.lane, strict=True) if ln == 2)
        return ds

    @staticmethod
    def cell(lon: float, lat: float) -> tuple[int, int]:
        return (math.floor(lon / (HALF_LON / 20)), math.floor(lat / (HALF_LAT / 20)))

    def q_matches(self, x: int) -> int:
        """How many entities have intensity > x and laneId == 2."""
        return len(self.lane2_sorted) - bisect.bisect_right(self.lane2_sorted, x)

    def near_counts(self, lon: float, lat: float, slack_m: float = 1.0) -> tuple[int, int]:
        """(surely within NEAR_M, possibly within NEAR_M) by haversine, +- slack_m."""
        cx, cy = self.cell(lon, lat)
        sure = maybe = 0
        for gx in range(cx - 1, cx + 2):
            for gy in range(cy - 1, cy + 2):
                for n in self.grid.get((gx, gy), ()):
                    d = haversine_m(lon, lat, self.lon[n], self.lat[n])
                    sure += d <= NEAR_M - slack_m
                    maybe += d <= NEAR_M + slack_m
        return sure, maybe


def haversine_m(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6_371_008.8 * math.asin(math.sqrt(a))


def random_point(rng: random.Random) -> tuple[float, float]:
    return (
        round(CENTER_LON + rng.uniform(-HALF_LON, HALF_LON), 6),
        round(CENTER_LAT + rng.uniform(-HALF_LAT, HALF_LAT), 6),
    )


def intensity_threshold(rng: random.Random) -> int:
    """X for ``intensity>X``: the fraction of entities kept is log-uniform in [1/MAX, 1]."""
    frac = math.exp(rng.uniform(math.log(1.0 / INTENSITY_MAX), 0.0))
    return max(-1, min(INTENSITY_MAX - 2, round(INTENSITY_MAX * (1.0 - frac)) - 1))


# -- statistics --------------------------------------------------------------------------------
def percentile(samples: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile (as numpy's default) of unsorted samples."""
    if not samples:
        return math.nan
    data = sorted(samples)
    pos = (len(data) - 1) * pct / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def latency_summary(ms: Sequence[float]) -> dict[str, float | int]:
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else math.nan,
        "mean_ms": statistics.fmean(ms) if ms else math.nan,
    }


# -- the server --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def cpu_s(self) -> float:
        """User + system CPU seconds used so far by the server process and any children."""
        proc = psutil.Process(self.proc.pid)
        t = proc.cpu_times()
        total = t.user + t.system
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                ct = child.cpu_times()
                total += ct.user + ct.system
        return total

    def rss_mb(self, file_backed: bool = True) -> float:
        """Resident memory of the server process and any children, in MB (10^6 bytes).

        ``file_backed=False`` leaves out resident pages shared with files (Linux ``shared``:
        e.g. SQLite's memory-mapped database), which the kernel can drop at will.
        """
        total = 0
        procs = [psutil.Process(self.proc.pid)]
        with contextlib.suppress(psutil.Error):
            procs += procs[0].children(recursive=True)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                mem = proc.memory_info()
                total += mem.rss - (0 if file_backed else getattr(mem, "shared", 0))
        return total / 1e6


def own_cpu_s() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores together) since boot."""
    t = psutil.cpu_times()
    return (
        t.user
        + t.system
        + getattr(t, "nice", 0.0)
        + getattr(t, "irq", 0.0)
        + getattr(t, "softirq", 0.0)
    )


def pg_backend_cpu_s(dbname: str) -> dict[int, float]:
    """CPU seconds of each PostgreSQL backend process serving ``dbname`` (by process title)."""
    out: dict[int, float] = {}
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        with contextlib.suppress(psutil.Error, TypeError):
            title = " ".join(proc.info["cmdline"] or ())
            if title.startswith("postgres:") and f" {dbname} " in title:
                t = proc.info["cpu_times"]
                out[proc.pid] = t.user + t.system
    return out


def pg_cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two snapshots (backends that started in between count in full)."""
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


def stop_server(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> str:
    """SIGINT, then SIGKILL after ``grace_s``; says how it ended."""
    if proc.poll() is not None:
        return f"already exited ({proc.returncode})"
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
        return f"stopped by SIGINT ({proc.returncode})"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "killed after SIGINT timed out"


# Headers every request to the server carries: an operator token when governance is on.
AUTH: dict[str, str] = {}


def governance_setup(
    workdir: Path, data_dir: Path, database_url: str | None, on: bool, role: str = "operator"
) -> list[str]:
    """Server options for a governed run (a token of ``role``) or an ungoverned baseline."""
    AUTH.clear()
    # The generated data is dated 2024: the retention scheduler (a run 30 s after the start)
    # would delete it under the demo catalog's 1-year retention in the middle of the run.
    if on:
        config = workdir / "governed.toml"
        config.write_text("[governance]\nretention_enabled = false\n")
    if not on:
        # the baseline: no authentication and no audit trail (allowed only together)
        config = workdir / "baseline.toml"
        config.write_text(
            "no_auth = true\n[governance]\naudit = false\nretention_enabled = false\n"
        )
        return ["--config", str(config)]
    cmd = [
        sys.executable,
        "-m",
        "cityward.cli",
        "token",
        "create",
        "--role",
        role,
        *(["--purpose", "traffic-management"] if role != "admin" else []),
        "--data-dir",
        str(data_dir),
    ]
    if database_url:
        cmd += ["--database-url", database_url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120)
    AUTH["Authorization"] = "Bearer " + out.stdout.strip().splitlines()[-1]
    return ["--config", str(config)]


@contextlib.contextmanager
def running_server(
    workdir: Path,
    database_url: str | None,
    workers: int = 1,
    startup_timeout_s: float = 60.0,
    governance: bool = True,
    role: str = "operator",
) -> Iterator[Server]:
    port = free_port()
    data_dir = workdir / "data"
    data_dir.mkdir()
    log_path = workdir / "server.log"
    extra = governance_setup(workdir, data_dir, database_url, governance, role)
    cmd = [
        sys.executable,
        "-m",
        "cityward.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--log-level",
        "warning",
    ]
    if database_url:
        cmd += ["--database-url", database_url]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    cmd += extra
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log:
        # Its own session: a Ctrl-C on the terminal reaches us, and we stop it in order.
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_ready(server, startup_timeout_s)
        yield server
    finally:
        how = stop_server(proc)
        console.print(f"  server {how}")


def wait_ready(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    url = f"{server.base_url}{API}/entities"
    params = {"type": ENTITY_TYPE, "limit": "1"}
    with httpx.Client(timeout=2.0, headers=AUTH) as client:
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited ({server.proc.returncode}) before answering:\n"
                    + server.log_tail()
                )
            try:
                if client.get(url, params=params).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer in {timeout_s:.0f} s")
            time.sleep(0.1)


# -- PostgreSQL --------------------------------------------------------------------------------
def with_dbname(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


@contextlib.contextmanager
def fresh_pg_database(admin_url: str, keep: bool = False) -> Iterator[str]:
    import psycopg

    name = f"cityward_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_dbname(admin_url, name)
    finally:
        if keep:
            console.print(f"  kept database {name} (--keep): DROP DATABASE {name} when done")
        else:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            console.print(f"  dropped database {name}")


# -- py-spy ------------------------------------------------------------------------------------
class Profiler:
    """Optional ``py-spy record`` of the server, one raw (collapsed) profile per phase."""

    def __init__(self, exe: str | None, pid: int, outdir: Path, rate: int) -> None:
        self.exe = exe
        self.pid = pid
        self.outdir = outdir
        self.rate = rate
        self.reports: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.exe is None:
            yield
            return
        out = self.outdir / f"pyspy-{name}.txt"
        cmd = [
            self.exe,
            "record",
            "--pid",
            str(self.pid),
            "--rate",
            str(self.rate),
            "--format",
            "raw",
            "--output",
            str(out),
            "--threads",
            "--full-filenames",
            "--nonblocking",
        ]
        rec = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        time.sleep(0.5)  # let it attach
        try:
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                rec.send_signal(signal.SIGINT)
            try:
                _, err = rec.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                rec.kill()
                _, err = rec.communicate()
            if out.exists():
                self.reports[name] = summarize_profile(out.read_text(errors="replace"))
                self.reports[name]["file"] = str(out)
            else:
                console.print(f"  [yellow]py-spy wrote no profile:[/] {err.decode()[-500:]}")


def _frame(frame: str, line: bool) -> tuple[str, bool]:
    """``func (/x/y/file.py:123)`` -> (``func (y/file.py[:123])``, is it cityward's code)."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file, _, lineno = where.rpartition(":")
    if not file:
        file, lineno = where, ""
    ours = "/cityward/" in file
    if ours:
        short = "cityward/" + file.rsplit("/cityward/", 1)[1]
    else:
        short = "/".join(file.split("/")[-2:])
    if line and lineno:
        short += f":{lineno}"
    return (f"{name} ({short})" if short else name), ours


def summarize_profile(raw: str, top: int = 15) -> dict[str, Any]:
    """Top frames from py-spy's raw (collapsed) output.

    ``top_own``: leaf frames by line (where the samples were taken); ``top_inclusive``:
    cityward functions by the share of samples with them anywhere on the stack.
    """
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for text in raw.splitlines():
        stack, _, count_s = text.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        frames = stack.split(";")[1:]  # the first is the thread
        if not frames:
            continue
        count = int(count_s)
        total += count
        own[_frame(frames[-1], line=True)[0]] += count
        names = {n for n, ours in (_frame(f, line=False) for f in frames) if ours}
        for name in names - {n for n in names if "cityward/cli.py" in n}:
            incl[name] += count
    return {
        "samples": total,
        "top_own": [(f, n, n / total) for f, n in own.most_common(top)] if total else [],
        "top_inclusive": [(f, n, n / total) for f, n in incl.most_common(top)] if total else [],
    }


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


# -- phases ------------------------------------------------------------------------------------
def load(base_url: str, total: int, seed: int) -> dict[str, Any]:
    """Batch upsert ``total`` entities over LOAD_CONNECTIONS keep-alive connections."""
    batches = math.ceil(total / BATCH_SIZE)
    todo: queue.Queue[int] = queue.Queue()
    for i in range(batches):
        todo.put(i)
    errors: list[str] = []
    batch_ms: list[float] = []
    lock = threading.Lock()
    url = f"{base_url}{API}/entityOperations/upsert"
    headers = {"Content-Type": "application/json", **AUTH}

    progress = Progress(
        TextColumn("  loading"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    task = progress.add_task("load", total=total, rate="")
    done = 0
    start = time.perf_counter()

    def worker() -> None:
        nonlocal done
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        with httpx.Client(timeout=600.0, limits=limits, headers=AUTH) as client:
            while not errors:
                try:
                    index = todo.get_nowait()
                except queue.Empty:
                    return
                body = make_batch(index, total, seed)
                n = min(BATCH_SIZE, total - index * BATCH_SIZE)
                t0 = time.perf_counter()
                try:
                    resp = client.post(url, content=body, headers=headers)
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append(f"batch {index}: {exc!r}")
                    return
                elapsed = (time.perf_counter() - t0) * 1000
                if resp.status_code not in (200, 201, 204):
                    with lock:
                        errors.append(f"batch {index}: HTTP {resp.status_code} {resp.text[:500]}")
                    return
                with lock:
                    batch_ms.append(elapsed)
                    done += n
                    rate = done / (time.perf_counter() - start)
                progress.update(task, advance=n, rate=f"{rate:,.0f} entities/s")

    with progress:
        threads = [threading.Thread(target=worker) for _ in range(LOAD_CONNECTIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise RuntimeError("loading failed: " + "; ".join(errors[:3]))
    return {
        "entities": done,
        "batches": batches,
        "batch_size": BATCH_SIZE,
        "connections": LOAD_CONNECTIONS,
        "seconds": seconds,
        "entities_per_s": done / seconds,
        "attr_values_per_s": done * ATTRS_PER_ENTITY / seconds,
        "batch_latency": latency_summary(batch_ms),
    }


Request = tuple[str, dict[str, str], Any]  # path, query parameters, what the check needs


def timed_requests(
    client: httpx.Client,
    label: str,
    make: Callable[[random.Random], Request],
    n: int,
    warmup: int,
    rng: random.Random,
    check: Callable[[httpx.Response, Any], int],
) -> tuple[list[float], list[int]]:
    """``warmup`` untimed then ``n`` timed GETs; returns latencies (ms) and check() results.

    Only the request itself is timed; ``check`` (parse and verify the answer) runs after.
    """
    latencies: list[float] = []
    counts: list[int] = []
    failures: list[str] = []
    progress = Progress(
        TextColumn(f"  {label:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    with progress:
        task = progress.add_task(label, total=warmup + n)
        for i in range(warmup + n):
            path, params, meta = make(rng)
            t0 = time.perf_counter()
            try:
                resp = client.get(path, params=params)
            except httpx.TransportError as exc:  # e.g. the server dropped the connection
                progress.advance(task)
                failures.append(f"{label}: {exc!r} for {path} {params}")
                if len(failures) >= MAX_FAILURES:
                    break
                continue
            elapsed = (time.perf_counter() - t0) * 1000
            progress.advance(task)
            if resp.status_code != 200:
                failures.append(f"{label}: HTTP {resp.status_code} for {resp.url}: {resp.text}")
                if len(failures) >= MAX_FAILURES:
                    break
                continue
            counted = check(resp, meta)
            if i >= warmup:
                latencies.append(elapsed)
                counts.append(counted)
    if failures:
        raise RuntimeError(f"{len(failures)} failed requests, e.g. {failures[0][:600]}")
    return latencies, counts


def _entity_list(resp: httpx.Response) -> list[dict[str, Any]]:
    body = orjson.loads(resp.content)
    if not isinstance(body, list):
        raise RuntimeError(f"expected a JSON array from {resp.url}")
    return body


def measure_queries(base_url: str, ds: Dataset, args: argparse.Namespace) -> dict[str, Any]:
    total = len(ds.lon)
    rng = random.Random(args.seed + 7)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    accept = {"Accept": "application/json"}
    out: dict[str, Any] = {}
    problems: list[str] = []

    def problem(text: str) -> None:
        if len(problems) < 20:
            problems.append(text)

    @contextlib.contextmanager
    def guard(kind: str) -> Iterator[None]:
        # A kind that fails (HTTP errors) is reported; the other kinds are still measured.
        try:
            yield
        except (RuntimeError, httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
            problems.insert(0, f"{kind} failed: {exc}")

    with httpx.Client(
        base_url=base_url, timeout=60.0, limits=limits, headers={**accept, **AUTH}
    ) as client:
        # -- GET by id ---------------------------------------------------------------------
        def by_id(r: random.Random) -> Request:
            n = r.randrange(total)
            return f"{API}/entities/{entity_id(n)}", {}, n

        def check_one(resp: httpx.Response, n: int) -> int:
            body = orjson.loads(resp.content)
            ok = (
                isinstance(body, dict)
                and body.get("id") == entity_id(n)
                and body.get("intensity", {}).get("value") == ds.intensity[n]
            )
            if not ok:
                problem(f"GET {entity_id(n)}: unexpected body {resp.text[:200]}")
            return 1

        with guard("GET by id"):
            lat, _ = timed_requests(
                client, "GET by id", by_id, args.get_requests, args.warmup, rng, check_one
            )
            out["get_by_id"] = latency_summary(lat)

        # -- type + q ----------------------------------------------------------------------
        def type_q(r: random.Random) -> Request:
            x = intensity_threshold(r)
            params = {"type": ENTITY_TYPE, "q": f"intensity>{x};laneId==2", "limit": "100"}
            return f"{API}/entities", params, x

        matches: list[int] = []

        def check_q(resp: httpx.Response, x: int) -> int:
            body = _entity_list(resp)
            want = ds.q_matches(x)
            if len(body) != min(100, want):
                problem(
                    f"q intensity>{x};laneId==2: {len(body)} results, expected {min(100, want)}"
                )
            for e in body:
                if not (e["intensity"]["value"] > x and e["laneId"]["value"] == 2):
                    problem(f"q intensity>{x};laneId==2 returned {e['id']}, which does not match")
                    break
            matches.append(want)
            return len(body)

        with guard("type+q"):
            lat, counts = timed_requests(
                client, "type+q", type_q, args.query_requests, args.warmup, rng, check_q
            )
            matches = matches[args.warmup :]
            selective = [ms for ms, c in zip(lat, counts, strict=True) if c < 100]
            full = [ms for ms, c in zip(lat, counts, strict=True) if c == 100]
            out["type_q"] = {
                **latency_summary(lat),
                "median_results": statistics.median(counts),
                "min_results": min(counts),
                "max_results": max(counts),
                "median_matching": statistics.median(matches),  # before limit=100
                "under_limit": latency_summary(selective),
                "at_limit": latency_summary(full),
            }

        # -- geo near ----------------------------------------------------------------------
        def near(r: random.Random) -> Request:
            lon, lat_ = random_point(r)
            params = {
                "type": ENTITY_TYPE,
                "georel": f"near;maxDistance=={NEAR_M}",
                "geometry": "Point",
                "coordinates": f"[{lon},{lat_}]",
                "limit": "100",
            }
            return f"{API}/entities", params, (lon, lat_)

        def check_near(resp: httpx.Response, point: tuple[float, float]) -> int:
            body = _entity_list(resp)
            sure, maybe = ds.near_counts(*point)
            if not min(100, sure) <= len(body) <= min(100, maybe):
                problem(f"near {point}: {len(body)} results, expected {min(100, sure)}")
            for e in body:
                elon, elat = e["location"]["value"]["coordinates"]
                if haversine_m(point[0], point[1], elon, elat) > NEAR_M + 1.0:
                    problem(f"near {point} returned {e['id']}, farther than {NEAR_M} m")
                    break
            return len(body)

        with guard("geo near"):
            lat, counts = timed_requests(
                client, "geo near", near, args.query_requests, args.warmup, rng, check_near
            )
            out["geo_near"] = {**latency_summary(lat), "median_results": statistics.median(counts)}
    if problems:
        out["problems"] = problems
    return out


@dataclass
class Run:
    backend: str
    entities: int
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    governance: bool = True

    @property
    def label(self) -> str:
        return self.backend if self.governance else f"{self.backend}, no governance"


def show_log_tail(server: Server) -> None:
    tail = server.log_tail(40)
    if tail.strip():
        console.print("  server log (tail):")
        console.print(tail, markup=False, highlight=False)


def run_backend(
    backend: str, args: argparse.Namespace, ds: Dataset, governance: bool = True
) -> Run:
    run = Run(backend, args.entities, governance=governance)
    console.rule(f"[bold]{run.label}[/]: {args.entities:,} entities")
    busy0 = machine_busy_s()
    time.sleep(1.0)
    run.result["machine_busy_cores_before"] = idle = machine_busy_s() - busy0
    if idle > 0.3:
        console.print(f"  [yellow]the machine is busy before the run: {idle:.2f} cores[/]")
    with contextlib.ExitStack() as stack:
        if args.keep:
            workdir = Path(tempfile.mkdtemp(prefix="cityward-bench-"))
            console.print(f"  data folder and server log kept in {workdir} (--keep)")
        else:
            workdir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="cityward-bench-"))
            )
        database_url: str | None = None
        if backend == "postgres":
            database_url = stack.enter_context(fresh_pg_database(args.pg_url, args.keep))
            console.print(f"  database {urlsplit(database_url).path.lstrip('/')}")
        server = stack.enter_context(
            running_server(workdir, database_url, args.workers, governance=governance)
        )
        console.print(f"  server pid {server.proc.pid} at {server.base_url}")
        prof_dir = RESULTS_DIR / f"pyspy-{backend}-{args.stamp}"
        spy = find_py_spy() if args.py_spy else None
        if args.py_spy and spy is None:
            console.print("  [yellow]py-spy not found: no profile[/]")
        if spy is not None:
            prof_dir.mkdir(parents=True, exist_ok=True)
        profiler = Profiler(spy, server.proc.pid, prof_dir, args.py_spy_rate)
        try:
            dbname = urlsplit(database_url).path.lstrip("/") if database_url else None
            cpu0, me0, busy0 = server.cpu_s(), own_cpu_s(), machine_busy_s()
            db0 = pg_backend_cpu_s(dbname) if dbname else {}
            with profiler.phase("load"):
                run.result["load"] = load_res = load(server.base_url, args.entities, args.seed)
            cpu1, me1, busy1 = server.cpu_s(), own_cpu_s(), machine_busy_s()
            db1 = pg_backend_cpu_s(dbname) if dbname else {}
            secs = load_res["seconds"]
            # CPU over the load, in cores busy on average (1.0 = one core all the time, the
            # GIL's limit for Python code): the server process, PostgreSQL's backends, this
            # script (the client), the whole machine, and what is left for other processes
            load_res["server_cpu_cores"] = (cpu1 - cpu0) / secs
            if dbname:
                load_res["postgres_cpu_cores"] = pg_cpu_between(db0, db1) / secs
            load_res["client_cpu_cores"] = (me1 - me0) / secs
            load_res["machine_busy_cores"] = (busy1 - busy0) / secs
            load_res["machine_cores"] = psutil.cpu_count()
            others = (
                load_res["machine_busy_cores"]
                - load_res["server_cpu_cores"]
                - load_res["client_cpu_cores"]
                - load_res.get("postgres_cpu_cores", 0.0)
            )
            load_res["other_processes_cpu_cores"] = others
            if others > 0.3:
                console.print(
                    f"  [yellow]other processes kept {others:.2f} cores busy during the load: "
                    "the figures are not those of an idle machine[/]"
                )
            run.result["rss_mb_after_load"] = server.rss_mb()
            run.result["rss_mb_after_load_not_file"] = server.rss_mb(file_backed=False)
            cpu0, t0 = server.cpu_s(), time.perf_counter()
            with profiler.phase("queries"):
                run.result.update(measure_queries(server.base_url, ds, args))
            run.result["queries_server_cpu_cores"] = (server.cpu_s() - cpu0) / (
                time.perf_counter() - t0
            )
            run.result["rss_mb_after_queries"] = server.rss_mb()
            run.result["rss_mb_after_queries_not_file"] = server.rss_mb(file_backed=False)
            if run.result.get("problems"):
                bad = run.result["problems"]
                run.error = f"{len(bad)} problem(s) (failed queries, wrong answers): {bad[0]}"
                console.print(f"  [red]problems:[/] {bad[:3]}")
                show_log_tail(server)
        except Exception as exc:
            run.error = f"{exc.__class__.__name__}: {exc}"
            console.print(f"  [red]failed:[/] {run.error}")
            show_log_tail(server)
        if profiler.reports:
            run.result["profile"] = profiler.reports
    return run


# -- report ------------------------------------------------------------------------------------
@dataclass
class Row:
    label: str
    target: str
    get: Callable[[dict[str, Any]], float | None]
    fmt: str
    ok: Callable[[float, int], bool | None] | None = None


def _dig(*keys: str) -> Callable[[dict[str, Any]], float | None]:
    def get(result: dict[str, Any]) -> float | None:
        cur: Any = result
        for k in keys:
            if not isinstance(cur, dict) or k not in cur:
                return None
            cur = cur[k]
        return float(cur) if isinstance(cur, (int, float)) else None

    return get


ROWS = [
    Row("load: entities/s", "", _dig("load", "entities_per_s"), "{:,.0f}"),
    Row(
        "load: attribute values/s",
        f">= {T_UPSERT_VALUES_S:,.0f}",
        _dig("load", "attr_values_per_s"),
        "{:,.0f}",
        lambda v, _n: v >= T_UPSERT_VALUES_S,
    ),
    Row("load: batch p50 (ms)", "", _dig("load", "batch_latency", "p50_ms"), "{:.0f}"),
    Row("load: batch p99 (ms)", "", _dig("load", "batch_latency", "p99_ms"), "{:.0f}"),
    Row("load: server CPU (cores)", "", _dig("load", "server_cpu_cores"), "{:.2f}"),
    Row("load: PostgreSQL CPU (cores)", "", _dig("load", "postgres_cpu_cores"), "{:.2f}"),
    Row("load: client CPU (cores)", "", _dig("load", "client_cpu_cores"), "{:.2f}"),
    Row("load: whole machine busy (cores)", "", _dig("load", "machine_busy_cores"), "{:.2f}"),
    Row("load: other processes (cores)", "", _dig("load", "other_processes_cpu_cores"), "{:.2f}"),
    Row("GET by id p50 (ms)", "", _dig("get_by_id", "p50_ms"), "{:.2f}"),
    Row(
        "GET by id p99 (ms)",
        f"<= {T_GET_P99_MS:g}",
        _dig("get_by_id", "p99_ms"),
        "{:.2f}",
        lambda v, _n: v <= T_GET_P99_MS,
    ),
    Row("type+q p50 (ms)", "", _dig("type_q", "p50_ms"), "{:.2f}"),
    Row(
        "type+q p99 (ms)",
        f"<= {T_Q_P99_MS:g}",
        _dig("type_q", "p99_ms"),
        "{:.2f}",
        lambda v, _n: v <= T_Q_P99_MS,
    ),
    Row("type+q median results", "", _dig("type_q", "median_results"), "{:.0f}"),
    Row("type+q p99, < 100 results (ms)", "", _dig("type_q", "under_limit", "p99_ms"), "{:.2f}"),
    Row("geo near p50 (ms)", "", _dig("geo_near", "p50_ms"), "{:.2f}"),
    Row(
        "geo near p99 (ms)",
        f"<= {T_GEO_P99_MS:g}",
        _dig("geo_near", "p99_ms"),
        "{:.2f}",
        lambda v, _n: v <= T_GEO_P99_MS,
    ),
    Row("geo near median results", "", _dig("geo_near", "median_results"), "{:.0f}"),
    Row(
        "server RSS after load (MB)",
        f"<= {T_RSS_MB:g} at {T_RSS_AT // 1000}k",
        _dig("rss_mb_after_load"),
        "{:.0f}",
        # Judged only at (or above) the entity count the target is stated for.
        lambda v, n: (v <= T_RSS_MB) if n >= T_RSS_AT else None,
    ),
    Row("server RSS after queries (MB)", "", _dig("rss_mb_after_queries"), "{:.0f}"),
    Row(
        "  of which not file-backed (MB)",
        "",
        _dig("rss_mb_after_queries_not_file"),
        "{:.0f}",
    ),
]


def print_table(runs: Sequence[Run]) -> None:
    entities = {r.entities for r in runs}
    title = f"cityward data bank, {', '.join(f'{n:,}' for n in sorted(entities))} entities"
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("target", style="dim")
    for r in runs:
        table.add_column(r.label, justify="right")
    for row in ROWS:
        cells = []
        for r in runs:
            value = row.get(r.result)
            if value is None or math.isnan(value):
                cells.append("-")
                continue
            text = row.fmt.format(value)
            verdict = row.ok(value, r.entities) if row.ok else None
            if verdict is True:
                text = f"[green]{text} ✓[/]"
            elif verdict is False:
                text = f"[red]{text} ✗[/]"
            cells.append(text)
        table.add_row(row.label, row.target, *cells)
    console.print(table)
    for r in runs:
        if r.error:
            console.print(f"[red]{r.backend} failed:[/] {r.error}")


# (label, path into Run.result, True when higher is better)
OVERHEAD_ROWS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("batch upsert, attribute values/s", ("load", "attr_values_per_s"), True),
    ("batch of 1,000 entities p50 (ms)", ("load", "batch_latency", "p50_ms"), False),
    ("GET by id p50 (ms)", ("get_by_id", "p50_ms"), False),
    ("type+q p50 (ms)", ("type_q", "p50_ms"), False),
    ("geo near p50 (ms)", ("geo_near", "p50_ms"), False),
)


def print_overhead(runs: Sequence[Run]) -> None:
    """Governed vs ungoverned runs of one backend: throughput lost and p50 latency added."""
    for backend in dict.fromkeys(r.backend for r in runs):
        pair = {r.governance: r for r in runs if r.backend == backend and not r.error}
        if len(pair) != 2:
            continue
        table = Table(
            title=f"governance overhead, {backend} (target: <= 15% throughput, <= 1 ms p50)"
        )
        table.add_column("metric")
        table.add_column("without", justify="right")
        table.add_column("with", justify="right")
        table.add_column("change", justify="right")
        overhead: dict[str, float] = {}
        for label, path, higher_better in OVERHEAD_ROWS:
            off, on = _dig(*path)(pair[False].result), _dig(*path)(pair[True].result)
            if off is None or on is None or off == 0:
                continue
            if higher_better:
                change = (off - on) / off
                text = f"{change:+.1%} lower" if change >= 0 else f"{-change:.1%} higher"
                ok = change <= 0.15
            else:
                change = on - off
                text = f"{change:+.2f} ms"
                ok = change <= 1.0 or "batch" in label
            overhead[label] = change
            table.add_row(
                label, f"{off:,.2f}", f"{on:,.2f}", f"[green]{text}[/]" if ok else f"[red]{text}[/]"
            )
        pair[True].result["governance_overhead"] = overhead
        console.print(table)


def print_profiles(runs: Sequence[Run]) -> None:
    for r in runs:
        for phase, rep in r.result.get("profile", {}).items():
            table = Table(title=f"py-spy, {r.backend}, {phase}: {rep['samples']:,} samples")
            table.add_column("own %", justify="right")
            table.add_column("leaf frames (own samples)")
            table.add_column("incl %", justify="right")
            table.add_column("cityward functions (inclusive)")
            own = rep["top_own"]
            incl = rep["top_inclusive"]
            for i in range(max(len(own), len(incl))):
                a = own[i] if i < len(own) else ("", 0, math.nan)
                b = incl[i] if i < len(incl) else ("", 0, math.nan)
                table.add_row(
                    f"{a[2]:.1%}" if a[0] else "",
                    a[0],
                    f"{b[2]:.1%}" if b[0] else "",
                    b[0],
                )
            console.print(table)


def environment() -> dict[str, Any]:
    try:
        from importlib.metadata import version

        cityward_version = version("cityward")
    except Exception:
        cityward_version = "unknown"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_mb": psutil.virtual_memory().total / 1e6,
        "cityward": cityward_version,
    }


def run_document(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "benchmark": "bank",
        "backend": run.backend,
        "governance": run.governance,
        "timestamp": args.stamp,
        "entities": run.entities,
        "params": {
            "seed": args.seed,
            "batch_size": BATCH_SIZE,
            "attrs_per_entity": ATTRS_PER_ENTITY,
            "load_connections": LOAD_CONNECTIONS,
            "warmup": args.warmup,
            "get_requests": args.get_requests,
            "query_requests": args.query_requests,
            "near_m": NEAR_M,
            "area_km": SIDE_KM,
        },
        "targets": {
            "attr_values_per_s_min": T_UPSERT_VALUES_S,
            "get_by_id_p99_ms_max": T_GET_P99_MS,
            "type_q_p99_ms_max": T_Q_P99_MS,
            "geo_near_p99_ms_max": T_GEO_P99_MS,
            "rss_mb_max_at_100k": T_RSS_MB,
        },
        "environment": environment(),
        "error": run.error,
        "results": run.result,
    }


def write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    p.add_argument("--entities", type=int, default=100_000, help="entities to load (100,000)")
    p.add_argument("--quick", action="store_true", help="10,000 entities: a fast check")
    p.add_argument("--seed", type=int, default=1, help="seed of the data and the queries")
    p.add_argument("--warmup", type=int, default=30, help="untimed requests before each kind")
    p.add_argument("--get-requests", type=int, default=1000, help="timed GETs by id")
    p.add_argument(
        "--query-requests", type=int, default=300, help="timed type+q and geo queries, each"
    )
    p.add_argument(
        "--pg-url",
        default=os.environ.get("CITYWARD_BENCH_PG", DEFAULT_PG),
        help="PostgreSQL server to create the scratch database on (env CITYWARD_BENCH_PG)",
    )
    p.add_argument("--json", type=Path, help="also write all runs to this JSON file")
    p.add_argument(
        "--workers", type=int, default=1, help="server worker processes (serve --workers)"
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the data folder, server log and PostgreSQL database, to look into them",
    )
    p.add_argument(
        "--history",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run bench/history.py (history and notifications; --no-history skips it)",
    )
    p.add_argument(
        "--history-rows",
        type=int,
        default=1_000_000,
        help="history rows for the aggregation figures (1,000,000)",
    )
    p.add_argument(
        "--governance",
        choices=("on", "off", "both"),
        default="on",
        help="on: an operator token and the audit trail (as shipped); off: --no-auth without "
        "audit; both: each backend twice, with the overhead table",
    )
    p.add_argument("--py-spy", action="store_true", help="profile the server with py-spy")
    p.add_argument("--py-spy-rate", type=int, default=100, help="py-spy samples per second")
    args = p.parse_args(argv)
    if args.quick:
        args.entities = 10_000
        args.history_rows = min(args.history_rows, 100_000)
    if args.entities < 1:
        p.error("--entities must be at least 1")
    if args.get_requests < 1 or args.query_requests < 1 or args.warmup < 0:
        p.error("request counts must be positive")
    args.stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return args


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C, so the server is stopped and the
    # scratch database dropped on the way out.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background by sh
        signal.signal(signal.SIGINT, signal.default_int_handler)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    runs: list[Run] = []
    ds = Dataset.build(args.entities, args.seed)  # to check the answers; not timed
    try:
        modes = {"on": [True], "off": [False], "both": [False, True]}[args.governance]
        for backend in backends:
            for governed in modes:
                try:
                    run = run_backend(backend, args, ds, governed)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # e.g. PostgreSQL unreachable, server did not start
                    run = Run(
                        backend,
                        args.entities,
                        error=f"{exc.__class__.__name__}: {exc}",
                        governance=governed,
                    )
                    console.print(f"  [red]failed:[/] {run.error}")
                runs.append(run)
                suffix = "" if governed else "-nogov"
                path = RESULTS_DIR / f"bank-{backend}{suffix}-{args.stamp}.json"
                write_json(path, run_document(run, args))
                console.print(f"  wrote {path.relative_to(BENCH_DIR.parent)}")
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
    if runs:
        print_table(runs)
        print_overhead(runs)
        print_profiles(runs)
    if args.json is not None:
        write_json(args.json, {"runs": [run_document(r, args) for r in runs]})
        console.print(f"wrote {args.json}")
    failed = not runs or any(r.error for r in runs)
    if args.history:
        # the history and notification figures: bench/history.py, on fresh servers
        import history

        hist_args = ["--backend", args.backend, "--rows", str(args.history_rows)]
        failed = history.main([*hist_args, "--pg-url", args.pg_url]) != 0 or failed
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
