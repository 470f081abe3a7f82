"""File replay: CSV or JSON lines with a time column, in real time or accelerated.

Used by the demo and the tests, and to load a device's backlog. Each CSV row becomes a JSON
object of its columns (strings: the mapping reads numbers from strings); each JSON line is
one message. With ``speed`` > 0 the rows are paced by ``time_field`` (1 = as they happened,
60 = a minute per second); with 0 they go as fast as the writer takes them.

Replaying a file twice writes nothing twice: the writer's delivery keys (the mapping's
message id, or entity and observation time) recognise rows it has applied.
"""

from __future__ import annotations

import csv
import logging
import re
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import Field, model_validator

from cityward.ingest.adapters import Adapter, AdapterConfig, Intake
from cityward.ingest.mapping import _MISSING, compile_path, resolve

log = logging.getLogger("cityward.ingest.replay")

_BOM = b"\xef\xbb\xbf"
# what surrogateescape makes of bytes that are not UTF-8
_UNDECODED = re.compile("[\udc80-\udcff]")
CSV_FIELD_LIMIT = 16 * 1024 * 1024
LOOP_MIN_S = 1.0  # loop: a pass takes at least this long (see ReplayAdapter._run)


class ReplayFileError(ValueError):
    """A file the replay cannot read at all (its CSV header is not UTF-8): the replay fails."""


class ReplayConfig(AdapterConfig):
    path: Path = Field(description="The file: .csv, or .jsonl / .ndjson (JSON lines).")
    format: Literal["auto", "csv", "jsonl"] = Field(
        default="auto", description="auto: from the file's suffix."
    )
    time_field: str | None = Field(
        default=None,
        description="Path of the time that paces the replay, e.g. $.ts (CSV: $.column).",
    )
    time_format: Literal["iso8601", "epoch_s", "epoch_ms"] = "iso8601"
    speed: float = Field(
        default=0.0, ge=0, le=1e6, description="1: real time; 60: a minute per second; 0: flat out."
    )
    loop: bool = Field(default=False, description="Start again at the end (demo feeds).")
    topic: str = Field(default="", description="The topic the mapping's {topic[N]} reads.")

    @model_validator(mode="after")
    def _check(self) -> ReplayConfig:
        if self.time_field is not None:
            compile_path(self.time_field)
        if self.speed > 0 and self.time_field is None:
            raise ValueError("a paced replay (speed > 0) needs time_field")
        return self

    @property
    def kind(self) -> str:
        if self.format != "auto":
            return self.format
        return "csv" if self.path.suffix.lower() == ".csv" else "jsonl"


