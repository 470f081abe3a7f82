"""HTTP push: a device posts its own payload to ``POST /ingest/{source}`` with its device key.

The adapter holds no connection of its own: ``cityward serve`` routes the pushes of every
enabled ``http`` source to it (cityward.ingest.routes). A push is a JSON object (one
message), a JSON array (several) or JSON lines; the answer comes once every message in it is
settled, so a 2xx means the readings are in the bank, and a device that retries after a lost
answer is recognised by its delivery keys. A malformed message is refused with its reason
and lands in the dead-letter store; its neighbours in the same push are written.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from cityward.ingest.adapters import Adapter, AdapterConfig


class HttpConfig(AdapterConfig):
    max_messages: int = Field(
        default=1000, ge=1, le=100_000, description="Most messages in one push."
    )
    timeout_s: float = Field(
        default=30, gt=0, le=600, description="Longest a push waits for its readings to be written."
    )
    device_key: bool = Field(
        default=True,
        description="Devices authenticate with a device key (X-API-Key) and may only write "
        "the entities its patterns allow; false also admits operator tokens.",
    )


class HttpAdapter(Adapter):
    name = "http"
    summary = "devices POST their own payloads to /ingest/{source} with a device key"
    Config = HttpConfig
    config: HttpConfig

    def start(self) -> None:
        """Nothing to start: the API routes pushes here while the source is enabled."""

    def stop(self) -> None:
        """Nothing to stop."""

    def status(self) -> dict[str, Any]:
        return {"path": f"/ingest/{self.intake.name}"}
