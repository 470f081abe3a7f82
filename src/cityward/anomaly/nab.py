"""The Numenta Anomaly Benchmark's scoring rules: our own implementation, scoring only.

NAB (https://github.com/numenta/NAB) scores a detector's anomaly scores against labelled anomaly
windows. This module follows the rules of NAB's current scorer (``nab/sweeper.py``, used by
``nab/scorer.py`` and ``nab/optimizer.py``) and its normalisation (``nab/runner.py``), written
anew on NumPy. The rules:

* **Rows, not time.** A file is a sequence of rows ``(timestamp, anomaly score in [0, 1])``. All
  positions are row positions: a window is the run of rows whose timestamps lie in
  ``[start, end]`` (both ends inclusive), its width is its number of rows.
* **Detection.** At threshold ``t`` a row *fires* when its anomaly score is ``>= t``.
* **Probationary period.** The first ``probation_length(n)`` rows of an ``n``-row file,
  ``min(floor(0.15 * n), 0.15 * 5000)`` (so at most 750 rows), are ignored: they neither earn
  nor cost anything, and a window counts only if some of its rows lie after them.
* **True positive.** Row ``i`` of a window with rows ``lo..hi`` (width ``w``) sits at relative
  position ``y = -(hi - i + 1) / w`` (``-1`` on the window's first row, ``-1/w`` on its last).
  Only the earliest firing row of a window counts; it earns
  ``A_TP * S(y) / S(-1)``, where ``S(y) = 2 * sigmoid(-5 y) - 1`` is NAB's scaled sigmoid and
  ``S(y) = -1`` for ``y > 3``. A detection on the first row of a window earns exactly ``A_TP``;
  later rows of the same window earn nothing more (and are not false positives).
* **False negative.** A window in which no row fires costs ``A_FN``.
* **False positive.** Every firing row outside all windows costs; with the last window before
  it ending on row ``hi`` with width ``w``, its relative position is
  ``y = (i - hi) / (w - 1)`` and it earns ``A_FP * S(y)`` (negative: close to 0 just after a
  wide window, ``-0.27 A_FP`` one row after a 10-row one, ``-A_FP`` from three window-widths
  on). With no window before it, it costs the full ``A_FP``. (After a one-row window NAB's
  formula divides by zero; we use ``y = 2``, as NAB's earlier ``scorer.Scorer`` did.)
* **Raw score** of a corpus at a threshold: the sum of the above over all files.
* **Threshold.** Per profile, one threshold for the whole corpus: the one, among "nothing fires"
  (reported as 1.1, as NAB does) and every distinct anomaly score of a scored row, with the
  highest raw score; on a tie the highest threshold wins (NAB sorts the candidates, highest
  threshold first, with a stable sort).
* **Normalisation.** ``100 * (raw - null) / (perfect - null)``, where ``null`` is the raw score
  of a detector that never fires (``-A_FN`` per window) and ``perfect`` that of one firing only
  on the first scored row of every window (``A_TP`` per window). A normalised score therefore
  lies in ``[0, 100]`` at the optimised threshold; it is NaN for a corpus without windows.

Counts (``tp``, ``fp``, ``fn``, ``tn``) are NAB's: numbers of *rows* after the probationary
periods (a 10-row window that is detected on two rows adds 2 to ``tp`` and 8 to ``fn``);
``windows`` and ``windows_detected`` count windows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = [
    "NAB_PROFILE_NAMES",
    "NOTHING_FIRES",
    "PROBATION_PERCENT",
    "PROFILES",
    "FileScores",
    "Profile",
    "ProfileResult",
    "Window",
    "labels_for",
    "load_windows",
    "probation_length",
    "row_contributions",
    "score_corpus",
]

#: a labelled anomaly window: (first, last) timestamp, both inclusive
Window = tuple[datetime, datetime]
Timestamps = Sequence[datetime] | npt.NDArray[np.datetime64]

#: share of each file (capped at this share of 5000 rows) that is never scored
PROBATION_PERCENT = 0.15
#: the threshold reported when the best choice is to fire on nothing (above every score)
NOTHING_FIRES = 1.1
_STEEPNESS = 5.0  # the 5 in NAB's sigmoid(-5 y)
_FAR = 3.0  # beyond this relative position a false positive costs the full weight
_SINGLE_ROW_WINDOW_FP_POSITION = 2.0
# Candidates whose raw score is within this of the best count as tied (the highest threshold
# wins, as in NAB): far above the rounding noise of the running sums, far below what one row
# can change (moving a detection by one row in a 20,000-row window changes about 3e-6).
_TIE = 1e-9


@dataclass(frozen=True)
class Profile:
    """An application profile: NAB's cost matrix (``tnWeight`` is unused by NAB's rules)."""

    name: str
    tp: float  # A_TP: reward of a window detected on its first row
    fp: float  # A_FP: cost of a false positive far from any window
    fn: float  # A_FN: cost of a missed window


#: NAB's three profiles (``config/profiles.json``), under our names
PROFILES: dict[str, Profile] = {
    "standard": Profile("standard", tp=1.0, fp=0.11, fn=1.0),
    "reward_low_FP": Profile("reward_low_FP", tp=1.0, fp=0.22, fn=1.0),
    "reward_low_FN": Profile("reward_low_FN", tp=1.0, fp=0.11, fn=2.0),
}
#: our profile names -> NAB's
NAB_PROFILE_NAMES: dict[str, str] = {
    "standard": "standard",
    "reward_low_FP": "reward_low_FP_rate",
    "reward_low_FN": "reward_low_FN_rate",
}


@dataclass(frozen=True)
class FileScores:
    """A detector's anomaly scores for one data file."""

    key: str  # "<category>/<name>.csv", the file's key in the windows file
    timestamps: Timestamps  # never going back; naive datetimes are taken as UTC
    scores: npt.NDArray[np.float64] | Sequence[float]  # one per timestamp, each in [0, 1]