class ReplayAdapter(Adapter):
    name = "replay"
    summary = "replays a CSV or JSON-lines file, paced by its time column or flat out"
    Config = ReplayConfig
    config: ReplayConfig

    def __init__(self, config: AdapterConfig, intake: Intake) -> None:
        super().__init__(config, intake)
        self.finished = threading.Event()
        self.rows = 0
        self.failed: str | None = None  # why the replay stopped before the end of the file
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._time_keys = compile_path(self.config.time_field) if self.config.time_field else None
        # loop: the rows the first pass found unusable, skipped on later passes (each pass
        # stored them again as new dead letters, thousands a second, without bound)
        self._passes = 0
        self._bad_rows: set[int] = set()

    def start(self) -> None:
        if not self.config.path.is_file():
            raise FileNotFoundError(f"replay source {self.intake.name}: no file {self.config.path}")
        self._thread = threading.Thread(
            target=self._run, name=f"ingest-replay-{self.intake.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def status(self) -> dict[str, Any]:
        return {"rows": self.rows, "finished": self.finished.is_set(), "failed": self.failed}

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                self._replay_once()
                if not self.config.loop:
                    break
                self._passes += 1
                # a pass of a small (or empty) file flat out took microseconds: passes were a
                # busy loop, a core at 100 %; at most one a second
                if self._stop.wait(max(0.0, LOOP_MIN_S - (time.monotonic() - started))):
                    break
        except ReplayFileError as exc:  # a mistake in the file, not in cityward: no traceback
            self.failed = f"{self.config.path}: {exc}"
            log.error("ingest %s: replay failed: %s", self.intake.name, self.failed)
        except Exception as exc:
            self.failed = f"{type(exc).__name__}: {exc}"
            log.exception("ingest %s: replaying %s failed", self.intake.name, self.config.path)
        finally:
            self.finished.set()

    def _replay_once(self) -> None:
        c = self.config
        first_t: float | None = None
        started = time.monotonic()
        again = self._passes > 0
        for n, (raw, doc, unusable) in enumerate(self._messages()):
            if self._stop.is_set():
                return
            if again and n in self._bad_rows:
                continue  # its dead letter was stored on the first pass
            if unusable is not None:  # a row the file's format itself spoils: a dead letter
                self.rows += 1
                self.intake.dead(raw, c.topic, "$", unusable)
                self._bad_rows.add(n)
                continue
            if c.speed > 0 and doc is not None:
                t = self._time_of(doc)
                if t is not None:
                    if first_t is None:
                        first_t = t
                    wait = started + (t - first_t) / c.speed - time.monotonic()
                    if wait > 0 and self._stop.wait(wait):
                        return
            self.rows += 1
            while not self._stop.is_set():
                try:
                    if self.intake.receive(raw, topic=c.topic, decoded=doc, timeout=1.0):
                        self._bad_rows.add(n)  # refused by the mapping: a dead letter
                    break
                except TimeoutError:
                    continue

    def _messages(self) -> Iterator[tuple[bytes, Any, str | None]]:
        """(raw bytes, decoded message or None when it is not JSON, why the row cannot be used
        or None). A bad row never ends the file: one with more fields than the header, bytes
        that are not UTF-8, or a field the csv module refuses each become a dead letter (they
        used to end the replay there, with exit status 0)."""
        if self.config.kind == "csv":
            yield from self._csv_rows()
            return
        with self.config.path.open("rb") as fh:
            for n, line in enumerate(fh):
                if n == 0 and line.startswith(_BOM):
                    line = line[len(_BOM) :]  # as the CSV reader does (utf-8-sig)
                if not line.strip():
                    continue
                try:
                    yield line.rstrip(b"\r\n"), orjson.loads(line), None
                except orjson.JSONDecodeError:
                    # handed over undecoded: the intake makes it a dead letter with the reason
                    yield line.rstrip(b"\r\n"), None, None

    def _csv_rows(self) -> Iterator[tuple[bytes, Any, str | None]]:
        # a field of a CSV export may be a whole JSON document: the csv module's default limit
        # (128 KiB) refused such a row
        csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
        # undecodable bytes are kept as surrogates so that one bad row spoils only itself
        with self.config.path.open(
            newline="", encoding="utf-8-sig", errors="surrogateescape"
        ) as fh:
            # the lines each record was read from: a dead letter keeps the row as the file
            # has it (quotes and all). Made of the parsed fields it lost the quoting, and a row
            # the csv module refused had no payload at all.
            consumed: list[str] = []

            def lines() -> Iterator[str]:
                for line in fh:
                    consumed.append(line)
                    yield line

            def taken() -> bytes:
                text = "".join(consumed).rstrip("\r\n")
                consumed.clear()
                return text.encode("utf-8", "surrogateescape")

            reader = csv.reader(lines())
            header: list[str] | None = None
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    yield taken(), None, f"line {reader.line_num}: not a CSV row: {exc}"
                    continue
                raw = taken()
                if not row:
                    # a blank line (csv.DictReader skips them too); before the header as well:
                    # taken as an empty header, it made every row a dead letter
                    continue
                if any(_UNDECODED.search(field) for field in row):
                    if header is None:
                        # no header to read rows by: nothing in the file is usable, and a
                        # replay that read nothing and said nothing looked like a success
                        raise ReplayFileError(
                            f"line {reader.line_num}: the CSV header is not UTF-8 text "
                            "(save the file as UTF-8)"
                        )
                    yield raw, None, f"line {reader.line_num}: not UTF-8 text"
                    continue
                if header is None:
                    header = row
                    continue
                if len(row) > len(header):
                    yield (
                        raw,
                        None,
                        f"line {reader.line_num}: {len(row)} fields, the header has {len(header)}",
                    )
                    continue
                doc: dict[str, str | None] = dict(zip(header, row, strict=False))
                for name in header[len(row) :]:
                    doc.setdefault(name, None)  # a short row, as csv.DictReader fills it
                yield orjson.dumps(doc), doc, None

    def _time_of(self, doc: Any) -> float | None:
        assert self._time_keys is not None
        raw = resolve(doc, self._time_keys)
        if raw is _MISSING or raw is None:
            return None
        try:
            if self.config.time_format == "iso8601":
                return datetime.fromisoformat(str(raw).replace("Z", "+00:00")).timestamp()
            n = float(raw)
            return n / 1000 if self.config.time_format == "epoch_ms" else n
        except (ValueError, TypeError):
            return None
