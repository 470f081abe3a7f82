"""``cityward ingest``: check a payload mapping against sample messages before deploying it."""

from __future__ import annotations

import os
import sys
import time
import tomllib
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from cityward.cliutil import invalid, settings_or_exit, unreadable

app = typer.Typer(
    help="Device ingestion: run the sources, check mappings, see dead letters.",
    no_args_is_help=True,
)
console = Console()


def _samples(path: Path) -> list[tuple[str, Any]]:
    """(label, payload) from a JSON file (one message or a list) or JSON lines."""
    raw = path.read_bytes()
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        out = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append((f"line {n}", orjson.loads(line)))
            except orjson.JSONDecodeError as exc:
                out.append((f"line {n}", _NotJson(str(exc))))
        return out
    if isinstance(doc, list):
        return [(f"item {n}", d) for n, d in enumerate(doc, 1)]
    return [("message", doc)]


class _NotJson:
    def __init__(self, why: str) -> None:
        self.why = why


@app.command("check")
def check(
    mapping: Annotated[Path, typer.Argument(help="A mapping in TOML (see docs/ingest.md).")],
    sample: Annotated[
        Path | None,
        typer.Option(help="Messages to map: a JSON file (one or a list) or JSON lines."),
    ] = None,
    topic: Annotated[str, typer.Option(help="The MQTT topic the messages came on.")] = "",
) -> None:
    """Validate a mapping and show what it makes of sample messages.

    Exit code 2: the mapping is invalid; 1: some sample messages are rejected; 0: all good.
    """
    from cityward.ingest.mapping import Mapping, MappingConfig, MappingError

    try:
        # TOML is UTF-8 whatever the locale; a file in another encoding was a traceback
        config = MappingConfig.model_validate(tomllib.loads(mapping.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        unreadable(mapping, exc)
    except ValidationError as exc:
        invalid(mapping, exc)
    m = Mapping(config)
    console.print(
        f"[green]{escape(str(mapping))}[/]: valid; {escape(config.entity_type)}, "
        f"{len(config.attributes)} attribute(s)"
    )
    if sample is None:
        return
    try:
        samples = _samples(sample)
    except OSError as exc:  # a usage error (exit 2), not rejected samples (exit 1)
        console.print(f"[red]--sample {escape(str(sample))}[/]: {escape(str(exc.strerror or exc))}")
        raise typer.Exit(2) from exc
    bad = 0
    for label, payload in samples:
        if isinstance(payload, _NotJson):
            bad += 1
            console.print(f"[red]{escape(label)}[/]: rejected: $: not JSON ({escape(payload.why)})")
            continue
        try:
            update = m.apply(payload, topic=topic)
        except MappingError as exc:
            bad += 1
            console.print(
                f"[red]{escape(label)}[/]: rejected: {escape(exc.field)}: {escape(exc.reason)}"
            )
            continue
        console.print(
            f"{escape(label)}: {escape(update.entity_id)} (key {escape(update.message_key)})"
        )
        console.print_json(orjson.dumps(update.fragment()).decode())
    if bad:
        raise typer.Exit(1)


def _settings(config: Path | None, data_dir: Path | None, database_url: str | None) -> Any:
    return settings_or_exit(config, data_dir=data_dir, database_url=database_url)


ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", exists=True, help="The TOML configuration with \\[ingest] sources."),
]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Data folder (SQLite bank, dead letters).")
]
DbOpt = Annotated[
    str | None, typer.Option("--database-url", help="postgresql://... for a PostgreSQL bank.")
]


