"""The ``cityward`` command line: serve the data bank, run the demo city."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from cityward.cliutil import settings_or_exit, sigterm_as_interrupt
from cityward.config import SETTINGS_ENV, Settings, load_settings

app = typer.Typer(help="cityward: privacy-by-design city operations.", no_args_is_help=True)
console = Console()
MAX_TTL_DAYS = 3650  # a token lives ten years at most

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
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 1026,
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
    no_auth: Annotated[
        bool,
        typer.Option(
            "--no-auth",
            help="DEVELOPMENT ONLY: no tokens, every request is admin. Loopback addresses only.",
        ),
    ] = False,
) -> None:
    """Serve the NGSI-LD API (SQLite in the data folder unless --database-url is given)."""
    import uvicorn

    from cityward.api.app import create_app

    log_level = log_level.lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise typer.BadParameter(
            f"{log_level!r}: use debug, info, warning or error", param_hint="--log-level"
        )
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = settings_or_exit(
        config, data_dir=data_dir, database_url=database_url, no_auth=no_auth or None
    )
    no_auth = settings.no_auth  # the flag, or no_auth in the configuration
    if no_auth and not _is_loopback(host):
        raise typer.BadParameter(
            f"--no-auth is refused on {host}: it is allowed only on a loopback address "
            "(127.0.0.1, ::1, localhost)",
            param_hint="--no-auth",
        )
    from cityward.bank.store import Store, describe_store, open_store

    backend = describe_store(settings.database_url, settings.data_dir)  # sqlite:/// said PostgreSQL
    # the store before anything says the server is up: an unreachable database printed the
    # banner ("NGSI-LD API at http://...") and then its failure. One process opens the store
    # here and hands it to the app; the workers of --workers N open their own, so the
    # database is only tried here (each would fail on its own, with a traceback, again and
    # again, and the server never said it would not serve).
    store: Store | None = None
    if workers == 1:
        store = open_store(
            settings.database_url,
            settings.data_dir,
            connect_timeout_s=settings.database_connect_timeout_s,
        )
    elif backend == "PostgreSQL":
        from cityward.bank.store.postgres import check_reachable

        check_reachable(
            str(settings.database_url), connect_timeout_s=settings.database_connect_timeout_s
        )
    try:
        if settings.bus.kind == "nats":
            _check_bus(settings)
        console.print(f"[bold green]cityward[/] data bank on {backend}")
        console.print(f"NGSI-LD API at http://{host}:{port}/ngsi-ld/v1/entities")
        console.print(f"Public register at http://{host}:{port}/register")
        if no_auth:
            console.print(
                "[bold red on white] AUTHENTICATION DISABLED (--no-auth): every request is "
                "admin. Development only. [/]"
            )
        else:
            _bootstrap_admin(settings)
        if store is None:
            # worker processes build their own app from the same settings (see app_from_env)
            os.environ[SETTINGS_ENV] = settings.model_dump_json()
            _serve_workers(host, port, workers, log_level)
            return
        application = create_app(settings, store)  # it closes the store when it stops
    except BaseException:
        if store is not None:
            store.close()
        raise
    uvicorn.run(
        application,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


def _check_bus(settings: Settings) -> None:
    """NATS reachable, with JetStream and the change stream: said in one line before the
    server starts (it was a 35-frame traceback from the application's start, exit code 3)."""
    from cityward.bus.feed import ensure_changes_stream
    from cityward.bus.nats import BusError, JetStream

    s = settings.bus
    js = JetStream(s.nats_url, name="cityward-serve-check", connect_timeout_s=s.connect_timeout_s)
    try:
        js.connect()
        ensure_changes_stream(js, s)
    except BusError as exc:
        console.print(f"[red]bus[/]: {exc}")
        raise typer.Exit(1) from exc
    finally:
        js.close()


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bootstrap_admin(settings: Settings) -> None:
    """Create the admin token of a first start (before any worker starts) and say where it is."""
    from cityward.governance.identity import Identities

    ids = Identities(settings.governance, settings.data_dir, None)
    path = ids.bootstrap_admin() or settings.data_dir / "governance" / "admin.token"
    if path.exists():
        console.print(
            f"Admin token in {path.resolve()} (mode 0600). Use it as "
            f"'Authorization: Bearer $(cat {path})'; create others with 'cityward token create'."
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
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 1026,
    data_dir: DataDir = None,
    speed: Annotated[
        float, typer.Option(min=0.1, max=1000.0, help="Simulated seconds per wall second.")
    ] = 1.0,
    osm: Annotated[
        Path | None,
        typer.Option(
            "--osm",
            help="Build the city from this OpenStreetMap extract (.osm).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    no_browser: Annotated[
        bool, typer.Option("--no-browser", help="Do not open a browser.")
    ] = False,
    seed_only: Annotated[
        bool, typer.Option("--seed-only", help="Create the demo city's entities and exit.")
    ] = False,
    no_traffic: Annotated[
        bool, typer.Option("--no-traffic", help="Serve the seeded city without the simulation.")
    ] = False,
) -> None:
    """An embedded demo city on SQLite: live traffic in SUMO, sensors and alerts in the bank."""
    import uvicorn

    from cityward.api.app import create_app
    from cityward.demo import seed_city
    from cityward.demo.server import TrafficFirstServer

    directory = data_dir or Path(os.environ.get("CITYWARD_DATA_DIR", "cityward-demo"))
    # the port is taken first, before anything is created or printed: the simulation's feed
    # sends the operator token to this port, and a program already on it received it (the
    # server only found the port taken after the city was built)
    listener = None if seed_only else _bind_demo_port(port)
    settings = load_settings(None, data_dir=directory)
    settings.anomaly.enabled = True
    # the environment stations are devices pushing their own JSON (docs/ingest.md)
    from cityward.demo.environment import ingest_sources
    from cityward.ingest.settings import IngestSettings

    settings.ingest = IngestSettings.model_validate(
        {"enabled": True, "sources": ingest_sources(), "writer": {"max_delay_ms": 20}}
    )
    application = create_app(settings)
    bank = application.state.runtime.bank
    created = seed_city(bank, detectors=seed_only or no_traffic)
    console.print(
        f"[bold green]cityward demo[/]: {created} new entities in {directory.resolve()} "
        "(SQLite; run again to resume)"
    )
    from cityward.governance.policy import Role

    governance = application.state.governance
    purposes = [p for p in governance.catalog.purposes if p != "undeclared"]
    token = governance.identities.issue(
        Role.OPERATOR, purposes, subject="demo-operator", ttl_s=7 * 86400
    )
    token_file = directory / "operator.token"
    token_file.touch(mode=0o600)
    token_file.write_text(token + "\n")
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/ngsi-ld/v1/entities?type=TrafficSignal&limit=5"
    console.print(f"Dashboard: [bold]{base}/[/] (log in with the operator token below)")
    console.print(f"Public register: {base}/register")
    console.print(f"Operator token (7 days; purposes {', '.join(purposes)}; also in {token_file}):")
    console.print(token, soft_wrap=True)
    console.print(f"Try: curl -H 'Authorization: Bearer {token[:12]}...' '{url}'")
    if seed_only:
        return
    live = None
    if not no_traffic:
        from cityward.demo.city import build_city
        from cityward.demo.live import LiveTraffic, data_files

        with console.status("building the demo city (SUMO network and demand)"):
            try:
                city = build_city(data_files(directory), osm=osm)
            except (RuntimeError, ValueError) as exc:
                console.print(f"[red]demo city[/]: {exc}")
                raise typer.Exit(1) from exc
        station_key = _demo_station_key(governance.identities, directory)
        live = LiveTraffic(city, base, token, speed=speed, station_key=station_key)
        live.start()
        console.print(
            f"traffic: {city.net.name}, adaptive control, speed {speed:g}x, an ambulance every "
            f"{live.ev_every_s / 60:g} simulated minutes"
        )
    if not no_browser:
        import webbrowser

        with contextlib.suppress(webbrowser.Error):
            # the token rides in the fragment, which never reaches a server; the page keeps it
            # in the tab and clears it from the address bar
            webbrowser.open(f"{base}/#token={token}")
    config = uvicorn.Config(
        application,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,  # open dashboards (live streams) do not hold Ctrl-C
    )
    try:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how the demo ends (as uvicorn.run)
            server = TrafficFirstServer(config, live.stop if live is not None else None)
            server.run(sockets=[listener] if listener is not None else None)
    finally:
        if listener is not None:
            listener.close()
        if live is not None:
            live.stop()
            if live.error:
                console.print(f"[red]traffic simulation[/]: {live.error}")


def _bind_demo_port(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:PORT for the demo's server, or a one-line error (exit 1)
    when another program holds the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own bind
    try:
        sock.bind(("127.0.0.1", port))
        # listening at once: the feed's first requests wait in the backlog until uvicorn serves
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        console.print(
            f"[red]--port {port}[/]: {exc.strerror or exc}; choose another port", soft_wrap=True
        )
        raise typer.Exit(1) from exc
    return sock


def _demo_station_key(identities: Any, directory: Path) -> str:
    """The demo stations' device key: kept in DIR/stations.key, made on the first start."""
    from cityward.demo.environment import STATION_PATTERNS
    from cityward.governance.identity import AuthError

    path = directory / "stations.key"
    if path.exists():
        key = path.read_text().strip()
        with contextlib.suppress(AuthError):
            identities.verify_api_key(key)
            return key
    _, key = identities.create_device_key("demo-stations", STATION_PATTERNS, [])
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return str(key)


token_app = typer.Typer(help="Bearer tokens for people and services.", no_args_is_help=True)
app.add_typer(token_app, name="token")
audit_app = typer.Typer(help="The tamper-evident audit trail.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
device_key_app = typer.Typer(help="API keys of devices.", no_args_is_help=True)
app.add_typer(device_key_app, name="device-key")
DatabaseUrl = Annotated[
    str | None,
    typer.Option("--database-url", help="postgresql://... when the bank runs on PostgreSQL."),
]


def _open(config: Path | None, data_dir: Path | None, database_url: str | None) -> Any:
    from cityward.bank.store import open_store

    settings = settings_or_exit(config, data_dir=data_dir, database_url=database_url)
    return settings, open_store(
        settings.database_url,
        settings.data_dir,
        connect_timeout_s=settings.database_connect_timeout_s,
    )


def _audit_cli(settings: Settings, store: Any, detail: str, **fields: Any) -> None:
    """Append one configuration record for a command-line change (committed and sealed)."""
    from cityward.governance.events import Action, AuditRecord
    from cityward.governance.runtime import open_audit

    audit = open_audit(settings, store)
    audit.record_nowait(AuditRecord(action=Action.CONFIG, actor="cli", detail=detail, **fields))
    audit.close()


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option(help="operator, analyst, auditor or admin.")],
    purpose: Annotated[
        list[str] | None,
        typer.Option("--purpose", help="A purpose the token carries (repeat for several)."),
    ] = None,
    subject: Annotated[str | None, typer.Option(help="Who the token is for.")] = None,
    ttl_days: Annotated[float | None, typer.Option(help="Lifetime in days.")] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    config: ConfigFile = None,
) -> None:
    """Create a local bearer token; the token alone is printed on the last line."""
    from cityward.governance.identity import Identities
    from cityward.governance.policy import Role
    from cityward.governance.runtime import build_catalog

    try:
        r = Role(role)
    except ValueError as exc:
        raise typer.BadParameter(
            f"{role!r} is not a role; use one of {', '.join(x.value for x in Role)}",
            param_hint="--role",
        ) from exc
    if r in (Role.DEVICE, Role.PUBLIC):
        raise typer.BadParameter(
            "devices use 'cityward device-key create'; the public needs no token",
            param_hint="--role",
        )
    if ttl_days is not None and not 0 < ttl_days <= MAX_TTL_DAYS:  # NaN fails it too
        # a negative lifetime gave a token expired at birth, inf a traceback, 1e300 a token
        # that never expires in effect (a short life is the only control over a token)
        raise typer.BadParameter(
            f"{ttl_days:g} is not a lifetime; give days above 0, at most {MAX_TTL_DAYS}",
            param_hint="--ttl-days",
        )
    purposes = list(purpose or (["*"] if r is Role.ADMIN else []))
    if not purposes and r is not Role.AUDITOR:
        raise typer.BadParameter("give at least one --purpose", param_hint="--purpose")
    settings, store = _open(config, data_dir, database_url)
    try:
        from cityward.bank.jsonld import ContextResolver

        catalog = build_catalog(settings.governance.sources, ContextResolver(allow_fetch=False))
        unknown = [p for p in purposes if p != "*" and p not in catalog.purposes]
        if unknown:
            console.print(
                f"[yellow]warning[/]: no declared data source has the purpose(s) "
                f"{', '.join(unknown)}; known: {', '.join(catalog.purposes)}"
            )
        ids = Identities(settings.governance, settings.data_dir, None)
        ttl = ttl_days * 86400 if ttl_days is not None else None
        try:
            token = ids.issue(r, purposes, subject=subject, ttl_s=ttl)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--purpose") from exc
        _audit_cli(
            settings,
            store,
            f"token created for role {r.value}",
            purposes=tuple(sorted(purposes)),
            extra={"subject": subject or "", "ttl_days": ttl_days or 0},
        )
    finally:
        store.close()
    console.print(f"Token for role {r.value}, purposes {', '.join(purposes) or '-'}:")
    print(token)


@device_key_app.command("create")
def device_key_create(
    device: Annotated[str, typer.Option(help="The device's name.")],
    pattern: Annotated[
        list[str], typer.Option("--pattern", help="Entity id regex the device may write.")
    ],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    config: ConfigFile = None,
) -> None:
    """Create a device key (shown once, on the last line); only its hash is stored."""
    from cityward.governance.identity import Identities

    settings, store = _open(config, data_dir, database_url)
    try:
        ids = Identities(settings.governance, settings.data_dir, store)
        try:
            key_id, key = ids.create_device_key(device, list(pattern), [])
        except re.error as exc:  # it was a traceback
            raise typer.BadParameter(f"not a valid regex: {exc}", param_hint="--pattern") from exc
        _audit_cli(
            settings,
            store,
            f"device key {key_id} created for {device}",
            extra={"patterns": list(pattern)},
        )
    finally:
        store.close()
    console.print(f"Device key {key_id} for {device} (store it now; it is not shown again):")
    print(key)


@audit_app.command("verify")
def audit_verify(
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    config: ConfigFile = None,
) -> None:
    """Check the audit chain and its seals; exit 1 and name the first bad record on tampering."""
    from cityward.governance.audit import verify_report
    from cityward.governance.runtime import open_audit_to_verify

    settings = settings_or_exit(config, data_dir=data_dir, database_url=database_url)
    try:
        # read-only: a mistyped folder or a key kept elsewhere is an error, not a new log or key
        audit = open_audit_to_verify(settings)
    except ValueError as exc:  # nothing there, or a key file that is not a key
        console.print(f"[red]audit verify[/]: {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from exc
    try:
        result = audit.verify()
    finally:
        audit.close(seal=False)
    console.print(verify_report(result))
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def dpia(
    out: Annotated[Path, typer.Option("--out", help="Folder for dpia.md and dpia.pdf.")] = Path(
        "."
    ),
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    config: ConfigFile = None,
) -> None:
    """Write a data-protection impact assessment draft (Markdown and PDF) from the config."""
    from cityward.bank.jsonld import ContextResolver
    from cityward.bank.model import now_iso
    from cityward.bank.store import backend_name
    from cityward.governance.dpia import dpia_markdown, write_dpia
    from cityward.governance.runtime import build_catalog

    settings = settings_or_exit(config, data_dir=data_dir, database_url=database_url)
    catalog = build_catalog(settings.governance.sources, ContextResolver(allow_fetch=False))
    text = dpia_markdown(
        catalog,
        site_name=settings.governance.site_name,
        generated_at=now_iso(),
        # sqlite:///... is SQLite: the DPIA promised PostgreSQL's partition drops for it
        backend=backend_name(settings.database_url),
        retention_interval_s=settings.governance.retention_interval_s,
    )
    md, pdf = write_dpia(out, text)
    console.print(f"DPIA draft written: {md} and {pdf}")


from cityward.anomaly.cli import app as anomaly_app  # noqa: E402

app.add_typer(anomaly_app, name="anomaly")
from cityward.ingest.cli import app as ingest_app  # noqa: E402

app.add_typer(ingest_app, name="ingest")
from cityward.vision.cli import app as vision_app  # noqa: E402

app.add_typer(vision_app, name="vision")
from cityward.vision.models_cli import app as models_app  # noqa: E402

app.add_typer(models_app, name="models")
traffic_app = typer.Typer(help="Traffic signal control in SUMO.", no_args_is_help=True)
app.add_typer(traffic_app, name="traffic")


@traffic_app.command("controllers")
def traffic_controllers() -> None:
    """List the registered signal controllers."""
    from cityward.plugins import settings_table
    from cityward.traffic.controllers import load_builtin

    console.print(settings_table("signal controllers", load_builtin()))


def _default_scenarios() -> Path:
    """../shared/data/traffic beside the checkout (or beside the current folder)."""
    from cityward.shared import shared_data

    return shared_data("traffic")


@traffic_app.command("bench")
def traffic_bench(
    scenario: Annotated[
        list[str] | None, typer.Option("--scenario", help="Scenario name (repeatable).")
    ] = None,
    all_scenarios: Annotated[bool, typer.Option("--all", help="Every scenario found.")] = False,
    controller: Annotated[
        list[str] | None,
        typer.Option("--controller", help="Controller (repeatable; default: all registered)."),
    ] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated SUMO seeds.")] = "1,2,3",
    ev_per_hour: Annotated[
        float, typer.Option("--ev-per-hour", help="Emergency vehicles added per hour.")
    ] = 0.0,
    scenarios: Annotated[
        Path | None,
        typer.Option("--scenarios", help="Folder of scenarios (default ../shared/data/traffic)."),
    ] = None,
    output: Annotated[Path, typer.Option("--output", help="Results folder.")] = Path(
        "traffic-bench"
    ),
    end: Annotated[
        float | None,
        typer.Option(
            help="Stop at this simulated time (s, absolute as in the .sumocfg, after every "
            "scenario's begin) instead of the scenario's end."
        ),
    ] = None,
) -> None:
    """Run controllers on SUMO scenarios; write results.json/csv and keep SUMO's tripinfo."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from cityward.traffic.bench import (
        PUBLISHED_BEST,
        find_scenarios,
        run_one,
        summary,
        write_results,
    )
    from cityward.traffic.controllers import load_builtin

    if ev_per_hour < 0 or ev_per_hour > 120:
        raise typer.BadParameter(
            "give 0 to 120 emergency vehicles per hour", param_hint="--ev-per-hour"
        )
    root = scenarios or _default_scenarios()
    if not root.is_dir():
        raise typer.BadParameter(f"no scenario folder at {root}", param_hint="--scenarios")
    found = find_scenarios(root)
    names = sorted(found) if all_scenarios else list(scenario or [])
    if not names:
        raise typer.BadParameter("give --scenario NAME or --all", param_hint="--scenario")
    unknown = [n for n in names if n not in found]
    if unknown:
        raise typer.BadParameter(
            f"unknown scenario(s) {', '.join(unknown)}; found: {', '.join(sorted(found))}",
            param_hint="--scenario",
        )
    registry = load_builtin()
    ctrls = list(controller or sorted(registry))
    bad = [c for c in ctrls if c not in registry]
    if bad:
        raise typer.BadParameter(
            f"unknown controller(s) {', '.join(bad)}; registered: {', '.join(sorted(registry))}",
            param_hint="--controller",
        )
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError as exc:
        raise typer.BadParameter(
            "seeds must be integers, e.g. 1,2,3", param_hint="--seeds"
        ) from exc
    if not seed_list:
        raise typer.BadParameter("seeds must be integers, e.g. 1,2,3", param_hint="--seeds")
    if end is not None:
        # an absolute simulated time, as SUMO's --end: scenarios begin at different times
        early = [f"{n} begins at {found[n].begin:g} s" for n in names if end <= found[n].begin]
        if early:
            raise typer.BadParameter(
                f"--end {end:g} is not after the begin of every scenario: {'; '.join(early)}",
                param_hint="--end",
            )
    rows = []
    # with emergency vehicles, each run is paired with the same run without them
    evs = [0.0, ev_per_hour] if ev_per_hour > 0 else [0.0]
    jobs = [(n, c, sd, ev) for n in names for c in ctrls for sd in seed_list for ev in evs]
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console
    ) as progress:
        task = progress.add_task("runs", total=len(jobs))
        for n, c, sd, ev in jobs:
            progress.update(task, description=f"{n} / {c} / seed {sd} / {ev:g} EV/h")
            run_dir = output / n / c / str(sd)
            if ev:
                run_dir = run_dir / f"ev{ev:g}"
            rows.append(run_one(found[n], c, sd, run_dir, end=end, ev_per_hour=ev))
            write_results(output, rows)
            progress.advance(task)
    table = Table(title=f"average delay (s), median of seeds {seeds}")
    table.add_column("scenario")
    table.add_column("published best", justify="right")
    for c in ctrls:
        table.add_column(c, justify="right")
    med = summary([r for r in rows if not r["ev_per_hour"]])
    for n in names:
        best = PUBLISHED_BEST.get(n)
        cells = [f"{med[(n, c)]['avg_delay_s']:.2f}" for c in ctrls]
        table.add_row(n, f"{best:.2f}" if best is not None else "-", *cells)
    console.print(table)
    if ev_per_hour > 0:
        from cityward.traffic.bench import ev_summary

        ev_table = Table(title=f"emergency vehicles, {ev_per_hour:g} per hour (median of seeds)")
        for col in (
            "scenario",
            "controller",
            "EV travel s",
            "free-flow s",
            "ratio",
            "worst EV ratio",
            "others' delay +%",
        ):
            ev_table.add_column(
                col, justify="left" if col in ("scenario", "controller") else "right"
            )
        for (n, c), e in sorted(ev_summary(rows).items()):
            ev_table.add_row(
                n,
                c,
                f"{e['ev_travel_time_s']:.1f}",
                f"{e['ev_free_flow_time_s']:.1f}",
                f"{e['ratio']:.2f}",
                f"{e['worst_ratio']:.2f}",
                f"{e['delay_change_pct']:+.1f}",
            )
        console.print(ev_table)
    console.print(f"results: {output / 'results.json'}, {output / 'results.csv'}")


def _run_scenario(
    scenario: str | None, sumocfg: Path | None, scenarios: Path | None
) -> tuple[str, Path, float, float]:
    """(name, .sumocfg, begin, end) of --scenario NAME or --sumocfg FILE; the name as the
    data bank's entity ids carry it (the same cleaning for both options)."""
    from cityward.traffic.bankfeed import scenario_part
    from cityward.traffic.bench import find_scenarios, read_sumocfg_times

    if (scenario is None) == (sumocfg is None):
        raise typer.BadParameter("give --scenario NAME or --sumocfg FILE", param_hint="--scenario")
    if scenario is not None:
        root = scenarios or _default_scenarios()
        if not root.is_dir():
            raise typer.BadParameter(f"no scenario folder at {root}", param_hint="--scenarios")
        found = find_scenarios(root)
        if scenario not in found:
            raise typer.BadParameter(
                f"unknown scenario {scenario!r}; found: {', '.join(sorted(found)) or 'none'}",
                param_hint="--scenario",
            )
        s = found[scenario]
        return scenario_part(s.name), s.cfg, s.begin, s.end
    assert sumocfg is not None
    try:
        begin, end = read_sumocfg_times(sumocfg)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--sumocfg") from exc
    return scenario_part(sumocfg.name.removesuffix(".sumocfg")), sumocfg, begin, end


@traffic_app.command("run")
def traffic_run(
    scenario: Annotated[
        str | None, typer.Option("--scenario", help="Scenario name (under --scenarios).")
    ] = None,
    sumocfg: Annotated[
        Path | None,
        typer.Option("--sumocfg", help="A SUMO configuration file.", exists=True, dir_okay=False),
    ] = None,
    controller: Annotated[
        str, typer.Option("--controller", help="Signal controller (see 'traffic controllers').")
    ] = "adaptive",
    bank: Annotated[
        str | None,
        typer.Option(
            "--bank", help="Data bank URL (http://host:port); without it the simulation only runs."
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token", envvar="CITYWARD_TOKEN", help="Bearer token for --bank (operator role)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="SUMO random seed.")] = 1,
    api: Annotated[
        str, typer.Option("--api", help="How to drive SUMO: libsumo (in process) or traci.")
    ] = "libsumo",
    end: Annotated[
        float | None,
        typer.Option(help="Stop at this simulated time (s) instead of the scenario's end."),
    ] = None,
    speed: Annotated[
        float,
        typer.Option(min=0.0, help="Simulated seconds per wall second; 0 = as fast as possible."),
    ] = 0.0,
    period: Annotated[
        float,
        typer.Option(min=1.0, max=3600.0, help="Simulated seconds per TrafficFlowObserved period."),
    ] = 60.0,
    start_instant: Annotated[
        str | None,
        typer.Option(
            "--start-instant",
            help="The instant (ISO 8601) the simulation's start maps to (default: now).",
        ),
    ] = None,
    scenarios: Annotated[
        Path | None,
        typer.Option("--scenarios", help="Folder of scenarios (default ../shared/data/traffic)."),
    ] = None,
) -> None:
    """Run one scenario in SUMO; with --bank, write it to the data bank and take overrides."""
    import time
    from datetime import UTC, datetime

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from cityward.traffic.bankfeed import BankError, BankFeed
    from cityward.traffic.controllers import load_builtin
    from cityward.traffic.safety import SafetyGuard
    from cityward.traffic.sumo import RunStats, SumoBackend, control_loop, scenario_args

    name, cfg, begin, cfg_end = _run_scenario(scenario, sumocfg, scenarios)
    stop = end if end is not None else cfg_end
    if stop <= begin:
        raise typer.BadParameter(
            f"--end {stop:g} is not after the begin {begin:g}", param_hint="--end"
        )
    registry = load_builtin()
    if controller not in registry:
        raise typer.BadParameter(
            f"unknown controller {controller!r}; registered: {', '.join(sorted(registry))}",
            param_hint="--controller",
        )
    instant: datetime | None = None
    if start_instant is not None:
        try:
            instant = datetime.fromisoformat(start_instant.replace("Z", "+00:00"))
        except ValueError as exc:
            raise typer.BadParameter(
                f"{start_instant!r} is not an ISO 8601 instant", param_hint="--start-instant"
            ) from exc
        if instant.tzinfo is None:
            instant = instant.replace(tzinfo=UTC)
    if api not in ("libsumo", "traci"):
        raise typer.BadParameter("libsumo or traci", param_hint="--api")
    try:
        backend = SumoBackend(
            [*scenario_args(cfg, seed), "--end", str(stop)],
            api="traci" if api == "traci" else "libsumo",
        )
    except Exception as exc:  # libsumo reports a bad configuration as a TraCIException
        console.print(f"[red]SUMO could not load {cfg}[/]: {exc}")
        raise typer.Exit(1) from exc
    feed: BankFeed | None = None
    if bank is not None:
        try:
            feed = BankFeed(
                backend,
                bank,
                token,
                scenario=name,
                controller=controller,
                period_s=period,
                start_instant=instant,
            )
            feed.start()
        except (BankError, ValueError) as exc:
            backend.close()
            console.print(f"[red]data bank[/]: {exc}")
            raise typer.Exit(1) from exc
        console.print(
            f"writing to {feed.base} as {feed.subject or 'anonymous'}; overrides on "
            f"urn:ngsi-ld:TrafficSignal:{name}:<signal> (attribute 'override')"
        )
    stats: RunStats | None = None
    interrupted = False
    reached = begin
    wall0 = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} s simulated"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(f"{name} / {controller}", total=stop - begin)
        shown = 0.0

        def on_step(now: float, guards: dict[str, SafetyGuard]) -> None:
            nonlocal reached, shown
            reached = now
            if feed is not None:
                feed.on_step(now, guards)
            wall = time.perf_counter()
            if wall - shown >= 0.1:
                shown = wall
                progress.update(task, completed=now - begin)
            if speed > 0:
                delay = wall0 + (now - begin) / speed - wall
                if delay > 0:
                    time.sleep(delay)

        try:
            with sigterm_as_interrupt():  # stopped by systemd or docker as by Ctrl-C
                stats = control_loop(
                    backend,
                    controller,
                    stop,
                    on_step=on_step,
                    overrides=feed.overrides if feed is not None else None,
                )
            progress.update(task, completed=stop - begin)
            reached = stop
        except KeyboardInterrupt:
            interrupted = True
        finally:
            try:
                backend.close()
            finally:  # what the feed holds reaches the bank whatever closing SUMO did
                if feed is not None:
                    progress.update(task, description="flushing to the data bank")
                    feed.close()
    table = Table(title=f"{name} / {controller} / seed {seed}", show_header=False)
    note = " (interrupted)" if interrupted else ""
    table.add_row("simulated", f"{reached - begin:.0f} s{note}")
    table.add_row("wall time", f"{time.perf_counter() - wall0:.1f} s")
    if stats is not None:
        table.add_row("forced switches (max red)", str(stats.forced_switches))
    if feed is not None:
        s = feed.stats
        table.add_row("entity updates written", str(s.written))
        table.add_row("rejected by the bank", str(s.rejected))
        table.add_row("dropped / coalesced", f"{s.dropped} / {s.coalesced}")
        table.add_row(
            "overrides applied / rejected", f"{s.overrides_applied} / {s.overrides_rejected}"
        )
    console.print(table)
    if feed is not None:
        for reason in feed.stats.rejections[:5]:
            console.print(f"[yellow]rejected[/]: {reason}")
        if feed.fatal:
            console.print(f"[red]data bank[/]: {feed.fatal}")
    if interrupted:
        raise typer.Exit(130)
    if feed is not None and feed.fatal:
        raise typer.Exit(1)


def main() -> None:
    """The ``cityward`` command. What the machine refuses (a data folder that is a file or
    read-only, a database that cannot be reached) ends it with one line naming the cause and
    exit status 1: it was a traceback of some 40 frames. A database URL that no connection can
    be made with (a parameter libpq refuses) is a configuration error: one line naming the
    parameter and the URL (password hidden), exit status 2, as for the other settings. Anything
    else still shows its traceback (a bug of ours, to report)."""
    import sqlite3

    import psycopg

    from cityward.bank.store import StoreMisconfigured, StoreUnreachable

    try:
        app()
    except StoreMisconfigured as exc:  # the settings check it at load; this is what only
        # libpq knows (require_auth=...), said when the store connects
        console.print(f"[red]cityward[/]: {escape(str(exc))}", soft_wrap=True)
        raise SystemExit(2) from exc
    except StoreUnreachable as exc:  # it names the URL (password hidden) and why in one line
        console.print(f"[red]cityward[/]: {escape(str(exc))}", soft_wrap=True)
        raise SystemExit(1) from exc
    except (OSError, sqlite3.Error, psycopg.Error) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        console.print(f"[red]cityward[/]: {escape(why)} ({type(exc).__name__})", soft_wrap=True)
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
