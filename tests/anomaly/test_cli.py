"""``cityward anomaly``: the NAB evaluation on a few real NAB files, end to end."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cityward.cli import app
from tests.conftest import shared_path

FILES = [
    "realTraffic/speed_7578.csv",
    "realTraffic/occupancy_6005.csv",
    "artificialNoAnomaly/art_noisy.csv",
]


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, Path]:
    """Three NAB files in the NAB layout, and their labels (copied to a temporary folder)."""
    nab = shared_path("data", "nab")
    data = tmp_path / "data"
    for f in FILES:
        (data / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(nab / "data" / f, data / f)
    windows = json.loads((nab / "labels" / "combined_windows.json").read_text())
    labels = tmp_path / "windows.json"
    labels.write_text(json.dumps({f: windows[f] for f in FILES}))
    return data, labels


def test_nab_writes_results_in_nabs_layout_and_scores(
    corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    data, labels = corpus
    out = tmp_path / "out"
    args = ["anomaly", "nab", "--data", str(data), "--labels", str(labels)]
    r = CliRunner().invoke(app, [*args, "--detector", "ensemble", "--output", str(out)])
    assert r.exit_code == 0, r.output
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores) >= {"standard", "reward_low_FP", "reward_low_FN"}
    assert all(-100.0 <= scores[p] <= 100.0 for p in ("standard", "reward_low_FP"))
    assert scores["detector"] == "ensemble" and scores["files"] == 3
    result = out / "ensemble" / "realTraffic" / "ensemble_speed_7578.csv"
    with result.open() as fh:
        rows = list(csv.DictReader(fh))
    source = list(csv.DictReader((data / "realTraffic" / "speed_7578.csv").open()))
    assert len(rows) == len(source)
    assert list(rows[0]) == ["timestamp", "value", "anomaly_score", "label"]
    assert rows[0]["timestamp"] == source[0]["timestamp"]
    assert all(0.0 <= float(x["anomaly_score"]) <= 1.0 for x in rows)
    assert {x["label"] for x in rows} == {"0", "1"}  # speed_7578 has labelled windows
    assert (out / "ensemble" / "artificialNoAnomaly" / "ensemble_art_noisy.csv").is_file()


def test_default_detector_runs_under_its_own_name(
    corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    from cityward.anomaly.detectors import DEFAULT

    data, labels = corpus
    out = tmp_path / "out"
    args = ["anomaly", "nab", "--data", str(data), "--labels", str(labels), "--jobs", "1"]
    r = CliRunner().invoke(app, [*args, "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "scores.json").read_text())["detector"] == DEFAULT
    assert (out / DEFAULT / "realTraffic").is_dir()


def test_clear_errors(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    data, labels = corpus
    base = ["anomaly", "nab", "--data", str(data), "--labels", str(labels)]
    runner = CliRunner()
    r = runner.invoke(app, [*base, "--detector", "nope", "--output", str(tmp_path / "o")])
    assert r.exit_code != 0 and "no detector named 'nope'" in r.output
    base += ["--output", str(tmp_path / "o")]
    r = runner.invoke(app, [*base, "--config", '{"dead_time": -5}', "--detector", "ensemble"])
    assert r.exit_code != 0 and "dead_time" in r.output
    r = runner.invoke(app, [*base, "--config", "[1]"])
    assert r.exit_code != 0 and "JSON object" in r.output
    missing = tmp_path / "labels-missing.json"
    missing.write_text(json.dumps({FILES[0]: []}))
    out = tmp_path / "out"
    args = ["anomaly", "nab", "--data", str(data), "--labels", str(missing), "--jobs", "1"]
    r = runner.invoke(app, [*args, "--output", str(out)])
    assert r.exit_code != 0 and "no label entry" in r.output
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize(("value", "why"), [("nan", "is not a number"), ("abc", "abc")])
def test_a_data_file_with_a_value_that_is_not_a_number_names_its_line(
    corpus: tuple[Path, Path], tmp_path: Path, value: str, why: str
) -> None:
    """A nan was taken and poisoned every detector for the rest of the file (scores of 1, or
    nan); a word was a traceback with exit code 1."""
    data, labels = corpus
    path = data / FILES[2]
    lines = path.read_text().splitlines()
    stamp = lines[10].split(",")[0]
    lines[10] = f"{stamp},{value}"
    path.write_text("\n".join(lines) + "\n")
    args = ["anomaly", "nab", "--data", str(data), "--labels", str(labels), "--jobs", "1"]
    r = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "o")])
    flat = "".join(c for c in r.output if not c.isspace() and c != "\u2502")  # rich's box
    assert r.exit_code == 2, r.output
    assert "--data" in r.output and f"{FILES[2]},line11:" in flat, r.output
    assert why.replace(" ", "") in flat, r.output


def test_detectors_lists_every_registered_one() -> None:
    r = CliRunner().invoke(app, ["anomaly", "detectors"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for name in ("ensemble", "robust-z", "windowed-gaussian"):
        assert name in r.output
