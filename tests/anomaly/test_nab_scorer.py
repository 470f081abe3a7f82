"""Our NAB scorer against hand-computed cases, NAB's own test expectations and a loop reference.

Notation in the comments: S(y) = 2 * sigmoid(-5 y) - 1 is NAB's scaled sigmoid, S(-1) = 0.98661;
inside a window of rows lo..hi (width w) row i sits at y = -(hi - i + 1) / w and earns
A_TP * S(y) / S(-1); a false positive i rows after a window ending on row hi (width w) sits at
y = (i - hi) / (w - 1) and earns A_FP * S(y); with no window before it, it costs A_FP.

Most cases use a 100-row file with one window on rows 50..59: the probationary period is
floor(0.15 * 100) = 15 rows, leaving 85 scored rows, 10 inside the window and 75 outside.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson
import pytest

from cityward.anomaly.nab import (
    NOTHING_FIRES,
    PROFILES,
    FileScores,
    Profile,
    Window,
    labels_for,
    load_windows,
    probation_length,
    row_contributions,
    score_corpus,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)
STEP = timedelta(minutes=5)
KEY = "realTraffic/speed_7578.csv"
STANDARD, LOW_FP, LOW_FN = (
    PROFILES["standard"],
    PROFILES["reward_low_FP"],
    PROFILES["reward_low_FN"],
)


def stamps(n: int) -> list[datetime]:
    return [T0 + i * STEP for i in range(n)]


def make_file(
    n: int,
    windows: Sequence[tuple[int, int]],
    hits: Mapping[int, float],
    key: str = KEY,
) -> tuple[list[FileScores], dict[str, list[Window]]]:
    """A corpus of one ``n``-row file: windows as (first row, last row), scores 0 but ``hits``."""
    ts = stamps(n)
    scores = np.zeros(n)
    for row, value in hits.items():
        scores[row] = value
    return [FileScores(key, ts, scores)], {key: [(ts[a], ts[b]) for a, b in windows]}


def S(y: float) -> float:
    """NAB's scaled sigmoid, written out for the expected values."""
    return -1.0 if y > 3.0 else 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


# --- the rules, case by case --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "percent", "expected"),
    [
        # NAB tests/integration/sweeper_test.py testGetProbationaryLength
        (100, 0.0, 0),
        (100, 1.0, 100),
        (100, 0.1, 10),
        (100, 0.15, 15),
        (5000, 0.1, 500),
        (6000, 0.1, 500),  # capped at 0.1 * 5000
        # the default: 15 %, at most 750 rows
        (20_000, 0.15, 750),
        (4000, 0.15, 600),
        (10, 0.15, 1),
    ],
)
def test_probation_length(rows: int, percent: float, expected: int) -> None:
    assert probation_length(rows, percent) == expected


def test_detection_on_the_first_row_of_the_window_earns_the_full_reward() -> None:
    # y = -(59 - 50 + 1) / 10 = -1 -> S(-1) / S(-1) = 1.0 = A_TP. Candidates: nothing fires
    # (-1.0, the missed window), 1.0 (+1.0), 0.0 (every row fires: far worse) -> 1.0.
    # null = -1 (one missed window), perfect = +1 -> 100 * (1 - -1) / (1 - -1) = 100.
    r = score_corpus(*make_file(100, [(50, 59)], {50: 1.0}))["standard"]
    assert r.raw == pytest.approx(1.0, abs=1e-12)
    assert r.threshold == 1.0
    assert r.normalized == pytest.approx(100.0)
    assert (r.null, r.perfect) == (-1.0, 1.0)
    # counts are rows, as in NAB: 1 window row fires, 9 do not, 75 quiet rows outside
    assert (r.tp, r.fp, r.fn, r.tn) == (1, 0, 9, 75)
    assert (r.windows, r.windows_detected) == (1, 1)


def test_detection_on_the_last_row_of_the_window_earns_little() -> None:
    # y = -(59 - 59 + 1) / 10 = -0.1 -> S(-0.1) = 2 * sigmoid(0.5) - 1 = 0.2449187,
    # / S(-1) = 0.2482415; normalised 100 * (0.2482415 + 1) / 2 = 62.41208
    r = score_corpus(*make_file(100, [(50, 59)], {59: 1.0}))["standard"]
    assert r.raw == pytest.approx(0.24824154977543, abs=1e-9)
    assert r.normalized == pytest.approx(62.412077488771, abs=1e-6)


