"""``cityward ingest``: check a payload mapping against sample messages before deploying it."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from pydantic import ValidationError
from rich.console import Console

app = typer.Typer(help="Device ingestion (mappings; adapters to come).", no_args_is_help=True)
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
        config = MappingConfig.model_validate(tomllib.loads(mapping.read_text()))
    except OSError as exc:
        console.print(f"[red]{mapping}[/]: {exc.strerror or exc}")
        raise typer.Exit(2) from exc
    except tomllib.TOMLDecodeError as exc:
        console.print(f"[red]{mapping}[/]: not valid TOML: {exc}")
        raise typer.Exit(2) from exc
    except ValidationError as exc:
        console.print(f"[red]{mapping}[/]: {exc.error_count()} error(s)")
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            console.print(f"  {where}: {err['msg']}")
        raise typer.Exit(2) from exc
    m = Mapping(config)
    console.print(
        f"[green]{mapping}[/]: valid; {config.entity_type}, {len(config.attributes)} attribute(s)"
    )
    if sample is None:
        return
    bad = 0
    for label, payload in _samples(sample):
        if isinstance(payload, _NotJson):
            bad += 1
            console.print(f"[red]{label}[/]: rejected: $: not JSON ({payload.why})")
            continue
        try:
            update = m.apply(payload, topic=topic)
        except MappingError as exc:
            bad += 1
            console.print(f"[red]{label}[/]: rejected: {exc.field}: {exc.reason}")
            continue
        console.print(f"{label}: {update.entity_id} (key {update.message_key})")
        console.print_json(orjson.dumps(update.fragment()).decode())
    if bad:
        raise typer.Exit(1)
