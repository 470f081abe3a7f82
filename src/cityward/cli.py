"""The ``cityward`` command line: serve the data bank, run the demo city."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cityward.config import SETTINGS_ENV, load_settings

app = typer.Typer(help="cityward: privacy-by-design city operations.", no_args_is_help=True)
console = Console()

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Data folder (SQLite database lives here). Also read from CITYWARD_DATA_DIR.",
    ),
]
ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="TOML configuration file.", exists=True)
]


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 1026,
    data_dir: DataDir = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url", help="postgresql://... to use PostgreSQL instead of SQLite."
        ),
    ] = None,
    config: ConfigFile = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1, max=64, help="Worker processes (each a full API node on the same store)."
        ),
    ] = 1,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve the NGSI-LD API (SQLite in the data folder unless --database-url is given)."""
    import uvicorn

    from cityward.api.app import create_app

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = load_settings(config, data_dir=data_dir, database_url=database_url)
    backend = "PostgreSQL" if settings.database_url else f"SQLite in {settings.data_dir.resolve()}"
    console.print(f"[bold green]cityward[/] data bank on {backend}")
    console.print(f"NGSI-LD API at http://{host}:{port}/ngsi-ld/v1/entities")
    if workers > 1:
        # worker processes build their own app from the same settings (see app_from_env)
        os.environ[SETTINGS_ENV] = settings.model_dump_json()
        _serve_workers(host, port, workers, log_level)
        return
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


def _serve_workers(host: str, port: int, workers: int, log_level: str) -> None:
    """uvicorn's multi-process mode on a listening socket we open ourselves.

    uvicorn opens it with protocol 0; the connections accepted from such a socket carry protocol
    0 too, so asyncio skips TCP_NODELAY on them and every response waits ~40 ms for the peer's
    delayed ACK (Nagle). Opening it with IPPROTO_TCP keeps NODELAY on.
    """
    import socket

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(
        "cityward.api.app:app_from_env",
        factory=True,
        workers=workers,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise typer.BadParameter(f"cannot listen on {host}:{port}: {exc}") from exc
    sock.set_inheritable(True)
    with contextlib.suppress(KeyboardInterrupt):
        Multiprocess(config, sockets=[sock]).run()


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="TCP port.")] = 1026,
    data_dir: DataDir = None,
    no_browser: Annotated[
        bool, typer.Option("--no-browser", help="Do not open a browser.")
    ] = False,
    seed_only: Annotated[
        bool, typer.Option("--seed-only", help="Create the demo city's entities and exit.")
    ] = False,
) -> None:
    """An embedded demo city on SQLite: sensors and signals in the data bank, served locally."""
    import uvicorn

    from cityward.api.app import create_app
    from cityward.demo import seed_city

    directory = data_dir or Path(os.environ.get("CITYWARD_DATA_DIR", "cityward-demo"))
    settings = load_settings(None, data_dir=directory)
    application = create_app(settings)
    bank = application.state.runtime.bank
    created = seed_city(bank)
    console.print(
        f"[bold green]cityward demo[/]: {created} new entities in {directory.resolve()} "
        "(SQLite; run again to resume)"
    )
    url = f"http://127.0.0.1:{port}/ngsi-ld/v1/entities?type=TrafficFlowObserved&limit=5"
    console.print(f"Try: curl '{url}'")
    if seed_only:
        return
    if not no_browser:
        import webbrowser

        with contextlib.suppress(webbrowser.Error):
            webbrowser.open(url)
    uvicorn.run(application, host="127.0.0.1", port=port, log_level="info", access_log=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
