"""What every kind of plugin (signal controllers, anomaly detectors, alert rules) shares: a
registry filled by subclassing, and the table ``cityward ... list`` commands print."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from rich.table import Table

P = TypeVar("P", bound=type)


def register(registry: dict[str, P], cls: P, kind: str) -> None:
    """Put ``cls`` in ``registry`` under its ``name`` (none: an abstract base, left out)."""
    name: str = getattr(cls, "name", "")
    if not name:
        return
    if name in registry and registry[name] is not cls:
        raise ValueError(f"two {kind}s are named {name!r}")
    registry[name] = cls


def settings_table(title: str, registry: Mapping[str, Any]) -> Table:
    """One row per plugin: its name, what it does, and its settings with their defaults."""
    table = Table(title=title)
    table.add_column("name")
    table.add_column("what it does")
    table.add_column("settings")
    for name, cls in sorted(registry.items()):
        fields = ", ".join(f"{k}={v.default}" for k, v in cls.Config.model_fields.items())
        table.add_row(name, cls.summary, fields or "-")
    return table