@dataclass(frozen=True)
class ProfileResult:
    """The score of a corpus under one profile."""

    profile: str
    normalized: float  # 100 * (raw - null) / (perfect - null); NaN when the corpus has no window
    raw: float
    threshold: float  # rows with an anomaly score >= threshold fire; 1.1: nothing fires
    tp: int  # rows inside windows that fire (after the probationary periods)
    fp: int  # rows outside windows that fire
    fn: int  # rows inside windows that do not fire
    tn: int  # rows outside windows that do not fire
    null: float  # raw score of a detector that never fires
    perfect: float  # raw score of one that fires on the first scored row of every window
    windows: int  # windows with at least one row after the probationary period
    windows_detected: int


def probation_length(n_rows: int, probation_percent: float = PROBATION_PERCENT) -> int:
    """Number of leading rows of an ``n_rows``-row file that are not scored.

    NAB's ``util.getProbationPeriod``: ``min(floor(p * n), p * 5000)`` (rows with an index at
    least that are scored, hence the ceiling when ``p * 5000`` is not whole).
    """
    if not 0.0 <= probation_percent <= 1.0:
        raise ValueError(f"probation_percent must be in [0, 1], not {probation_percent}")
    return math.ceil(min(math.floor(probation_percent * n_rows), probation_percent * 5000))


def load_windows(path: Path) -> dict[str, list[Window]]:
    """Read NAB's ``combined_windows.json``: ``{"<category>/<name>.csv": [[start, end], ...]}``.

    Times are ``YYYY-MM-DD HH:MM:SS[.ffffff]``; NAB's carry no zone and are read as UTC. The
    datetimes returned are timezone-aware (UTC).
    """
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object of file keys, not {type(raw).__name__}")
    out: dict[str, list[Window]] = {}
    for key, windows in raw.items():
        if not isinstance(windows, list):
            raise ValueError(f"{path}: {key}: expected a list of [start, end] pairs")
        parsed: list[Window] = []
        for k, pair in enumerate(windows):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ValueError(f"{path}: {key}: window {k} is not a [start, end] pair: {pair}")
            try:
                start, end = (_utc(datetime.fromisoformat(str(t))) for t in pair)
            except ValueError as e:
                raise ValueError(f"{path}: {key}: window {k}: {e}") from None
            parsed.append((start, end))
        out[key] = parsed
    return out


