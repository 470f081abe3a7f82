"""The authorization matrix: every route x every role, purposes, devices, tokens and denials."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cityward.api.app import create_app
from cityward.bank.store import Store
from cityward.cli import app as cli_app
from cityward.config import GovernanceSettings, Settings
from cityward.governance import identity
from cityward.governance.policy import FALLBACK, MATRIX, Role, route_for
from cityward.governance.sources import DataSource, SourceKind
from tests.governance.conftest import (
    AIR,
    CROWD,
    DEVICE_OWN,
    TRAFFIC,
    UNDECLARED,
    E,
    Governed,
)

SAMPLE = {
    "eid": TRAFFIC,
    "attr": "intensity",
    "instance_id": "urn:ngsi-ld:Instance:x",
    "sid": "urn:ngsi-ld:Subscription:none",
    "local_id": "none",
    "key_id": "000000000000",
    "type_name": "TrafficFlowObserved",
    "source": "air",
}
WHO = ["public", "device", "operator", "analyst", "auditor", "admin"]
ROLE_OF = {w: Role(w) for w in WHO}


def concrete(path: str) -> str:
    for name, value in SAMPLE.items():
        path = path.replace("{" + name + "}", value)
    assert "{" not in path, f"no sample value for a parameter of {path}"
    return path


def api_routes(governed: Governed) -> list[tuple[str, str]]:
    out = []
    for path, ops in governed.app.openapi()["paths"].items():
        for m in sorted(ops):
            out.append((m.upper(), concrete(path)))
    assert len(out) > 40
    return out


def test_every_route_has_an_entry_in_the_table(governed: Governed) -> None:
    missing = [(m, p) for m, p in api_routes(governed) if route_for(m, p) is FALLBACK]
    assert missing == []


def test_every_route_for_every_role(governed: Governed) -> None:
    """A role without the route's permission is refused by the middleware; others get past it."""
    checked = 0
    for method, path in api_routes(governed):
        perm = route_for(method, path).permission
        for who in WHO:
            r = governed.client.request(
                method,
                path,
                headers={**governed.as_(who), "Content-Type": "application/json"},
                content=b"{}" if method in ("POST", "PATCH", "PUT") else None,
            )
            allowed = perm in MATRIX[ROLE_OF[who]]
            json_body = r.content and r.headers.get("content-type", "").endswith("json")
            body: Any = r.json() if json_body else {}  # HEAD answers have no body
            if not allowed:
                want = 401 if who == "public" else 403
                assert r.status_code == want, (who, method, path, r.status_code, r.text)
                assert body["status"] == want and body["field"] == "Authorization"
                if want == 403:
                    assert body["missingPermission"] == perm.value
            else:
                assert r.status_code != 401, (who, method, path, r.text)
                if r.status_code == 403:
                    # past the middleware: only a purpose or ownership may still refuse
                    assert body.get("missingPermission", "").startswith(("purpose:", "device:")), (
                        who,
                        method,
                        path,
                        r.text,
                    )
            checked += 1
    assert checked > 250


def ids_of(resp: Any) -> set[str]:
    assert resp.status_code == 200, resp.text
    return {e["id"] for e in resp.json()}


def test_a_token_sees_only_the_data_of_its_purposes(governed: Governed) -> None:
    c = governed.client
    everything = {"local": "true", "type": "*"}
    assert ids_of(c.get(E, params=everything, headers=governed.as_("admin"))) == {
        TRAFFIC,
        AIR,
        CROWD,
        UNDECLARED,
    }
    # traffic-management covers detectors and (counting) cameras, not air quality
    assert ids_of(c.get(E, params=everything, headers=governed.as_("operator"))) == {
        TRAFFIC,
        CROWD,
    }
    assert ids_of(c.get(E, params=everything, headers=governed.as_("operator-air"))) == {AIR}
    # with the 'undeclared' purpose: all but the hidden declared sources
    token = governed.gov.identities.issue(Role.ANALYST, ["undeclared", "environment-monitoring"])
    wide = {"Authorization": f"Bearer {token}"}
    assert ids_of(c.get(E, params=everything, headers=wide)) == {AIR, UNDECLARED}
    assert ids_of(c.get(E, params={"type": "Thing"}, headers=wide)) == {UNDECLARED}
    assert ids_of(c.get(E, params={"type": "Thing,CrowdFlowObserved"}, headers=wide)) == {
        UNDECLARED
    }
    # counts follow the restriction too
    r = c.get(E, params={**everything, "count": "true"}, headers=governed.as_("operator"))
    assert r.headers["NGSILD-Results-Count"] == "2"
    # a query for another purpose's type is empty, not an error
    assert (
        ids_of(c.get(E, params={"type": "AirQualityObserved"}, headers=governed.as_("operator")))
        == set()
    )
    geo = {"georel": "near;maxDistance==1000", "geometry": "Point", "coordinates": "[3.72,51.05]"}
    assert ids_of(c.get(E, params=geo, headers=governed.as_("operator-air"))) == {AIR}
    r = c.post(
        "/ngsi-ld/v1/entityOperations/query",
        json={"type": "Query", "entities": [{"type": "AirQualityObserved"}]},
        headers=governed.as_("analyst"),
    )
    assert r.status_code == 200 and r.json() == []
    # by id: a clear 403 naming the purpose
    r = c.get(f"{E}/{AIR}", headers=governed.as_("operator"))
    assert r.status_code == 403
    assert r.json()["missingPermission"] == "purpose:environment-monitoring"
    assert c.get(f"{E}/{AIR}", headers=governed.as_("operator-air")).status_code == 200
    # undeclared data: admin only (or the 'undeclared' purpose)
    assert c.get(f"{E}/{UNDECLARED}", headers=governed.as_("operator")).status_code == 403
    assert c.get(f"{E}/{UNDECLARED}", headers=governed.as_("admin")).status_code == 200
    # history follows the same rule
    r = c.get(
        "/ngsi-ld/v1/temporal/entities",
        params={"type": "AirQualityObserved,TrafficFlowObserved"},
        headers=governed.as_("analyst"),
    )
    assert ids_of(r) == {TRAFFIC}
    r = c.get(f"/ngsi-ld/v1/temporal/entities/{AIR}", headers=governed.as_("analyst"))
    assert r.status_code == 403


