"""What every command does with its configuration: load it, or say in one line per error what
is wrong with which setting of which file, and exit with code 2 (a usage error); and how a
long command takes a stop signal."""

from __future__ import annotations

import contextlib
import signal
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from cityward.config import Settings, load_settings

console = Console()


def invalid(path: Path | None, exc: ValidationError) -> NoReturn:
    """Print each error of a configuration with its setting; exit code 2."""
    # no file: the settings came from the command line and CITYWARD_* variables alone
    what = escape(str(path)) if path is not None else "command-line/environment settings"
    console.print(f"[red]{what}[/]: {exc.error_count()} error(s)")
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        # the messages quote the values, which may hold "[...]" (not markup)
        console.print(f"  {escape(where)}: {escape(err['msg'])}")
    raise typer.Exit(2) from exc


def unreadable(path: Path | None, exc: Exception) -> NoReturn:
    """One line for a TOML file that cannot be read (missing, not UTF-8, not TOML); exit 2."""
    if isinstance(exc, OSError):
        why = str(exc.strerror or exc)
        path = Path(exc.filename) if exc.filename else path
    elif isinstance(exc, UnicodeDecodeError):
        why = f"not UTF-8 text (byte {exc.start}); save it as UTF-8"
    else:
        why = f"not valid TOML: {exc}"
    console.print(f"[red]{escape(str(path))}[/]: {escape(why)}")
    raise typer.Exit(2) from exc


def settings_or_exit(config: Path | None, **overrides: Any) -> Settings:
    """:func:`cityward.config.load_settings`, its errors as usage errors (they were tracebacks
    in ``serve``, ``dpia`` and the bank commands)."""
    try:
        return load_settings(config, **overrides)
    except ValidationError as exc:
        invalid(config, exc)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        unreadable(config, exc)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within: SIGTERM (how systemd and container runtimes stop a process) stops a command the
    way Ctrl-C does, by KeyboardInterrupt, so that it closes, flushes and reports as on Ctrl-C;
    without this it died at once and what it held was lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(sig: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