def labels_for(timestamps: Timestamps, windows_of_file: Sequence[Window]) -> npt.NDArray[np.int8]:
    """1 for every row whose timestamp lies in a window (ends inclusive), else 0."""
    ts = _datetime64(timestamps, "timestamps")
    labels = np.zeros(len(ts), dtype=np.int8)
    for start, end in windows_of_file:
        s, e = _datetime64([start, end], "window")
        labels[(ts >= s) & (ts <= e)] = 1
    return labels


def score_corpus(
    files: Sequence[FileScores],
    windows: Mapping[str, Sequence[Window]],
    profiles: Sequence[Profile] = tuple(PROFILES.values()),
    *,
    probation_percent: float = PROBATION_PERCENT,
    threshold: float | None = None,
) -> dict[str, ProfileResult]:
    """Score a corpus under each profile; keys are the profiles' names.

    Each profile gets the corpus-wide threshold that maximises its raw score, unless
    ``threshold`` is given (then every profile is scored at it, as NAB's score step does with a
    fixed threshold). ``windows`` must have an entry (possibly empty) for every file.

    Raises ValueError, naming the file and the row or window, for a file missing from
    ``windows``, timestamps that go back, an anomaly score that is NaN or
    outside [0, 1], and windows that are reversed, overlap, are out of order or hold no row.
    """
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise ValueError(f"profile names must be unique: {names}")
    if threshold is not None and math.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    corpus = _Corpus.build(files, windows, probation_percent)
    if threshold is None:
        sweep = corpus.sweep()
        chosen = {p.name: corpus.best_threshold(sweep, p) for p in profiles}
    else:
        chosen = {p.name: threshold for p in profiles}
    return {p.name: corpus.result(p, chosen[p.name]) for p in profiles}


def row_contributions(
    file: FileScores,
    windows_of_file: Sequence[Window],
    profile: Profile,
    threshold: float,
    *,
    probation_percent: float = PROBATION_PERCENT,
) -> npt.NDArray[np.float64]:
    """What each row of one file adds to the raw score at ``threshold``; they sum to it.

    A true positive's reward sits on the window's earliest firing row, a false positive's cost
    on its row, and a missed window's cost on the window's last row (where the miss becomes
    certain), so a row's contribution depends on no anomaly score after it. (NAB's results
    files instead hold, per row, the value the row would earn if it fired.)
    """
    rows = _FileRows.build(file, windows_of_file, probation_percent)
    out = np.zeros(rows.n, dtype=np.float64)
    scored = np.arange(rows.n) >= rows.probation
    fired = scored & (rows.scores >= threshold)
    outside = rows.window < 0
    out[fired & outside] = profile.fp * rows.unit[fired & outside]
    for lo, hi in zip(rows.lo.tolist(), rows.hi.tolist(), strict=True):
        if hi < rows.probation:
            continue  # entirely in the probationary period: does not count
        hits = np.flatnonzero(fired[lo : hi + 1])
        if hits.size:
            first = lo + int(hits[0])
            out[first] = profile.tp * rows.unit[first]
        else:
            out[hi] = -profile.fn
    return out


# --- internals ----------------------------------------------------------------------------------


