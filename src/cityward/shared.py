"""Where the shared benchmark data lives: ``../shared/data`` beside the checkout.

Tests and benchmarks read scenarios, datasets and models from there; nothing of it is copied
into the repository, and nothing at run time downloads it.
"""

from __future__ import annotations

from pathlib import Path


def shared_data(name: str) -> Path:
    """``../shared/data/<name>`` beside the checkout, else beside the current folder (the first
    candidate when neither exists, for the error message)."""
    candidates = [
        Path(__file__).resolve().parents[3] / "shared" / "data" / name,
        Path.cwd().parent / "shared" / "data" / name,
    ]
    return next((c for c in candidates if c.is_dir()), candidates[0])