def test_false_positive_far_before_any_window_costs_the_full_weight() -> None:
    # Row 20 fires (after the probation, no window before it): -A_FP; the window is missed: -A_FN.
    # At threshold 0.5: standard -0.11 - 1 = -1.11, reward_low_FP -0.22 - 1 = -1.22,
    # reward_low_FN -0.11 - 2 = -2.11.
    (f,), w = make_file(100, [(50, 59)], {20: 1.0})
    r = score_corpus([f], w, threshold=0.5)
    assert r["standard"].raw == pytest.approx(-1.11)
    assert r["reward_low_FP"].raw == pytest.approx(-1.22)
    assert r["reward_low_FN"].raw == pytest.approx(-2.11)
    assert (r["standard"].tp, r["standard"].fp, r["standard"].fn, r["standard"].tn) == (
        0,
        1,
        10,
        74,
    )
    # left to choose, the optimiser fires on nothing: -1.0 beats -1.11
    best = score_corpus([f], w)["standard"]
    assert (best.threshold, best.raw, best.fp) == (NOTHING_FIRES, -1.0, 0)


def test_false_positive_just_after_a_window_costs_less() -> None:
    # TP on row 50: +1.0. FP on row 60, one row after the window (hi = 59, w = 10):
    # y = (60 - 59) / (10 - 1) = 1/9 -> S(1/9) = -0.2708471, * 0.11 = -0.0297932 (far away: -0.11).
    # raw = 1 - 0.0297932 = 0.9702068; normalised 100 * (0.9702068 + 1) / 2 = 98.51034
    r = score_corpus(*make_file(100, [(50, 59)], {50: 1.0, 60: 1.0}))["standard"]
    assert r.threshold == 1.0
    assert r.raw == pytest.approx(0.97020681696316, abs=1e-9)
    assert r.normalized == pytest.approx(98.510340848158, abs=1e-6)
    # three window widths later (y = (87 - 59) / 9 > 3) a false positive costs the full A_FP
    far = score_corpus(*make_file(100, [(50, 59)], {50: 1.0, 87: 1.0}), threshold=0.5)
    assert far["standard"].raw == pytest.approx(1.0 - 0.11)


def test_missed_window_costs_a_fn() -> None:
    # Nothing fires (every score 0; firing everywhere is far worse): standard -1.0,
    # reward_low_FP -1.0, reward_low_FN -2.0; that is the null score, so normalised 0.
    r = score_corpus(*make_file(100, [(50, 59)], {}))
    assert {k: v.raw for k, v in r.items()} == {
        "standard": -1.0,
        "reward_low_FP": -1.0,
        "reward_low_FN": -2.0,
    }
    assert all(v.threshold == NOTHING_FIRES and v.normalized == 0.0 for v in r.values())
    assert r["standard"].windows_detected == 0


def test_probationary_period_is_ignored() -> None:
    # rows 0..14 are the probation: a detection on row 14 costs nothing (raw = -1, the FN only),
    # one on row 15 is a false positive (-1 - 0.11)
    inside = score_corpus(*make_file(100, [(50, 59)], {14: 1.0}), threshold=0.5)["standard"]
    assert (inside.raw, inside.fp) == (-1.0, 0)
    assert inside.tn + inside.fp + inside.tp + inside.fn == 85
    after = score_corpus(*make_file(100, [(50, 59)], {15: 1.0}), threshold=0.5)["standard"]
    assert after.raw == pytest.approx(-1.11)
    assert after.fp == 1
    # a window entirely in the probation does not count at all (nothing to normalise against)
    early = score_corpus(*make_file(100, [(5, 9)], {}))["standard"]
    assert (early.windows, early.raw, early.null, early.perfect) == (0, 0.0, 0.0, 0.0)
    assert math.isnan(early.normalized)