def test_writes_need_the_purpose_and_a_refused_item_spares_its_neighbours(
    governed: Governed,
) -> None:
    c = governed.client
    op = governed.as_("operator")
    r = c.patch(f"{E}/{AIR}/attrs", json={"no2": 99}, headers=op)
    assert r.status_code == 403 and "environment-monitoring" in r.json()["detail"]
    assert c.patch(f"{E}/{TRAFFIC}/attrs", json={"intensity": 11}, headers=op).status_code == 204
    assert c.delete(f"{E}/{AIR}", headers=op).status_code == 403
    batch = [
        {"id": TRAFFIC, "type": "TrafficFlowObserved", "intensity": 12},
        {"id": AIR, "type": "AirQualityObserved", "no2": 99},
        {"id": "urn:ngsi-ld:TrafficFlowObserved:t2", "type": "TrafficFlowObserved", "intensity": 1},
    ]
    r = c.post("/ngsi-ld/v1/entityOperations/upsert", json=batch, headers=op)
    assert r.status_code == 207, r.text
    body = r.json()
    assert set(body["success"]) == {TRAFFIC, "urn:ngsi-ld:TrafficFlowObserved:t2"}
    assert [e["entityId"] for e in body["errors"]] == [AIR]
    assert body["errors"][0]["error"]["status"] == 403
    admin = governed.as_("admin")
    assert c.get(f"{E}/{AIR}", headers=admin).json()["no2"]["value"] == 30
    assert c.get(f"{E}/{TRAFFIC}", headers=admin).json()["intensity"]["value"] == 12
    # upserting another purpose's entity under an allowed type does not take it over
    r = c.post(
        "/ngsi-ld/v1/entityOperations/upsert",
        json=[{"id": AIR, "type": "TrafficFlowObserved", "intensity": 1}],
        headers=op,
    )
    assert r.status_code == 207 and r.json()["errors"][0]["entityId"] == AIR
    # the analyst writes nothing at all
    r = c.patch(f"{E}/{TRAFFIC}/attrs", json={"intensity": 1}, headers=governed.as_("analyst"))
    assert r.status_code == 403 and r.json()["missingPermission"] == "data:write"


def test_a_device_writes_only_its_own_entities(governed: Governed) -> None:
    c = governed.client
    dev = governed.as_("device")
    own = {"id": DEVICE_OWN, "type": "TrafficFlowObserved", "intensity": 5}
    assert c.post(E, json=own, headers=dev).status_code == 201
    assert c.patch(f"{E}/{DEVICE_OWN}/attrs", json={"intensity": 6}, headers=dev).status_code == 204
    r = c.patch(f"{E}/{TRAFFIC}/attrs", json={"intensity": 6}, headers=dev)
    assert r.status_code == 403 and r.json()["missingPermission"] == "device:own-entity"
    r = c.post(
        "/ngsi-ld/v1/entityOperations/upsert",
        json=[{**own, "intensity": 7}, {"id": TRAFFIC, "type": "TrafficFlowObserved"}],
        headers=dev,
    )
    assert r.status_code == 207 and r.json()["success"] == [DEVICE_OWN]
    # and reads nothing, not even its own entity
    r = c.get(f"{E}/{DEVICE_OWN}", headers=dev)
    assert r.status_code == 403 and r.json()["missingPermission"] == "data:read"
    # a revoked key stops working
    gov = governed.gov
    key_id = gov.identities.list_device_keys()[0]["keyId"]
    admin = governed.as_("admin")
    assert c.delete(f"/cityward/v1/device-keys/{key_id}", headers=admin).status_code == 204
    assert c.post(E, json={**own, "id": DEVICE_OWN + "b"}, headers=dev).status_code == 401


def _local_claims(governed: Governed, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": "cityward",
        "sub": "mallory",
        "iat": now,
        "exp": now + 600,
        "role": "admin",
        "purposes": ["*"],
    }
    claims.update(over)
    return claims


