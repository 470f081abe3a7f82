"""Who is calling: bearer tokens (JWT) and device API keys, verified into a :class:`Principal`.

Local tokens are HS256, signed with a key kept in the data folder (``cityward token create``).
Tokens of an OIDC provider (Keycloak, ...) are verified with its public keys, from PEM files, a
JWKS file or a JWKS URL; their role and purposes come from configurable claims. ``alg=none`` and
any algorithm outside the configured set are refused by PyJWT's ``algorithms`` list.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from cityward.bank.store import Store
from cityward.config import GovernanceSettings
from cityward.governance.keys import load_or_create_key
from cityward.governance.policy import Role
from cityward.governance.sources import ALL_PURPOSES, check_purpose

log = logging.getLogger("cityward.governance")

LOCAL_ALG = "HS256"
ASYMMETRIC_ALGS = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]
API_KEY_PREFIX = "cwk_"
_CACHE_SIZE = 4096
API_KEY_CACHE_S = 30.0
# a JWKS fetch holds up the request that needs it (on a worker thread, not the event loop: see
# Identities.may_block): an endpoint that does not answer is given up
# quickly, and not asked again for a while (keys it gave before still count meanwhile)
JWKS_TIMEOUT_S = 5.0
JWKS_RETRY_S = 30.0


class AuthError(Exception):
    """The credentials are missing, malformed, expired or not ours (HTTP 401)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    subject: str
    role: Role
    purposes: frozenset[str]
    kind: str = "jwt"  # jwt | apikey | anonymous | dev
    token_id: str = ""
    expires: float = float("inf")
    # a device may only write entities whose id fully matches one of these
    device_patterns: tuple[re.Pattern[str], ...] = field(default=())

    def owns(self, eid: str) -> bool:
        return any(p.fullmatch(eid) for p in self.device_patterns)


ANONYMOUS = Principal("anonymous", Role.PUBLIC, frozenset(), kind="anonymous")
DEVELOPER = Principal("no-auth", Role.ADMIN, frozenset({ALL_PURPOSES}), kind="dev")


def _claim_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v for v in re.split(r"[\s,]+", value) if v]
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    raise AuthError("the purposes claim must be a list of strings")


DEVICE_KEYS_DDL = """
CREATE TABLE IF NOT EXISTS device_keys (
  key_id TEXT PRIMARY KEY,
  key_hash TEXT NOT NULL,
  device TEXT NOT NULL,
  body TEXT NOT NULL,
  created TEXT NOT NULL,
  revoked TEXT
)
"""