def test_two_detections_in_one_window_count_once() -> None:
    # rows 50 and 55 fire: only the earliest counts, +1.0 (row 55 is neither TP reward nor FP)
    both = score_corpus(*make_file(100, [(50, 59)], {50: 1.0, 55: 1.0}))["standard"]
    assert both.raw == pytest.approx(1.0, abs=1e-12)
    assert (both.tp, both.fp, both.windows_detected) == (2, 0, 1)
    # row 55 alone: y = -(59 - 55 + 1) / 10 = -0.5 -> S(-0.5) = 0.8482836, / S(-1) = 0.8597926
    late = score_corpus(*make_file(100, [(50, 59)], {55: 1.0}))["standard"]
    assert late.raw == pytest.approx(0.85979256690978, abs=1e-9)


def two_file_corpus(hit_window_starts: bool) -> tuple[list[FileScores], dict[str, list[Window]]]:
    files: list[FileScores] = []
    windows: dict[str, list[Window]] = {}
    for key, n, spans in [
        ("realTraffic/a.csv", 200, [(40, 49), (120, 139)]),
        ("realTraffic/b.csv", 150, [(100, 104)]),
    ]:
        hits = {a: 1.0 for a, _ in spans} if hit_window_starts else {}
        (f,), w = make_file(n, spans, hits, key)
        files.append(f)
        windows.update(w)
    return files, windows


def test_null_detector_normalises_to_0_and_perfect_to_100() -> None:
    # 3 windows: null = -3 A_FN, perfect = +3 A_TP for every profile
    null = score_corpus(*two_file_corpus(hit_window_starts=False))
    perfect = score_corpus(*two_file_corpus(hit_window_starts=True))
    for name, profile in PROFILES.items():
        assert null[name].normalized == 0.0
        assert null[name].raw == null[name].null == -3 * profile.fn
        assert perfect[name].normalized == pytest.approx(100.0)
        assert perfect[name].raw == pytest.approx(perfect[name].perfect)
        assert perfect[name].perfect == pytest.approx(3 * profile.tp)


def test_threshold_separates_a_high_scoring_tp_from_lower_scoring_fps() -> None:
    # TP on row 52 scores 0.9: y = -(59 - 52 + 1) / 10 = -0.8 -> S(-0.8) / S(-1) = 0.9771068.
    # FPs: row 80 scores 0.8 (y = 21/9 = 2.33 -> 0.11 * S(2.33) = -0.1099981), rows 30 and 20
    # score 0.7 and 0.6 (no window before: -0.11 each).
    # threshold 1.1: -1; 0.9: 0.9771068; 0.8: 0.8671087; 0.7: 0.7571087; 0.6: 0.6471087;
    # 0.0: everything fires (< -5). Best: 0.9.
    # standard: 100 * (0.9771068 + 1) / 2 = 98.85534; reward_low_FN: 100 * (0.9771068 + 2) / 3
    # = 99.23689
    r = score_corpus(*make_file(100, [(50, 59)], {52: 0.9, 80: 0.8, 30: 0.7, 20: 0.6}))
    for name in PROFILES:
        assert r[name].threshold == 0.9
        assert r[name].raw == pytest.approx(0.97710684092260, abs=1e-9)
    assert r["standard"].normalized == pytest.approx(98.855342046130, abs=1e-6)
    assert r["reward_low_FN"].normalized == pytest.approx(99.236894697420, abs=1e-6)


def test_one_threshold_for_the_whole_corpus() -> None:
    # file a: TP on its window's first row at 0.9, an FP (no window before it) at 0.8;
    # file b: TP on its window's first row at 0.75.
    # 1.1: -2; 0.9: 1 - 1 = 0; 0.8: 0 - 0.11 = -0.11; 0.75: 1 - 0.11 + 1 = 1.89; 0: far worse.
    # Alone, file a would pick 0.9; together the corpus picks 0.75.
    # normalised: null -2, perfect 2 -> 100 * (1.89 + 2) / 4 = 97.25
    (fa,), wa = make_file(100, [(50, 59)], {50: 0.9, 20: 0.8}, "realTraffic/a.csv")
    (fb,), wb = make_file(100, [(70, 79)], {70: 0.75}, "realTraffic/b.csv")
    r = score_corpus([fa, fb], {**wa, **wb})["standard"]
    assert r.threshold == 0.75
    assert r.raw == pytest.approx(1.89)
    assert r.normalized == pytest.approx(97.25)
    assert score_corpus([fa], wa)["standard"].threshold == 0.9