@pytest.mark.parametrize(
    "case",
    ["expired", "wrong-signature", "alg-none", "wrong-issuer", "bad-role", "garbage", "no-exp"],
)
def test_bad_tokens_get_401(governed: Governed, case: str) -> None:
    key = governed.gov.identities._local_key
    assert key is not None
    if case == "expired":
        token = jwt.encode(_local_claims(governed, exp=int(time.time()) - 3600), key, "HS256")
    elif case == "wrong-signature":
        token = jwt.encode(_local_claims(governed), b"x" * 32, "HS256")
    elif case == "alg-none":
        token = jwt.encode(_local_claims(governed), None, algorithm="none")  # type: ignore[arg-type]
    elif case == "wrong-issuer":
        token = jwt.encode(_local_claims(governed, iss="evil"), key, "HS256")
    elif case == "bad-role":
        token = jwt.encode(_local_claims(governed, role="root"), key, "HS256")
    elif case == "no-exp":
        claims = _local_claims(governed)
        del claims["exp"]
        token = jwt.encode(claims, key, "HS256")
    else:
        token = "not.a.token"
    r = governed.client.get(
        E, params={"type": "Thing"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert r.status_code == 401, r.text
    body = r.json()
    assert body["field"] == "Authorization" and body["status"] == 401
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_an_asymmetric_token_from_an_oidc_provider(store: Any, tmp_path: Any) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from fastapi.testclient import TestClient

    from cityward.api.app import create_app
    from cityward.config import GovernanceSettings, Settings

    private = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "idp.pem"
    pem.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    gov = GovernanceSettings(
        jwt_issuer="https://keycloak.city.example/realms/city",
        jwt_audience="cityward",
        jwt_public_keys=[pem],
        role_claim="cityward_role",
        purposes_claim="scope",
    )
    settings = Settings(data_dir=tmp_path, context_fetch=False, governance=gov)
    now = int(time.time())
    claims = {
        "iss": gov.jwt_issuer,
        "aud": "cityward",
        "sub": "jane",
        "iat": now,
        "exp": now + 60,
        "cityward_role": "analyst",
        "scope": "traffic-management environment-monitoring",
    }
    with TestClient(create_app(settings, store)) as c:
        token = jwt.encode(claims, private, algorithm="ES256")
        r = c.get("/cityward/v1/whoami", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        assert r.json()["role"] == "analyst"
        assert r.json()["purposes"] == ["environment-monitoring", "traffic-management"]
        other = ec.generate_private_key(ec.SECP256R1())
        forged = jwt.encode(claims, other, algorithm="ES256")
        r = c.get("/cityward/v1/whoami", headers={"Authorization": f"Bearer {forged}"})
        assert r.status_code == 401
        wrong_aud = jwt.encode({**claims, "aud": "other"}, private, algorithm="ES256")
        r = c.get("/cityward/v1/whoami", headers={"Authorization": f"Bearer {wrong_aud}"})
        assert r.status_code == 401


def _oidc_app(store: Any, tmp_path: Path, **gov_options: Any) -> FastAPI:
    gov = GovernanceSettings(jwt_issuer="https://idp.example", **gov_options)
    return create_app(Settings(data_dir=tmp_path, context_fetch=False, governance=gov), store)


def _oidc_token(key: Any, alg: str, kid: str | None = None, **over: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": "https://idp.example",
        "sub": f"jane-{uuid.uuid4().hex[:8]}",  # a new token each time: no verification cache
        "iat": now,
        "exp": now + 60,
        "role": "analyst",
        "purposes": ["traffic-management"],
        **over,
    }
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid} if kid else None)


def _pem_file(path: Path, key: Any) -> Path:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def _jwks(key: Any, kid: str) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {"keys": [{**jwk, "kid": kid, "use": "sig", "alg": "RS256"}]}


def _whoami(c: TestClient, token: str) -> Any:
    return c.get("/cityward/v1/whoami", headers={"Authorization": f"Bearer {token}"})


def _denials(app: FastAPI) -> list[tuple[int, str]]:
    audit = app.state.governance.audit
    audit.flush()
    return [(r["result"], r["detail"]) for r in audit.query(action="denied")]


@pytest.mark.parametrize("source", ["pem", "jwks_file"])
def test_a_token_of_another_key_type_is_a_401_and_audited(
    store: Any, tmp_path: Path, source: str
) -> None:
    """RSA keys configured; ES256 and EdDSA tokens made PyJWT raise TypeError, InvalidKeyError."""
    idp = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if source == "pem":
        app = _oidc_app(store, tmp_path, jwt_public_keys=[_pem_file(tmp_path / "idp.pem", idp)])
    else:
        (tmp_path / "jwks.json").write_text(json.dumps(_jwks(idp, "k1")))
        app = _oidc_app(store, tmp_path, jwks_file=tmp_path / "jwks.json")
    forged = {
        "ES256": _oidc_token(ec.generate_private_key(ec.SECP256R1()), "ES256", "k1"),
        "EdDSA": _oidc_token(ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
    }
    with TestClient(app, raise_server_exceptions=False) as c:
        assert _whoami(c, _oidc_token(idp, "RS256", "k1")).status_code == 200
        for alg, token in forged.items():
            r = _whoami(c, token)
            assert r.status_code == 401, (alg, r.text)
            assert r.headers["content-type"] == "application/json"
            assert r.json()["field"] == "Authorization"
            assert f"no configured key verifies {alg} tokens" in r.json()["detail"]
        assert _denials(app) == [
            (401, "no configured key verifies ES256 tokens"),
            (401, "no configured key verifies EdDSA tokens"),
        ]


class _JwksServer:
    """A real JWKS endpoint on a local port, started and stopped by the test."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]  # free now; nothing listens until start()
        self.url = f"http://127.0.0.1:{self.port}/jwks"
        self.doc: dict[str, Any] = {"keys": []}
        self.status = 200
        self.hits = 0
        self.hold: threading.Event | None = None  # set: answer; unset: wait (up to 4 s)
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                if outer.hold is not None:
                    outer.hold.wait(4.0)
                body = json.dumps(outer.doc).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def test_a_jwks_endpoint_that_is_down_or_lacks_the_kid(
    store: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PEM-verified tokens keep working; the outage is logged once; JWKS keys come back."""
    monkeypatch.setattr(identity, "JWKS_RETRY_S", 0.0)  # ask the endpoint on every request
    idp_jwks = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    idp_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server = _JwksServer()
    server.doc.update(_jwks(idp_jwks, "jwks-key"))
    app = _oidc_app(
        store,
        tmp_path,
        jwks_url=server.url,
        jwt_public_keys=[_pem_file(tmp_path / "idp.pem", idp_pem)],
    )
    try:
        with (
            TestClient(app, raise_server_exceptions=False) as c,
            caplog.at_level(logging.WARNING, logger="cityward.governance"),
        ):
            # the endpoint is down: tokens of the PEM key pass, with or without a kid
            for kid in ("pem-key", None, "pem-key"):
                r = _whoami(c, _oidc_token(idp_pem, "RS256", kid))
                assert r.status_code == 200, r.text
            down = [m for m in caplog.messages if "cannot be reached" in m]
            assert len(down) == 1, caplog.messages
            r = _whoami(c, _oidc_token(idp_jwks, "RS256", "jwks-key"))
            assert (r.status_code, r.json()["field"]) == (401, "Authorization"), r.text
            assert "does not verify" in r.json()["detail"]
            # it answers again: its key counts, an unknown kid still falls back to the PEM key
            server.start()
            assert _whoami(c, _oidc_token(idp_jwks, "RS256", "jwks-key")).status_code == 200
            assert any("answers again" in m for m in caplog.messages)
            assert _whoami(c, _oidc_token(idp_pem, "RS256", "unknown")).status_code == 200
            r = _whoami(c, _oidc_token(rsa.generate_private_key(65537, 2048), "RS256", "zz"))
            assert r.status_code == 401, r.text
    finally:
        server.stop()
    assert [status for status, _ in _denials(app)] == [401, 401]


def test_a_failing_jwks_endpoint_alone_is_a_401_and_not_asked_on_every_request(
    store: Any, tmp_path: Path
) -> None:
    server = _JwksServer()
    server.status = 503
    server.start()
    app = _oidc_app(store, tmp_path, jwks_url=server.url)
    idp = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            for _ in range(3):
                r = _whoami(c, _oidc_token(idp, "RS256", "k1"))
                assert r.status_code == 401, r.text
                assert r.json()["detail"] == "the JWKS endpoint cannot be reached"
    finally:
        server.stop()
    assert server.hits == 1  # the next ones fell in the retry pause
    assert [status for status, _ in _denials(app)] == [401, 401, 401]


def test_a_slow_jwks_endpoint_holds_up_only_the_request_that_needs_it(
    store: Any, tmp_path: Path
) -> None:
    """The JWKS fetch ran on the event loop: every other request waited for it. The endpoint
    here answers only once another request has been served (or after 4 s)."""
    idp = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server = _JwksServer()
    server.doc.update(_jwks(idp, "k1"))
    server.hold = threading.Event()
    server.start()
    app = _oidc_app(store, tmp_path, jwks_url=server.url)
    served: list[tuple[str, int]] = []
    try:
        with TestClient(app, raise_server_exceptions=False) as c:

            def needs_the_endpoint() -> None:
                served.append(("token", _whoami(c, _oidc_token(idp, "RS256", "k1")).status_code))

            waiting = threading.Thread(target=needs_the_endpoint)
            waiting.start()
            deadline = time.monotonic() + 30
            while server.hits == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.hits == 1
            served.append(("other", c.get(f"{E}/{TRAFFIC}").status_code))
            server.hold.set()
            waiting.join()
            # the key is cached now: no thread, no fetch
            assert _whoami(c, _oidc_token(idp, "RS256", "k1")).status_code == 200
    finally:
        server.hold.set()
        server.stop()
    assert served == [("other", 401), ("token", 200)]
    assert server.hits == 1


def test_the_audit_trail_records_writes_sensitive_reads_and_denials(governed: Governed) -> None:
    c = governed.client
    audit = governed.gov.audit
    assert audit is not None
    op = governed.as_("operator")
    assert c.patch(f"{E}/{TRAFFIC}/attrs", json={"intensity": 13}, headers=op).status_code == 204
    upsert = [{"id": TRAFFIC, "type": "TrafficFlowObserved", "intensity": 14}]
    r = c.post("/ngsi-ld/v1/entityOperations/upsert", json=upsert, headers=op)
    assert r.status_code == 204
    assert c.get(f"{E}/{TRAFFIC}", headers=op).status_code == 200  # not personal: not audited
    assert c.get(f"{E}/{CROWD}", headers=op).status_code == 200  # indirect: audited
    # a query answering with indirect data is an audited read too, of those entities only
    r = c.get(E, params={"type": "CrowdFlowObserved,TrafficFlowObserved"}, headers=op)
    assert {e["id"] for e in r.json()} == {TRAFFIC, CROWD}
    assert c.get(f"{E}/{AIR}", headers=op).status_code == 403
    assert c.get(E, params={"type": "Thing"}).status_code == 401
    records = c.get(
        "/cityward/v1/audit", params={"limit": "1000"}, headers=governed.as_("auditor")
    ).json()
    mine = [r for r in records if r["actor"] != "cityward" and r["role"] != "admin"]
    kinds = [(r["action"], r["method"], r["path"].split("?")[0], r["result"]) for r in mine]
    assert ("write", "PATCH", f"{E}/{TRAFFIC}/attrs", 204) in kinds
    assert ("read", "GET", f"{E}/{CROWD}", 200) in kinds
    query_read = [r for r in mine if r["action"] == "read" and r["path"].startswith(E + "?")]
    assert [r["entity_ids"] for r in query_read] == [[CROWD]]
    assert query_read[0]["count"] == 1
    assert ("denied", "GET", f"{E}/{AIR}", 403) in kinds
    assert ("denied", "GET", E, 401) in kinds
    assert not any(k[0] == "read" and k[2] == f"{E}/{TRAFFIC}" for k in kinds)
    upserted = next(r for r in mine if r["path"].endswith("entityOperations/upsert"))
    assert upserted["entity_ids"] == [TRAFFIC] and upserted["count"] == 1
    write = next(r for r in mine if r["action"] == "write")
    assert write["entity_ids"] == [TRAFFIC] and write["purposes"] == ["traffic-management"]
    # nobody can change the log through the API
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        r = c.request(method, "/cityward/v1/audit", headers=governed.as_("admin"))
        assert r.status_code in (404, 405), (method, r.status_code)
    r = c.get("/cityward/v1/audit/verify", headers=governed.as_("auditor"))
    assert r.status_code == 200 and r.json()["ok"] is True, r.text


def test_type_and_attribute_details_tell_only_what_the_token_may_read(
    governed: Governed,
) -> None:
    """/types/{type}, /types?details=true and /attributes/{attr} scanned every entity: a token
    without the purpose learnt how many there were and their attribute names, and what it
    learnt of indirect data was not audited."""
    c = governed.client
    air = governed.as_("operator-air")
    ngsi = "/ngsi-ld/v1"
    assert c.get(f"{ngsi}/types/TrafficFlowObserved", headers=air).status_code == 404
    assert c.get(f"{ngsi}/types/Thing", headers=air).status_code == 404  # undeclared
    assert c.get(f"{ngsi}/attributes/intensity", headers=air).status_code == 404
    r = c.get(f"{ngsi}/types", params={"details": "true"}, headers=air)
    assert r.status_code == 200
    assert {t["typeName"] for t in r.json()} == {"AirQualityObserved"}, r.json()
    r = c.get(f"{ngsi}/types/AirQualityObserved", headers=air)
    assert r.status_code == 200 and r.json()["entityCount"] == 1, r.text
    # the traffic operator may read crowd counts (indirect): told, and audited as a read
    op = governed.as_("operator")
    r = c.get(f"{ngsi}/types/CrowdFlowObserved", headers=op)
    assert r.status_code == 200 and r.json()["entityCount"] == 1, r.text
    records = c.get(
        "/cityward/v1/audit",
        params={"action": "read", "limit": "1000"},
        headers=governed.as_("auditor"),
    ).json()
    reads = [r["entity_ids"] for r in records if r["path"].startswith(f"{ngsi}/types/")]
    assert reads == [[CROWD]], records
    # the admin sees everything, as before
    r = c.get(f"{ngsi}/types/TrafficFlowObserved", headers=governed.as_("admin"))
    assert r.status_code == 200 and r.json()["entityCount"] == 1


def test_an_entity_refused_inside_a_batch_is_named_by_its_audit_record(
    governed: Governed,
) -> None:
    """A batch answered 207 with a 403 for an entity of another source: its audit record named
    the entities written only, so a search for the refused entity found nothing."""
    c = governed.client
    op = governed.as_("operator")
    batch = [
        {"id": TRAFFIC, "type": "TrafficFlowObserved", "intensity": 2},
        {"id": AIR, "type": "AirQualityObserved", "no2": 999},
    ]
    r = c.post("/ngsi-ld/v1/entityOperations/upsert", json=batch, headers=op)
    assert r.status_code == 207, r.text
    r = c.post("/ngsi-ld/v1/entityOperations/delete", json=[AIR], headers=op)
    assert r.status_code in (207, 400, 403), r.text
    records = c.get(
        "/cityward/v1/audit",
        params={"entity": AIR, "limit": "100"},
        headers=governed.as_("auditor"),
    ).json()
    mine = [(r["path"], r["extra"].get("denied")) for r in records if r["role"] == "operator"]
    assert ("/ngsi-ld/v1/entityOperations/upsert", [AIR]) in mine, records
    assert any(p == "/ngsi-ld/v1/entityOperations/delete" for p, _ in mine), records
    upsert = next(r for r in records if r["path"].endswith("/upsert") and r["role"] == "operator")
    assert upsert["count"] == 1 and upsert["entity_ids"] == [TRAFFIC, AIR]


def test_a_token_that_could_never_be_used_is_not_issued(governed: Governed) -> None:
    """An operator or auditor token with every purpose ('*') was issued (201), and then
    refused (401) on every use; a bad purpose of a device key was reported as a bad pattern."""
    c = governed.client
    admin = governed.as_("admin")
    for role in ("operator", "analyst", "auditor"):
        r = c.post("/cityward/v1/tokens", json={"role": role, "purposes": ["*"]}, headers=admin)
        assert r.status_code == 400 and r.json()["field"] == "purposes", r.text
        assert "only admin tokens may carry every purpose" in r.json()["detail"]
    r = c.post("/cityward/v1/tokens", json={"role": "admin", "purposes": ["*"]}, headers=admin)
    assert r.status_code == 201, r.text
    r = c.post(
        "/cityward/v1/device-keys",
        json={"device": "d1", "entityIdPatterns": ["urn:x:.*"], "purposes": ["Bad Purpose"]},
        headers=admin,
    )
    assert r.status_code == 400 and r.json()["field"] == "purposes", r.text
    r = c.post(
        "/cityward/v1/device-keys", json={"device": "d1", "entityIdPatterns": ["("]}, headers=admin
    )
    assert r.status_code == 400 and r.json()["field"] == "entityIdPatterns", r.text


def test_an_id_with_slashes_gets_its_routes_rule_not_the_admin_fallback(
    governed: Governed,
) -> None:
    """Entity ids are URIs and may hold '/': the temporal, delete and subscription rules
    matched `[^/]+`, so such a request fell to the admin-only fallback: an operator with the
    purpose got 403, and an admin's export of its history left no audit record."""
    c = governed.client
    eid = "https://city.example/TrafficFlowObserved/loop/17"
    body = [{"id": eid, "type": "TrafficFlowObserved", "intensity": 3}]
    r = c.post("/ngsi-ld/v1/entityOperations/upsert", json=body, headers=governed.as_("admin"))
    assert r.status_code in (201, 204), r.text
    for method, path in (
        ("GET", f"/ngsi-ld/v1/temporal/entities/{eid}"),
        ("DELETE", f"{E}/{eid}/attrs/intensity"),
        ("DELETE", f"{E}/{eid}"),
        ("GET", "/ngsi-ld/v1/subscriptions/https://city.example/subscriptions/1"),
    ):
        assert route_for(method, path) is not FALLBACK, path
    op = governed.as_("operator")
    assert c.get(f"/ngsi-ld/v1/temporal/entities/{eid}", headers=op).status_code == 200
    assert (
        c.get(f"/ngsi-ld/v1/temporal/entities/{eid}", headers=governed.as_("admin")).status_code
        == 200
    )
    records = c.get(
        "/cityward/v1/audit",
        params={"action": "export", "limit": "1000"},
        headers=governed.as_("auditor"),
    ).json()
    exports = [(r["role"], r["path"]) for r in records]
    assert ("operator", f"/ngsi-ld/v1/temporal/entities/{eid}") in exports, exports
    assert ("admin", f"/ngsi-ld/v1/temporal/entities/{eid}") in exports, exports
    # the operator's purpose covers traffic data: deleting it is its right too
    assert c.delete(f"{E}/{eid}/attrs/intensity", headers=op).status_code == 204
    assert c.delete(f"{E}/{eid}", headers=op).status_code == 204


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("since=garbage", "since"),
        ("until=2024-13-01", "until"),
        ("since=0001-01-01T00:00:00%2B05:00", "since"),  # before year 1 in UTC
        ("until=9999-12-31T23:00:00-05:00", "until"),  # after year 9999 in UTC
        ("after=99999999999999999999", "after"),
        ("after=-1", "after"),
        ("after=x", "after"),
        ("limit=x", "limit"),
        ("limit=1001", "limit"),
    ],
)
def test_the_audit_route_names_a_malformed_parameter(
    governed: Governed, query: str, field: str
) -> None:
    r = governed.client.get(f"/cityward/v1/audit?{query}", headers=governed.as_("auditor"))
    assert r.status_code == 400, r.text
    body = r.json()
    assert (body["status"], body["field"]) == (400, field), body
    assert body["type"].endswith("BadRequestData")