def _scaled_sigmoid(position: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """NAB's ``scaledSigmoid``: ``2 * sigmoid(-5 y) - 1``, and ``-1`` for ``y > 3``."""
    near = np.minimum(position, _FAR)  # keeps exp() finite; the far side is overwritten below
    value = 2.0 * (1.0 / (1.0 + np.exp(_STEEPNESS * near))) - 1.0
    return np.where(position > _FAR, -1.0, value)


_MAX_TP = float(_scaled_sigmoid(np.array([-1.0]))[0])  # S(-1) = 2 * sigmoid(5) - 1 = 0.98661...


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE = datetime(1970, 1, 1)
_MICROSECOND = timedelta(microseconds=1)


def _datetime64(values: Timestamps | Sequence[datetime], what: str) -> npt.NDArray[np.datetime64]:
    """Timestamps as ``datetime64[us]`` on the UTC clock (naive datetimes are taken as UTC)."""
    if isinstance(values, np.ndarray) and values.dtype.kind == "M":
        return values.astype("datetime64[us]")
    try:  # exact integer microseconds since the epoch, without a Python call per row
        micros = np.fromiter(
            (
                (v - (_EPOCH_NAIVE if v.tzinfo is None else _EPOCH_UTC)) // _MICROSECOND
                for v in values
            ),
            dtype=np.int64,
            count=len(values),
        )
    except (TypeError, AttributeError):
        for i, v in enumerate(values):
            if not isinstance(v, datetime):
                raise ValueError(f"{what}: row {i}: not a datetime: {v!r}") from None
        raise ValueError(f"{what}: the timestamps are not usable datetimes") from None
    return micros.astype("datetime64[us]")


@dataclass
class _FileRows:
    """One file, checked, with each row's unweighted value and window."""

    key: str
    n: int
    probation: int
    scores: npt.NDArray[np.float64]
    # unweighted value if the row fires: S(y)/S(-1) inside a window (times A_TP), S(y) or -1
    # outside (times A_FP)
    unit: npt.NDArray[np.float64]
    window: npt.NDArray[np.int64]  # index of the row's window in this file, -1 outside
    lo: npt.NDArray[np.int64]  # first row of each window
    hi: npt.NDArray[np.int64]  # last row of each window

    @classmethod
    def build(
        cls, file: FileScores, windows_of_file: Sequence[Window], probation_percent: float
    ) -> _FileRows:
        key = file.key
        ts = _datetime64(file.timestamps, key)
        scores = np.asarray(file.scores, dtype=np.float64)
        n = len(ts)
        if scores.ndim != 1 or len(scores) != n:
            raise ValueError(f"{key}: {n} timestamps but anomaly scores of shape {scores.shape}")
        bad = ~((scores >= 0.0) & (scores <= 1.0))  # NaN fails both
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{key}: row {i}: anomaly score {float(scores[i])!r} is not in [0, 1]")
        if np.isnat(ts).any():
            i = int(np.argmax(np.isnat(ts)))
            raise ValueError(f"{key}: row {i}: the timestamp is missing (NaT)")
        if n > 1:
            # equal neighbours happen in real data (NAB's own files repeat the hour a clock
            # was set back); a step back in time does not
            steps = np.diff(ts) < np.timedelta64(0, "us")
            if steps.any():
                i = int(np.argmax(steps)) + 1
                raise ValueError(
                    f"{key}: row {i}: timestamp {ts[i]} is before row {i - 1}'s {ts[i - 1]} "
                    "(timestamps must not go back)"
                )

        bounds = _datetime64([t for w in windows_of_file for t in w], f"{key} windows")
        starts, ends = bounds[0::2], bounds[1::2]
        for k in range(len(starts)):
            if starts[k] > ends[k]:
                raise ValueError(f"{key}: window {k} ends ({ends[k]}) before it starts")
            if k and starts[k] <= ends[k - 1]:
                raise ValueError(
                    f"{key}: window {k} (from {starts[k]}) overlaps or precedes window {k - 1} "
                    f"(to {ends[k - 1]}); windows must be disjoint and in time order"
                )
        lo = np.searchsorted(ts, starts, side="left").astype(np.int64)
        hi = (np.searchsorted(ts, ends, side="right") - 1).astype(np.int64)
        empty = lo > hi
        if empty.any():
            k = int(np.argmax(empty))
            raise ValueError(f"{key}: window {k} ({starts[k]} to {ends[k]}) contains no row")

        rows = np.arange(n, dtype=np.int64)
        unit = np.empty(n, dtype=np.float64)
        window = np.full(n, -1, dtype=np.int64)
        width = hi - lo + 1
        for k, (a, b) in enumerate(zip(lo.tolist(), hi.tolist(), strict=True)):
            window[a : b + 1] = k
            # NAB sweeper.calcSweepScore: positionInWindow = -(right - i + 1) / width
            position = -(b - rows[a : b + 1] + 1) / float(b - a + 1)
            unit[a : b + 1] = _scaled_sigmoid(position) / _MAX_TP
        outside = rows[window < 0]
        before = np.searchsorted(hi, outside, side="left") - 1  # last window ending before
        value = np.full(len(outside), -1.0)  # no window before: the full cost
        has = before >= 0
        prev = before[has]
        w_prev = width[prev]
        distance = (outside[has] - hi[prev]).astype(np.float64)
        # NAB: positionPastWindow = |right - i| / (width - 1)
        position = np.where(
            w_prev > 1, distance / np.maximum(w_prev - 1, 1), _SINGLE_ROW_WINDOW_FP_POSITION
        )
        value[has] = _scaled_sigmoid(position)
        unit[outside] = value
        return cls(key, n, probation_length(n, probation_percent), scores, unit, window, lo, hi)


@dataclass
class _Sweep:
    """Raw-score parts for each candidate threshold, highest threshold first."""

    thresholds: npt.NDArray[np.float64]  # [NOTHING_FIRES, distinct scores descending]
    tp_value: npt.NDArray[np.float64]  # sum over detected windows of S(y)/S(-1), earliest row
    fp_value: npt.NDArray[np.float64]  # sum over firing rows outside windows of S(y) (<= 0)
    detected: npt.NDArray[np.int64]  # windows detected


@dataclass
class _Corpus:
    """The scored rows (after the probationary periods) of all files, concatenated in order."""

    scores: npt.NDArray[np.float64]
    unit: npt.NDArray[np.float64]
    window: npt.NDArray[np.int64]  # corpus-wide window id, -1 outside; non-decreasing inside
    n_windows: int  # windows with at least one scored row

    @classmethod
    def build(
        cls,
        files: Sequence[FileScores],
        windows: Mapping[str, Sequence[Window]],
        probation_percent: float,
    ) -> _Corpus:
        seen: set[str] = set()
        scores: list[npt.NDArray[np.float64]] = []
        unit: list[npt.NDArray[np.float64]] = []
        window: list[npt.NDArray[np.int64]] = []
        offset = 0
        for f in files:
            if f.key in seen:
                raise ValueError(f"{f.key}: the file is given twice")
            seen.add(f.key)
            if f.key not in windows:
                raise ValueError(f"{f.key}: the file has no entry in the windows (labels)")
            rows = _FileRows.build(f, windows[f.key], probation_percent)
            keep = slice(rows.probation, None)
            w = rows.window[keep]
            scores.append(rows.scores[keep])
            unit.append(rows.unit[keep])
            window.append(np.where(w >= 0, w + offset, -1))
            offset += len(rows.lo)
        cat_scores = np.concatenate(scores) if scores else np.zeros(0)
        cat_window = np.concatenate(window) if window else np.zeros(0, dtype=np.int64)
        inside = cat_window[cat_window >= 0]
        n_windows = int(np.count_nonzero(np.diff(inside))) + 1 if inside.size else 0
        return cls(
            cat_scores.astype(np.float64),
            np.concatenate(unit) if unit else np.zeros(0),
            cat_window.astype(np.int64),
            n_windows,
        )

    def sweep(self) -> _Sweep:
        """Raw-score parts at every candidate threshold at once (sort once, cumulative sums).

        A window's reward at threshold ``t`` is that of its earliest row scoring ``>= t``. Row
        ``r`` is that row exactly for ``m_r < t <= s_r``, where ``s_r`` is its score and ``m_r``
        the highest score of the window's earlier scored rows; so each row adds its value over
        one interval of the descending threshold list, and a difference array sums them.
        """
        distinct, rank = np.unique(self.scores, return_inverse=True)  # ascending
        m = len(distinct)
        desc = (m - 1) - rank.astype(np.int64)  # index of each row's score, highest first
        inside = self.window >= 0
        out = ~inside
        fp_value = np.cumsum(np.bincount(desc[out], weights=self.unit[out], minlength=m))

        win = self.window[inside]
        r1 = rank[inside].astype(np.int64) + 1  # 1..m
        base = win * (m + 1)
        running = np.maximum.accumulate(base + r1) if win.size else base  # restarts per window
        first = np.ones(win.size, dtype=bool)
        first[1:] = win[1:] != win[:-1]
        before = np.zeros(win.size, dtype=np.int64)  # rank+1 of the best earlier row, 0: none
        before[1:] = running[:-1] - base[1:]
        before[first] = 0
        record = r1 > before  # scores above every earlier row of its window
        begin = desc[inside][record]
        end = m - before[record]  # == m (never) when no earlier row
        value = self.unit[inside][record]
        tp_steps = np.bincount(begin, weights=value, minlength=m + 1) - np.bincount(
            end, weights=value, minlength=m + 1
        )
        det_steps = np.bincount(begin, minlength=m + 1) - np.bincount(end, minlength=m + 1)
        zero_f, zero_i = np.zeros(1), np.zeros(1, dtype=np.int64)
        return _Sweep(
            np.concatenate([[NOTHING_FIRES], distinct[::-1]]).astype(np.float64),
            np.concatenate([zero_f, np.cumsum(tp_steps)[:m]]),
            np.concatenate([zero_f, fp_value]),
            np.concatenate([zero_i, np.cumsum(det_steps)[:m].astype(np.int64)]),
        )

    def best_threshold(self, sweep: _Sweep, profile: Profile) -> float:
        """NAB's optimiser: the highest threshold among those with the best raw score."""
        raw = (
            profile.tp * sweep.tp_value
            + profile.fp * sweep.fp_value
            - profile.fn * (self.n_windows - sweep.detected)
        )
        best = int(np.argmax(raw >= raw.max() - _TIE))
        return float(sweep.thresholds[best])

    def result(self, profile: Profile, threshold: float) -> ProfileResult:
        """The score at one threshold, summed directly (no running sums)."""
        fired = self.scores >= threshold
        inside = self.window >= 0
        fp_rows = fired & ~inside
        tp_rows = fired & inside
        hit = self.window[tp_rows]
        earliest = np.ones(hit.size, dtype=bool)
        earliest[1:] = hit[1:] != hit[:-1]
        detected = int(np.count_nonzero(earliest))
        raw = (
            profile.tp * float(self.unit[tp_rows][earliest].sum())
            + profile.fp * float(self.unit[fp_rows].sum())
            - profile.fn * (self.n_windows - detected)
        )
        win = self.window[inside]
        starts = np.ones(win.size, dtype=bool)
        starts[1:] = win[1:] != win[:-1]
        perfect = profile.tp * float(self.unit[inside][starts].sum())
        null = -profile.fn * self.n_windows
        span = perfect - null
        n_tp, n_fp = int(np.count_nonzero(tp_rows)), int(np.count_nonzero(fp_rows))
        return ProfileResult(
            profile=profile.name,
            normalized=100.0 * (raw - null) / span if span > 0 else math.nan,
            raw=raw,
            threshold=float(threshold),
            tp=n_tp,
            fp=n_fp,
            fn=int(np.count_nonzero(inside)) - n_tp,
            tn=int(np.count_nonzero(~inside)) - n_fp,
            null=null,
            perfect=perfect,
            windows=self.n_windows,
            windows_detected=detected,
        )