def test_tie_goes_to_the_highest_threshold() -> None:
    # rows 50 (0.9) and 55 (0.8) in the window: at 0.9 and at 0.8 the raw score is the same
    # (+1.0, the earliest row); NAB's stable sort keeps the higher threshold
    r = score_corpus(*make_file(100, [(50, 59)], {50: 0.9, 55: 0.8}))["standard"]
    assert r.threshold == 0.9
    assert r.raw == pytest.approx(1.0)


# --- cross-checks against NAB's own tests -------------------------------------------------------


def test_mirrors_nab_scorer_test_scoring_all_metrics() -> None:
    # NAB tests/integration/scorer_test.py ScorerTest.testScoringAllMetrics: 100 rows, no
    # probation, all weights 1.0, two 5-row windows from nab.test_helpers.generateWindows
    # (gap round((100 - 10) / 3) = 30: rows 30..34 and 65..69), detections on rows 30 (TP),
    # 31 (ignored, same window) and 37 (FP), threshold 0.5. NAB asserts a score of -0.9540
    # (4 places) and counts tn 89, tp 2, fp 1, fn 8.
    # By hand: TP +1; FP y = (37 - 34) / 4 = 0.75 -> S(0.75) = -0.9540453; FN -1 -> -0.9540453.
    ones = Profile("nab_test", tp=1.0, fp=1.0, fn=1.0)
    (f,), w = make_file(100, [(30, 34), (65, 69)], {30: 1.0, 31: 1.0, 37: 1.0})
    r = score_corpus([f], w, [ones], probation_percent=0.0, threshold=0.5)["nab_test"]
    assert round(r.raw, 4) == -0.9540
    assert r.raw == pytest.approx(1.0 + S(0.75) - 1.0)
    assert (r.tn, r.tp, r.fp, r.fn) == (89, 2, 1, 8)
    # our optimiser agrees that 1.0 (the detections themselves) is the best threshold
    assert score_corpus([f], w, [ones], probation_percent=0.0)["nab_test"].threshold == 1.0


def test_mirrors_nab_unit_scorer_test_true_positives_with_fn() -> None:
    # NAB tests/unit/scorer_test.py ScorerTest.testTruePositives1WithFN: 7 rows, windows on rows
    # 1..2 and 4..5, a detection on row 2, cost matrix tp 1.1, fp 0.11, fn 1.2, no probation.
    # NAB expects 0.8482836399575131 * 1.1 / 0.9866142981514305 - 1.2 (= -0.2542282):
    # row 2 is the last row of a 2-row window, y = -(2 - 2 + 1) / 2 = -0.5.
    cost = Profile("nab_unit", tp=1.1, fp=0.11, fn=1.2)
    (f,), w = make_file(7, [(1, 2), (4, 5)], {2: 1.0})
    r = score_corpus([f], w, [cost], probation_percent=0.0, threshold=0.5)["nab_unit"]
    assert r.raw == pytest.approx(0.8482836399575131 * 1.1 / 0.9866142981514305 - 1.2)


def test_mirrors_nab_true_positive_test_right_edge() -> None:
    # NAB tests/integration/true_positive_test.py testTruePositiveAtRightEdgeOfWindow: 1000
    # rows, one 100-row window (rows 450..549), weights 1.0: TP on its last row plus FP just
    # after it plus 1 (the FN of the second run) is ~0 to 3 places.
    ones = Profile("nab_test", tp=1.0, fp=1.0, fn=1.0)
    tp = score_corpus(
        *make_file(1000, [(450, 549)], {549: 1.0}), [ones], probation_percent=0.0, threshold=0.5
    )["nab_test"]
    fp = score_corpus(
        *make_file(1000, [(450, 549)], {550: 1.0}), [ones], probation_percent=0.0, threshold=0.5
    )["nab_test"]
    assert round(tp.raw + fp.raw + 1.0, 3) == 0.0
    assert (tp.tn, tp.tp, tp.fp, tp.fn) == (900, 1, 0, 99)
    assert (fp.tn, fp.tp, fp.fp, fp.fn) == (899, 0, 1, 100)


# --- inputs and errors --------------------------------------------------------------------------