def test_the_audit_route_takes_the_extremes(governed: Governed) -> None:
    c, auditor = governed.client, governed.as_("auditor")
    r = c.get("/cityward/v1/audit", params={"after": str(2**62)}, headers=auditor)
    assert (r.status_code, r.json()) == (200, [])
    # a year before 1000 is still before every record ("999-" sorts after "2026-" as text)
    r = c.get("/cityward/v1/audit", params={"since": "0999-01-01"}, headers=auditor)
    assert r.status_code == 200 and len(r.json()) > 0, r.text
    r = c.get("/cityward/v1/audit", params={"until": "0999-01-01"}, headers=auditor)
    assert (r.status_code, r.json()) == (200, [])


def test_no_auth_is_loud_and_loopback_only(tmp_path: Any) -> None:
    result = CliRunner().invoke(
        cli_app, ["serve", "--no-auth", "--host", "0.0.0.0", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "loopback" in result.output


def test_no_auth_header_on_every_response(client: Any) -> None:
    r = client.get("/ngsi-ld/v1/types")
    assert r.headers["x-cityward-auth"].startswith("DISABLED")
    r = client.get("/ngsi-ld/v1/entities/urn:ngsi-ld:X:nope")
    assert r.status_code == 404 and r.headers["x-cityward-auth"].startswith("DISABLED")


def catalog_app(
    store: Store, tmp_path: Path, sources: list[DataSource]
) -> tuple[FastAPI, Callable[..., dict[str, str]]]:
    """A governed app with its own catalog, and a maker of a token's headers (role, purposes)."""
    settings = Settings(
        data_dir=tmp_path, context_fetch=False, governance=GovernanceSettings(sources=sources)
    )
    app = create_app(settings, store)
    ids = app.state.governance.identities

    def bearer(role: Role, *purposes: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {ids.issue(role, list(purposes))}"}

    return app, bearer


def test_notifications_carry_only_the_data_of_the_owners_purposes(governed: Governed) -> None:
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    got: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        c = governed.client
        sub = {
            "id": "urn:ngsi-ld:Subscription:everything",
            "type": "Subscription",
            "watchedAttributes": ["no2", "intensity"],
            "notification": {"endpoint": {"uri": f"http://127.0.0.1:{server.server_address[1]}/n"}},
        }
        r = c.post("/ngsi-ld/v1/subscriptions", json=sub, headers=governed.as_("operator"))
        assert r.status_code == 201, r.text
        admin = governed.as_("admin")
        assert c.patch(f"{E}/{AIR}/attrs", json={"no2": 41}, headers=admin).status_code == 204
        assert (
            c.patch(f"{E}/{TRAFFIC}/attrs", json={"intensity": 9}, headers=admin).status_code == 204
        )
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # a notification of the air-quality change would have come first
        ids = [e["id"] for n in got for e in n["data"]]
        assert ids == [TRAFFIC]
    finally:
        server.shutdown()
        server.server_close()


def test_id_pattern_sources_win_over_types_in_queries(store: Any, tmp_path: Any) -> None:
    from fastapi.testclient import TestClient

    from cityward.governance.sources import DataSource

    common = {"legal_basis": "public task", "retention": "P30D", "owner": "city"}
    sources = [
        DataSource(
            id="counts",
            name="Counts",
            types=("CrowdFlowObserved",),
            purposes=("mobility",),
            **common,
        ),
        DataSource(
            id="station",
            name="Station exit cameras",
            id_patterns=("urn:ngsi-ld:CrowdFlowObserved:station-.*",),
            purposes=("public-safety",),
            personal_data="indirect",
            **common,
        ),
    ]
    app, bearer = catalog_app(store, tmp_path, sources)
    admin = bearer(Role.ADMIN, "*")
    mobility = bearer(Role.ANALYST, "mobility")
    safety = bearer(Role.ANALYST, "public-safety")
    with TestClient(app) as c:
        batch = [
            {"id": f"urn:ngsi-ld:CrowdFlowObserved:{n}", "type": "CrowdFlowObserved", "people": 1}
            for n in ("street-1", "station-1", "station-2")
        ]
        assert (
            c.post("/ngsi-ld/v1/entityOperations/create", json=batch, headers=admin).status_code
            == 201
        )
        q = {"type": "CrowdFlowObserved"}
        assert ids_of(c.get(E, params=q, headers=mobility)) == {
            "urn:ngsi-ld:CrowdFlowObserved:street-1"
        }
        assert ids_of(c.get(E, params=q, headers=safety)) == {
            "urn:ngsi-ld:CrowdFlowObserved:station-1",
            "urn:ngsi-ld:CrowdFlowObserved:station-2",
        }
        r = c.get(f"{E}/urn:ngsi-ld:CrowdFlowObserved:station-1", headers=mobility)
        assert r.status_code == 403
        assert r.json()["missingPermission"] == "purpose:public-safety"


# -- alerts computed from a source belong to it --------------------------------------------
FROM_TRAFFIC = "urn:ngsi-ld:Alert:from:traffic-detectors:a1"
FROM_UNDECLARED = "urn:ngsi-ld:Alert:from:undeclared:a2"
FROM_UNKNOWN = "urn:ngsi-ld:Alert:from:no-such-source:a3"
PLAIN_ALERT = "urn:ngsi-ld:Alert:manual:a4"
CAMERA_ALERT = "urn:ngsi-ld:Alert:camera:cam-1:a5"  # a camera event: the camera's source


def _alerts(c: TestClient, admin: dict[str, str]) -> None:
    body = [
        {"id": eid, "type": "Alert", "category": "traffic", "description": "speed 500"}
        for eid in (FROM_TRAFFIC, FROM_UNDECLARED, FROM_UNKNOWN, PLAIN_ALERT, CAMERA_ALERT)
    ]
    r = c.post("/ngsi-ld/v1/entityOperations/upsert", json=body, headers=admin)
    assert r.status_code in (201, 204), r.text


def test_an_alert_derived_from_a_source_is_read_with_the_source_purposes(
    governed: Governed,
) -> None:
    # an Alert computed from a traffic sensor carries its value and place: a token that may
    # not read the sensor may not read it either (it was readable by every purpose of the
    # 'alerts' source, environment-monitoring included); undeclared data stays personal
    c = governed.client
    _alerts(c, governed.as_("admin"))
    alerts = {"type": "Alert"}
    everything = {"local": "true", "type": "*"}
    assert ids_of(c.get(E, params=alerts, headers=governed.as_("operator"))) == {
        FROM_TRAFFIC,
        PLAIN_ALERT,
        CAMERA_ALERT,
    }
    assert ids_of(c.get(E, params=alerts, headers=governed.as_("operator-air"))) == {PLAIN_ALERT}
    assert ids_of(c.get(E, params=everything, headers=governed.as_("operator-air"))) == {
        AIR,
        PLAIN_ALERT,
    }
    token = governed.gov.identities.issue(Role.ANALYST, ["undeclared", "environment-monitoring"])
    wide = {"Authorization": f"Bearer {token}"}
    # an id naming a source the catalog does not hold is undeclared data
    assert ids_of(c.get(E, params=alerts, headers=wide)) == {
        FROM_UNDECLARED,
        FROM_UNKNOWN,
        PLAIN_ALERT,
    }
    r = c.get(f"{E}/{FROM_TRAFFIC}", headers=governed.as_("operator-air"))
    assert r.status_code == 403
    assert r.json()["missingPermission"] == "purpose:traffic-management"
    assert c.get(f"{E}/{FROM_TRAFFIC}", headers=governed.as_("operator")).status_code == 200
    assert c.get(f"{E}/{FROM_UNDECLARED}", headers=governed.as_("operator")).status_code == 403
    # an id with nothing after the source id names no source: undeclared, by id and in
    # queries alike (by id it was the traffic detectors', in queries undeclared)
    bare = "urn:ngsi-ld:Alert:from:traffic-detectors"
    r = c.post(E, json={"id": bare, "type": "Alert"}, headers=governed.as_("admin"))
    assert r.status_code == 201, r.text
    assert c.get(f"{E}/{bare}", headers=governed.as_("operator")).status_code == 403
    assert bare not in ids_of(c.get(E, params=alerts, headers=governed.as_("operator")))
    assert c.get(f"{E}/{bare}", headers=wide).status_code == 200
    assert bare in ids_of(c.get(E, params=alerts, headers=wide))
    # writing one needs the source's purpose too
    r = c.patch(
        f"{E}/{FROM_TRAFFIC}/attrs",
        json={"description": "changed"},
        headers=governed.as_("operator-air"),
    )
    assert r.status_code == 403
    # counts and temporal queries follow the same rule
    r = c.get(E, params={**alerts, "count": "true"}, headers=governed.as_("operator-air"))
    assert r.headers["NGSILD-Results-Count"] == "1"
    r = c.get("/ngsi-ld/v1/temporal/entities", params=alerts, headers=governed.as_("operator-air"))
    assert ids_of(r) == {PLAIN_ALERT}


def test_derived_alerts_without_id_patterns_in_the_catalog(store: Store, tmp_path: Path) -> None:
    # without id patterns a query for visible types skips the per-entity type check: derived
    # alerts must be checked all the same
    sources = [
        DataSource(
            id="traffic",
            name="Traffic",
            types=("TrafficFlowObserved",),
            purposes=("traffic-management",),
            legal_basis="public task",
            retention="P1Y",
            owner="City",
        ),
        DataSource(
            id="alerts",
            name="Alerts",
            kind=SourceKind.DERIVED,
            types=("Alert",),
            purposes=("traffic-management", "environment-monitoring"),
            legal_basis="public task",
            retention="P1Y",
            owner="City",
        ),
    ]
    app, bearer = catalog_app(store, tmp_path, sources)
    admin = bearer(Role.ADMIN, "*")
    air = bearer(Role.OPERATOR, "environment-monitoring")
    road = bearer(Role.OPERATOR, "traffic-management")
    derived = "urn:ngsi-ld:Alert:from:traffic:a1"
    with TestClient(app) as c:
        _alerts(c, admin)
        r = c.post("/ngsi-ld/v1/entities", json={"id": derived, "type": "Alert"}, headers=admin)
        assert r.status_code == 201, r.text
        # (this catalog does not give camera alerts to a camera source)
        plain = {PLAIN_ALERT, CAMERA_ALERT}
        assert ids_of(c.get(E, params={"type": "Alert"}, headers=air)) == plain
        assert ids_of(c.get(E, params={"type": "Alert"}, headers=road)) == {derived, *plain}
