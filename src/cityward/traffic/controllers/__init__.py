"""Signal controllers: self-registering plugins with a typed configuration.

A controller picks the green phase it wants; :mod:`cityward.traffic.safety` decides when the
signals actually change. ``cityward traffic controllers`` lists what is registered here.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from cityward.plugins import register
from cityward.traffic.backend import Intersection, Phase, SignalBackend

REGISTRY: dict[str, type[Controller]] = {}


class ControllerConfig(BaseModel):
    """Settings of a controller (none by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Controller(abc.ABC):
    """Chooses the green phase of one intersection."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type[ControllerConfig]] = ControllerConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        register(REGISTRY, cls, "controller")

    def __init__(
        self, intersection: Intersection, backend: SignalBackend, config: ControllerConfig
    ) -> None:
        self.x = intersection
        self.backend = backend
        self.config = config

    @abc.abstractmethod
    def decide(self, now: float, current: Phase, green_for: float) -> Phase | None:
        """The green phase wanted now (None or ``current``: keep it).

        Called once per step while the intersection shows a green that may end (its minimum
        green has passed); the safety layer takes care of yellow and all-red.
        """


def create(
    name: str,
    intersection: Intersection,
    backend: SignalBackend,
    config: dict[str, Any] | None = None,
) -> Controller:
    """A registered controller by name, its config validated."""
    load_builtin()
    cls = REGISTRY.get(name)
    if cls is None:
        known = ", ".join(sorted(REGISTRY))
        raise KeyError(f"no controller named {name!r}; registered: {known}")
    return cls(intersection, backend, cls.Config.model_validate(config or {}))


def load_builtin() -> dict[str, type[Controller]]:
    """Import the built-in controllers (they register themselves)."""
    from cityward.traffic.controllers import (  # noqa: F401
        actuated,
        adaptive,
        fixed_time,
        max_pressure,
    )

    return REGISTRY