def test_timestamp_forms_agree() -> None:
    (f,), w = make_file(100, [(50, 59)], {52: 0.9, 80: 0.8})
    aware = score_corpus([f], w)
    naive_ts = [t.replace(tzinfo=None) for t in stamps(100)]
    naive = score_corpus([FileScores(KEY, naive_ts, f.scores)], w)
    as_np = np.array(naive_ts, dtype="datetime64[ns]")
    numpy_ts = score_corpus([FileScores(KEY, as_np, list(map(float, f.scores)))], w)
    assert aware == naive == numpy_ts


def test_repeated_timestamps_are_allowed() -> None:
    # NAB's ec2_disk_write_bytes_1ef3de.csv repeats 2014-03-09 03:00 (a clock set back)
    (f,), w = make_file(100, [(50, 59)], {50: 0.9})
    ts = list(stamps(100))
    ts[31] = ts[30]
    r = score_corpus([FileScores(KEY, ts, f.scores)], w)
    assert r["standard"].normalized == pytest.approx(100.0)


def bad_case(kind: str) -> tuple[list[FileScores], dict[str, list[Window]]]:
    ts = stamps(50)
    scores = np.zeros(50)
    windows: list[Window] = [(ts[30], ts[34])]
    if kind == "order":
        ts[20] = ts[18]
    elif kind == "back":
        ts[21] = ts[19]
    elif kind == "above":
        scores[7] = 1.5
    elif kind == "nan":
        scores[8] = math.nan
    elif kind == "negative":
        scores[9] = -0.1
    elif kind == "overlap":
        windows = [(ts[30], ts[34]), (ts[34], ts[40])]
    elif kind == "reversed":
        windows = [(ts[34], ts[30])]
    elif kind == "empty":
        windows = [(ts[30] + timedelta(minutes=1), ts[30] + timedelta(minutes=2))]
    files = [FileScores(KEY, ts, scores)]
    return files, {} if kind == "missing" else {KEY: windows}


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", f"{KEY}: the file has no entry"),
        ("order", f"{KEY}: row 20: timestamp"),
        ("back", f"{KEY}: row 21: timestamp"),
        ("above", f"{KEY}: row 7: anomaly score 1.5"),
        ("nan", f"{KEY}: row 8: anomaly score nan"),
        ("negative", f"{KEY}: row 9: anomaly score -0.1"),
        ("overlap", f"{KEY}: window 1"),
        ("reversed", f"{KEY}: window 0 ends"),
        ("empty", f"{KEY}: window 0 .* contains no row"),
    ],
)
def test_bad_input_names_the_file_and_row(kind: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        score_corpus(*bad_case(kind))


def test_labels_for_marks_windows_inclusively() -> None:
    ts = stamps(20)
    labels = labels_for(ts, [(ts[3], ts[5]), (ts[10], ts[10])])
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    # naive window times are UTC, like the timestamps
    naive = [(ts[3].replace(tzinfo=None), ts[5].replace(tzinfo=None))]
    assert labels_for(ts, naive).tolist()[2:7] == [0, 1, 1, 1, 0]
    assert labels_for(ts, []).sum() == 0


def test_load_windows(tmp_path: Path) -> None:
    path = tmp_path / "combined_windows.json"
    path.write_text(
        json.dumps(
            {
                KEY: [["2024-01-01 00:15:00.000000", "2024-01-01 00:25:00.000000"]],
                "realTraffic/empty.csv": [],
            }
        )
    )
    windows = load_windows(path)
    assert windows == {
        KEY: [(T0 + 3 * STEP, T0 + 5 * STEP)],
        "realTraffic/empty.csv": [],
    }
    assert labels_for(stamps(8), windows[KEY]).tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    path.write_text(json.dumps({KEY: [["2024-01-01 00:15:00"]]}))
    with pytest.raises(ValueError, match=f"{KEY}: window 0"):
        load_windows(path)


def test_result_serialises_as_evaluate_writes_it() -> None:
    r = score_corpus(*make_file(100, [(50, 59)], {50: 1.0}))
    data = orjson.loads(orjson.dumps(r))
    assert data["standard"]["normalized"] == pytest.approx(100.0)
    assert set(data) == {"standard", "reward_low_FP", "reward_low_FN"}


# --- against a plain loop, and properties --------------------------------------------------------


def reference_raw(
    files: Sequence[FileScores],
    windows: Mapping[str, Sequence[Window]],
    profile: Profile,
    threshold: float,
    probation_percent: float = 0.15,
) -> float:
    """The rules as one loop per row, NAB's sweeper style (timestamps are window bounds)."""
    total = 0.0
    for f in files:
        ts = list(f.timestamps)
        n = len(ts)
        probation = min(math.floor(probation_percent * n), probation_percent * 5000)
        spans = [(ts.index(a), ts.index(b)) for a, b in windows[f.key]]
        best: dict[int, float] = {}
        for i in range(n):
            if i < probation or f.scores[i] < threshold:
                continue
            hit = [k for k, (a, b) in enumerate(spans) if a <= i <= b]
            if hit:
                a, b = spans[hit[0]]
                value = profile.tp * S(-(b - i + 1) / (b - a + 1)) / S(-1.0)
                best[hit[0]] = max(best.get(hit[0], -math.inf), value)
                continue
            before = [(a, b) for a, b in spans if b < i]
            if not before:
                total -= profile.fp
            else:
                a, b = before[-1]
                y = (i - b) / (b - a) if b > a else 2.0
                total += profile.fp * S(y)
        for k, (_, b) in enumerate(spans):
            if b >= probation:
                total += best.get(k, -profile.fn)
    return total


def random_corpus(seed: int) -> tuple[list[FileScores], dict[str, list[Window]]]:
    rng = np.random.default_rng(seed)
    files: list[FileScores] = []
    windows: dict[str, list[Window]] = {}
    for j, n in enumerate([40, 57, 80]):
        ts = stamps(n)
        spans: list[tuple[int, int]] = []
        row = int(rng.integers(0, 8))  # a window may start inside the probation
        while True:
            width = int(rng.integers(1, 9))  # one-row windows included
            if row + width > n:
                break
            spans.append((row, row + width - 1))
            row += width + int(rng.integers(1, 20))
        scores = np.round(rng.random(n) ** 3, 1)  # few distinct values: many ties
        key = f"cat/f{j}.csv"
        files.append(FileScores(key, ts, scores))
        windows[key] = [(ts[a], ts[b]) for a, b in spans]
    return files, windows


@pytest.mark.parametrize("seed", range(6))
def test_sweep_matches_a_plain_loop(seed: int) -> None:
    files, windows = random_corpus(seed)
    scored = sorted(
        {float(s) for f in files for s in f.scores[probation_length(len(f.scores)) :]},
        reverse=True,
    )
    candidates = [NOTHING_FIRES, *scored]
    result = score_corpus(files, windows)
    for name, profile in PROFILES.items():
        raws = [reference_raw(files, windows, profile, t) for t in candidates]
        best = max(raws)
        expected = next(t for t, raw in zip(candidates, raws, strict=True) if raw >= best - 1e-9)
        assert result[name].threshold == expected
        assert result[name].raw == pytest.approx(best, abs=1e-9)
        for t, raw in zip(candidates, raws, strict=True):
            fixed = score_corpus(files, windows, [profile], threshold=t)[name]
            assert fixed.raw == pytest.approx(raw, abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_normalised_score_of_random_scores_lies_in_0_100(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    files, windows = random_corpus(seed)
    files = [FileScores(f.key, f.timestamps, rng.random(len(f.scores))) for f in files]
    for r in score_corpus(files, windows).values():
        assert 0.0 <= r.normalized <= 100.0
        assert r.null <= r.raw <= r.perfect


def test_row_contributions_sum_to_the_raw_score_and_ignore_later_rows() -> None:
    rng = np.random.default_rng(7)
    n = 120
    spans = [(30, 39), (70, 84)]
    ts = stamps(n)
    win = [(ts[a], ts[b]) for a, b in spans]
    scores = rng.random(n) ** 4
    f = FileScores(KEY, ts, scores)
    for profile in PROFILES.values():
        rows = row_contributions(f, win, profile, 0.5)
        raw = score_corpus([f], {KEY: win}, [profile], threshold=0.5)[profile.name].raw
        assert rows.sum() == pytest.approx(raw, abs=1e-12)
        assert not rows[: probation_length(n)].any()
        for k in (35, 60, 75):
            changed = scores.copy()
            changed[k:] = rng.random(n - k)
            later = row_contributions(FileScores(KEY, ts, changed), win, profile, 0.5)
            np.testing.assert_array_equal(later[:k], rows[:k])