class Identities:
    """Issues and verifies tokens and device keys."""

    def __init__(self, settings: GovernanceSettings, data_dir: Path, store: Store | None) -> None:
        self.settings = settings
        self.dir = data_dir / "governance"
        self.store = store
        self._local_key = (
            load_or_create_key(self.dir / "jwt.key", "token signing key")
            if settings.local_tokens
            else None
        )
        self._public_keys: list[Any] = [_load_pem(p) for p in settings.jwt_public_keys]
        self._jwks: dict[str, Any] = {}
        if settings.jwks_file is not None:
            self._jwks = _jwks_keys(json.loads(settings.jwks_file.read_text()))
        self._jwks_client = (
            jwt.PyJWKClient(settings.jwks_url, timeout=JWKS_TIMEOUT_S)
            if settings.jwks_url
            else None
        )
        self._jwks_retry_at = 0.0  # monotonic; the endpoint is not asked before
        self._jwks_failing = False  # logged once per outage, not once per request
        # verified tokens, so that a request costs a dict lookup rather than a signature check
        self._cache: OrderedDict[str, Principal] = OrderedDict()
        self._lock = threading.Lock()
        self._revoked_at = 0.0
        if store is not None:
            with store.write("", create_tenant=False) as txn:
                txn.lock_migrations()
                txn.execute(DEVICE_KEYS_DDL)

    @property
    def _store(self) -> Store:
        if self.store is None:
            raise RuntimeError("device keys need the data bank's store")
        return self.store

    # -- tokens -----------------------------------------------------------------------------
    def issue(
        self,
        role: Role,
        purposes: list[str],
        subject: str | None = None,
        ttl_s: float | None = None,
    ) -> str:
        """A local HS256 token (``cityward token create``)."""
        if self._local_key is None:
            raise ValueError("local tokens are disabled (governance.local_tokens = false)")
        for p in purposes:
            if p != ALL_PURPOSES:
                check_purpose(p)
            elif role is not Role.ADMIN:  # every check of such a token would refuse it (401)
                raise ValueError("only admin tokens may carry every purpose ('*')")
        now = int(time.time())
        ttl = ttl_s if ttl_s is not None else self.settings.token_ttl_days * 86400
        claims = {
            "iss": self.settings.jwt_issuer,
            "sub": subject or f"{role.value}-{uuid.uuid4().hex[:8]}",
            "iat": now,
            "nbf": now,
            "exp": now + int(ttl),
            "jti": uuid.uuid4().hex,
            self.settings.role_claim: role.value,
            self.settings.purposes_claim: sorted(purposes),
        }
        if self.settings.jwt_audience:
            claims["aud"] = self.settings.jwt_audience
        return jwt.encode(claims, self._local_key, algorithm=LOCAL_ALG)

    def verify_bearer(self, token: str) -> Principal:
        now = time.time()
        hit = self._cache.get(token)
        if hit is not None:
            if hit.expires > now:
                return hit
            with self._lock:
                self._cache.pop(token, None)
            raise AuthError("the token has expired")
        principal = self._verify(token)
        with self._lock:
            self._cache[token] = principal
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return principal

    def _verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"the bearer token is not a JWT: {exc}") from exc
        alg = header.get("alg")
        options: dict[str, Any] = {"require": ["exp", "iat", "sub"]}
        kwargs: dict[str, Any] = {
            "issuer": self.settings.jwt_issuer,
            "options": options,
            "leeway": 30,
        }
        if self.settings.jwt_audience:
            kwargs["audience"] = self.settings.jwt_audience
        else:
            options["verify_aud"] = False
        try:
            if alg == LOCAL_ALG and self._local_key is not None:
                claims = jwt.decode(token, self._local_key, algorithms=[LOCAL_ALG], **kwargs)
            elif alg in ASYMMETRIC_ALGS:
                claims = self._decode_asymmetric(token, header, **kwargs)
            else:
                raise AuthError(f"tokens signed with {alg!r} are not accepted")
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("the token has expired") from exc
        except jwt.PyJWTError as exc:  # any of PyJWT's, not only InvalidTokenError: never a 500
            raise AuthError(f"the token is not valid: {exc}") from exc
        raw_role = claims.get(self.settings.role_claim)
        try:
            role = Role(str(raw_role))
        except ValueError as exc:
            raise AuthError(
                f"the token's {self.settings.role_claim!r} claim {raw_role!r} is not a role"
            ) from exc
        purposes = frozenset(_claim_list(claims.get(self.settings.purposes_claim)))
        if ALL_PURPOSES in purposes and role is not Role.ADMIN:
            raise AuthError("only admin tokens may carry every purpose ('*')")
        if role is Role.DEVICE:
            raise AuthError("devices authenticate with a device key, not a bearer token")
        return Principal(
            subject=str(claims["sub"]),
            role=role,
            purposes=purposes,
            token_id=str(claims.get("jti", "")),
            expires=float(claims["exp"]),
        )

    def _decode_asymmetric(self, token: str, header: dict[str, Any], **kwargs: Any) -> Any:
        alg = str(header["alg"])
        kid = header.get("kid")
        candidates: list[Any] = []
        if kid is not None and kid in self._jwks:
            candidates.append(self._jwks[kid])
        elif self._jwks:
            candidates.extend(self._jwks.values())
        jwks_key, jwks_missing = self._jwks_key(token, kid)
        if jwks_key is not None:
            candidates.append(jwks_key)
        candidates.extend(self._public_keys)
        if not candidates:
            raise AuthError(jwks_missing or "no public key is configured for asymmetric tokens")
        # only keys of the token's type: PyJWT answers an RSA key for an ES256 token with a
        # TypeError, an EdDSA one with InvalidKeyError, neither of them an InvalidTokenError
        algorithm = jwt.get_algorithm_by_name(alg)
        fitting = [k for k in candidates if _fits(algorithm, k)]
        if not fitting:
            raise AuthError(f"no configured key verifies {alg} tokens")
        last: Exception | None = None
        for key in fitting:
            try:
                return jwt.decode(token, key, algorithms=[alg], **kwargs)
            except jwt.InvalidSignatureError as exc:
                last = exc
        raise AuthError(f"the token's signature does not verify: {last}")

    def may_block(self, credential: str, *, api_key: bool) -> bool:
        """Whether checking ``credential`` may wait on I/O: a device key not in the cache (a
        database query), or a token whose kid the JWKS endpoint must be asked for (a fetch of
        up to JWKS_TIMEOUT_S). The middleware then checks it on a worker thread, so that the
        event loop serves the other requests meanwhile."""
        if api_key:
            hit = self._cache.get(credential)
            return hit is None or hit.expires <= time.time()
        client = self._jwks_client
        if client is None:
            return False
        try:
            kid = jwt.get_unverified_header(credential).get("kid")
        except jwt.PyJWTError:
            return False  # refused without a fetch
        cached = client.jwk_set_cache.get() if client.jwk_set_cache is not None else None
        return not any(k.key_id == kid for k in (cached.keys if cached else []))

    def _jwks_key(self, token: str, kid: object) -> tuple[Any | None, str]:
        """The JWKS endpoint's key for the token's kid, or None and why there is none.

        Either way the other configured keys are still tried: an unknown kid or an endpoint
        that is down must not turn tokens those keys verify away.
        """
        client = self._jwks_client
        if client is None:
            return None, ""
        down = "the JWKS endpoint cannot be reached"
        if time.monotonic() < self._jwks_retry_at:
            cached = client.jwk_set_cache.get() if client.jwk_set_cache is not None else None
            found = [k for k in (cached.keys if cached else []) if k.key_id == kid]
            return (found[0].key, "") if found else (None, down)
        try:
            key = client.get_signing_key_from_jwt(token).key
        except jwt.PyJWKClientConnectionError as exc:
            with self._lock:
                self._jwks_retry_at = time.monotonic() + JWKS_RETRY_S
                first, self._jwks_failing = not self._jwks_failing, True
            if first:
                log.error(
                    "the JWKS endpoint %s cannot be reached (%s); tokens are checked against "
                    "the other configured keys and the keys it gave before, and it is asked "
                    "again every %.0f s",
                    client.uri,
                    exc,
                    JWKS_RETRY_S,
                )
            return None, down
        except (jwt.PyJWKClientError, jwt.PyJWKSetError) as exc:
            # no key with this kid (or no usable key at all): a token problem, not an outage
            log.debug("no JWKS key for kid %r: %s", kid, exc)
            return None, f"the JWKS endpoint has no key {kid!r}"
        if self._jwks_failing:
            with self._lock:
                self._jwks_failing = False
            log.warning("the JWKS endpoint %s answers again", client.uri)
        return key, ""

    # -- device keys ------------------------------------------------------------------------
    def create_device_key(
        self, device: str, patterns: list[str], purposes: list[str]
    ) -> tuple[str, str]:
        """A new device key; returns (key_id, the key). Only its hash is stored."""
        for p in patterns:
            re.compile(p)
        for p in purposes:
            check_purpose(p)
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        body = json.dumps({"patterns": patterns, "purposes": purposes})
        with self._store.write("", create_tenant=False) as txn:
            txn.execute(
                "INSERT INTO device_keys (key_id, key_hash, device, body, created) "
                "VALUES (?, ?, ?, ?, ?)",
                [key_id, _hash(secret), device, body, _now()],
            )
        return key_id, f"{API_KEY_PREFIX}{key_id}_{secret}"

    def revoke_device_key(self, key_id: str) -> bool:
        with self._store.write("", create_tenant=False) as txn:
            rows = txn.execute(
                "UPDATE device_keys SET revoked = ? WHERE key_id = ? AND revoked IS NULL "
                "RETURNING key_id",
                [_now(), key_id],
            )
        with self._lock:
            for k in [k for k in self._cache if k.startswith(f"{API_KEY_PREFIX}{key_id}_")]:
                del self._cache[k]
        return bool(rows)

    def list_device_keys(self) -> list[dict[str, Any]]:
        rows = self._store.select(
            "SELECT key_id, device, body, created, revoked FROM device_keys ORDER BY created"
        )
        return [
            {"keyId": k, "device": d, **json.loads(b), "created": c, "revoked": r}
            for k, d, b, c, r in rows
        ]

    def verify_api_key(self, key: str) -> Principal:
        hit = self._cache.get(key)
        if hit is not None and hit.expires > time.time():
            return hit
        m = re.fullmatch(API_KEY_PREFIX + r"([0-9a-f]{12})_([A-Za-z0-9_-]{20,})", key)
        if m is None:
            raise AuthError("the device key is malformed")
        rows = self._store.select(
            "SELECT key_hash, device, body FROM device_keys WHERE key_id = ? AND revoked IS NULL",
            [m.group(1)],
        )
        if not rows or not hmac.compare_digest(rows[0][0], _hash(m.group(2))):
            raise AuthError("the device key is unknown or revoked")
        _, device, body = rows[0]
        spec = json.loads(body)
        principal = Principal(
            subject=device,
            role=Role.DEVICE,
            purposes=frozenset(spec["purposes"]),
            kind="apikey",
            token_id=m.group(1),
            expires=time.time() + API_KEY_CACHE_S,
            device_patterns=tuple(re.compile(p) for p in spec["patterns"]),
        )
        # cached for API_KEY_CACHE_S only, so a revocation in another process takes effect
        with self._lock:
            self._cache[key] = principal
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return principal

    # -- the first start -------------------------------------------------------------------
    def bootstrap_admin(self) -> Path | None:
        """On the first start of an embedded install: an admin token in a 0600 file.

        Returns the file when it was just created (so the caller prints where it is).
        """
        path = self.dir / "admin.token"
        if path.exists() or self._local_key is None:
            return None
        token = self.issue(Role.ADMIN, [ALL_PURPOSES], subject="admin", ttl_s=365 * 86400)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        return path


def _hash(secret: str) -> str:
    # the secret is 256 random bits: a plain SHA-256 cannot be brute-forced, no KDF needed
    return hashlib.sha256(secret.encode()).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _load_pem(path: Path) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    return load_pem_public_key(path.read_bytes())


def _fits(algorithm: Any, key: Any) -> bool:
    """Whether ``key`` is of the type ``algorithm`` verifies with (RSA, the curve, Ed25519)."""
    try:
        algorithm.prepare_key(key)
    except (jwt.InvalidKeyError, TypeError, ValueError):
        return False
    return True


def _jwks_keys(doc: dict[str, Any]) -> dict[str, Any]:
    keys = {}
    for n, jwk in enumerate(doc.get("keys", [])):
        keys[str(jwk.get("kid", n))] = jwt.PyJWK(jwk).key
    return keys