@app.command("run")
def run(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    role: Annotated[
        str,
        typer.Option(
            help='With \\[bus] kind = "nats": front (the adapters, publishing readings to '
            "JetStream), writer (readings from JetStream into the bank) or all (both).",
        ),
    ] = "all",
    status_every: Annotated[
        float, typer.Option(help="Seconds between status lines (0: none).")
    ] = 10.0,
    exit_when_done: Annotated[
        bool,
        typer.Option(help="Stop once every replay source has finished (batch loads, tests)."),
    ] = False,
) -> None:
    """Run the configured sources in this process until SIGINT or SIGTERM.

    Readings are written into the bank with their history; subscriptions are notified by the
    `cityward serve` process of the same bank. With \\[bus] kind = "nats" the work can be split
    over processes and machines with --role (docs/bus.md).
    """
    import logging
    import signal
    import threading

    from cityward.bank.history import History
    from cityward.bank.service import Bank
    from cityward.bank.store import Store, open_store
    from cityward.bank.subscriptions.service import Subscriptions
    from cityward.bus.feed import ChangeBus
    from cityward.ingest.adapters.replay import ReplayAdapter
    from cityward.ingest.deadletter import DeadLetters
    from cityward.ingest.worker import ROLES, IngestWorker, calm_gc

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings(config, data_dir, database_url)
    ingest = settings.ingest
    nats = settings.bus.kind == "nats"
    if role not in ROLES:
        console.print(f"[red]--role {escape(role)}[/]: front, writer or all")
        raise typer.Exit(2)
    if role != "all" and not nats:
        console.print(
            f'[red]--role {escape(role)}[/] needs \\[bus] kind = "nats" (docs/bus.md); '
            "in memory mode one process receives and writes"
        )
        raise typer.Exit(2)
    if role != "writer" and not [s for s in ingest.sources if s.enabled]:
        console.print("[red]no enabled \\[\\[ingest.sources]] in the configuration[/]")
        raise typer.Exit(2)
    if role != "writer" and (missing := _missing_files(ingest)):
        # checked here, by the roles that run the sources, not when the configuration loads:
        # a writer machine of a NATS deployment reads the same file without the fronts' files
        for line in missing:
            console.print(f"[red]{escape(line)}[/]")
        raise typer.Exit(2)
    resolver = settings.context_resolver()
    store: Store | None = None
    bank: Bank | None = None
    changes: ChangeBus | None = None
    if role != "front":  # a front only publishes: it needs no database
        store = open_store(
            settings.database_url,
            settings.data_dir,
            connect_timeout_s=settings.database_connect_timeout_s,
        )
        bank = Bank(store)
        History(store, bank)
        Subscriptions(store, bank, resolver)  # queues notifications; `serve` delivers them
        if nats:
            # the writes' changes go through the outbox to every process's feed, as with
            # `cityward serve`'s own writes (no followers here: nobody listens in this process)
            changes = ChangeBus(settings.bus, store, bank, name=f"cityward-ingest-{os.getpid()}")
    dead = DeadLetters(
        settings.data_dir / "ingest" / "deadletter.db", max_payload=ingest.deadletter_max_payload
    )
    worker = IngestWorker(
        bank,
        ingest,
        dead,
        context=resolver.core,
        bus=settings.bus,
        role=role,  # checked against ROLES above
        name=f"cityward-ingest-{role}-{os.getpid()}",
        front_process=ingest.front_process,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if changes is not None:
        changes.start()
    calm_gc()
    worker.start()
    names = ", ".join(f"{n} ({a.name})" for n, a in worker.adapters.items())
    what = f"{role}: " if nats else ""
    console.print(f"[green]ingest[/] running: {what}{names or 'the stream into the bank'}")
    replays = [a for a in worker.adapters.values() if isinstance(a, ReplayAdapter)]
    # the time of the last status line, not the clock modulo the period: a period under half a
    # second was a ZeroDivisionError, and one not a multiple of 0.5 s drifted
    last_status = time.monotonic()
    try:
        while not stop.wait(min(status_every, 0.5) if status_every > 0 else 0.5):
            if exit_when_done and replays and all(r.finished.is_set() for r in replays):
                break
            if status_every > 0 and time.monotonic() - last_status >= status_every:
                last_status = time.monotonic()
                _status_line(worker.status())
    finally:
        worker.stop()
        last = worker.status()
        _status_line(last)
        # what the writer still held when its drain ran out (a locked or unreachable bank):
        # a load that leaves readings unwritten is not a success
        pending = int(last["pending"])
        if changes is not None:
            changes.stop()
        writing = worker.writer_still_writing
        if not writing:  # else its thread still uses them: the process ends without closing
            dead.close()
            if store is not None:
                store.close()
    failed = [f"{r.intake.name}: {r.failed}" for r in replays if r.failed]
    if failed:  # a load that stopped before the end of its file is not a success
        console.print(f"[red]replay failed[/]: {escape('; '.join(failed))}")
    if pending > 0:
        console.print(
            f"[red]{pending:,} reading(s) not written[/]: still pending when the worker stopped"
        )
    if writing:
        # a thread still inside SQLite or psycopg: the interpreter's shutdown would free what
        # it uses under it (a crash, exit -11, under load); its batch is not acknowledged
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    if failed or pending > 0:
        raise typer.Exit(1)


def _missing_files(ingest: Any) -> list[str]:
    """The files enabled sources name that do not exist, each with its setting (a missing one
    was a traceback when the source started)."""
    out = []
    for n, source in enumerate(ingest.sources):
        if not source.enabled:
            continue
        options = source.adapter_config()
        for name in ("path", "password_file", "ca_file", "cert_file", "key_file"):
            value = getattr(options, name, None)
            if isinstance(value, Path) and not value.is_file():
                out.append(f"ingest.sources.{n}.options.{name}: no file {value}")
    return out


def _status_line(status: dict[str, Any]) -> None:
    dead = sum(s["dead_letters"] for s in status["sources"].values())
    parts = []
    if "published" in status:
        parts.append(f"published {status['published']['published']:,}")
    w = status["writer"]
    if w:
        parts.append(
            f"written {w['written']:,} ({status['rate_per_s']:,.0f}/s), "
            f"duplicates {w['duplicates']:,}"
        )
    if "pulled" in status:
        parts.append(f"redelivered {status['pulled']['redelivered']:,}")
    parts.append(f"dead letters {dead:,}, pending {status['pending']:,}")
    if w:
        parts.append(f"write failures {w['write_failures']:,}")
    console.print(", ".join(parts))


@app.command("adapters")
def adapters() -> None:
    """List the device adapters and their options."""
    from cityward.ingest.adapters import load_builtin
    from cityward.plugins import settings_table

    console.print(settings_table("ingest adapters", load_builtin()))


@app.command("dead-letters")
def dead_letters(
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    source: Annotated[str | None, typer.Option(help="Only this source.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="How many to show.")] = 20,
    purge: Annotated[bool, typer.Option(help="Delete them (of --source, or all).")] = False,
) -> None:
    """Show the messages the sources could not use, with the reason (or purge them)."""
    from cityward.ingest.deadletter import DeadLetters

    settings = _settings(config, data_dir, None)
    path = settings.data_dir / "ingest" / "deadletter.db"
    if not path.exists():
        console.print(f"no dead letters ({escape(str(path))} does not exist)")
        return
    dead = DeadLetters(path)
    try:
        if purge:
            console.print(f"purged {dead.purge(source)} dead letter(s)")
            return
        counts = dead.counts()
        console.print(
            "dead letters per source: "
            + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none")
        )
        for d in dead.entries(source, limit=limit):
            text = d.payload.decode("utf-8", "replace")
            console.print(
                f"#{d.seq} {d.received_at} [bold]{escape(d.source)}[/] {escape(d.topic)} "
                f"[red]{escape(d.field)}: {escape(d.reason)}[/]\n"
                f"   {escape(text[:200])}{' (cut)' if d.truncated else ''}",
                highlight=False,
                markup=True,
            )
    finally:
        dead.close()
