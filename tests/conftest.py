"""Shared fixtures: both storage backends, an API client, the shared test data."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cityward.api.app import create_app
from cityward.bank.store import Store
from cityward.bank.store.postgres import PostgresStore
from cityward.bank.store.sqlite import SqliteStore
from cityward.config import Settings

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CITYWARD_SHARED", ROOT.parent / "shared"))
PG_URL = os.environ.get("CITYWARD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
SDM = SHARED / "data" / "ngsi-ld" / "smartdatamodels"


def shared_path(*parts: str) -> Path:
    """A file under ../shared; outside CI a missing ../shared skips the test, in CI it fails."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI needs ../shared beside the checkout")
        pytest.skip(f"{path} is missing (../shared is not beside this checkout)")
    return path


def sdm_context_map() -> dict[str, Path]:
    """Smart Data Models @context URLs -> the copies in ../shared (no network in tests)."""
    ctx_dir = shared_path("data", "ngsi-ld", "smartdatamodels", "_contexts")
    out: dict[str, Path] = {}
    for f in ctx_dir.glob("dataModel.*.context.jsonld"):
        domain = f.name.split(".")[1]
        url = f"https://raw.githubusercontent.com/smart-data-models/dataModel.{domain}/master/context.jsonld"
        out[url] = f
        # some examples name the same contexts by their GitHub Pages address
        out[f"https://smart-data-models.github.io/dataModel.{domain}/context.jsonld"] = f
    return out


def make_pg_store() -> PostgresStore:
    schema = f"test_{uuid.uuid4().hex[:12]}"
    return PostgresStore(PG_URL, schema=schema, max_size=4)


def drop_pg_store(store: PostgresStore) -> None:
    schema = store.schema
    store.close()
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh, empty store of each backend."""
    if request.param == "sqlite":
        s: Store = SqliteStore(tmp_path / "bank.db")
        yield s
        s.close()
    else:
        pg = make_pg_store()
        yield pg
        drop_pg_store(pg)


@pytest.fixture
def client(store: Store, tmp_path: Path) -> Iterator[TestClient]:
    """An API client over a fresh store; Smart Data Models contexts preloaded when present."""
    contexts = sdm_context_map() if SDM.exists() else {}
    settings = Settings(data_dir=tmp_path, contexts=contexts, context_fetch=False, no_auth=True)
    with TestClient(create_app(settings, store)) as c:
        yield c
