"""NGSI-LD errors: one exception type per ETSI error, rendered as RFC 7807 ProblemDetails."""

from __future__ import annotations

from typing import Any

ERROR_BASE = "https://uri.etsi.org/ngsi-ld/errors/"
CITYWARD_BASE = "urn:cityward:problem:"


class NgsiError(Exception):
    """An error the API answers with a ProblemDetails body."""

    name = "InternalError"
    status = 500
    # ETSI's error types; cityward's own (401, 403, 503: NGSI-LD defines none) use a URN
    type_base = ERROR_BASE

    def __init__(self, detail: str, *, field: str | None = None, title: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.title = title or self.name

    @property
    def type_uri(self) -> str:
        return self.type_base + self.name

    def problem(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type_uri,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.field is not None:
            body["field"] = self.field
        return body


class InvalidRequest(NgsiError):
    name = "InvalidRequest"
    status = 400


class BadRequestData(NgsiError):
    name = "BadRequestData"
    status = 400


class StoreRefused(BadRequestData):
    """The database refused a write for its data, which no retry changes: a text PostgreSQL
    cannot store or index (a NUL character, a long text that does not fit an index row)."""


def store_refused(exc: BaseException) -> StoreRefused | None:
    """A StoreRefused for a database error about the written data, else None."""
    import sqlite3

    import orjson
    import psycopg

    # orjson's refusal to write a document as JSON (an integer past 64 bits) is about the data
    # too: it was retried for ever, and stalled an ingest writer behind one reading
    if isinstance(
        exc,
        sqlite3.DataError
        | psycopg.errors.DataError
        | psycopg.errors.ProgramLimitExceeded
        | orjson.JSONEncodeError,
    ):
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return StoreRefused(f"the store cannot take it: {why}", field="entity")
    return None


# SQLSTATEs of a lost or refused connection: class 08, and the server shutting the session
# down (pg_terminate_backend, a shutdown, a crash recovery)
_CONNECTION_LOST = ("08", "57P01", "57P02", "57P03")


def store_unavailable(exc: BaseException) -> ServiceUnavailable | None:
    """A ServiceUnavailable (503: try again) for a PostgreSQL connection that was lost or not
    to be had (the server down or restarting, the pool exhausted), else None. Other
    OperationalErrors (a lock or statement timeout, a deadlock) are not about the connection
    and stay what they are: callers catch some of them (retention)."""
    import psycopg
    from psycopg_pool import PoolTimeout

    if isinstance(exc, PoolTimeout):
        return ServiceUnavailable("the database is busy: no connection free", field="store")
    if not isinstance(exc, psycopg.OperationalError):
        return None
    state = exc.sqlstate
    if state is None or state.startswith(_CONNECTION_LOST):
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return ServiceUnavailable(f"the database connection failed: {why}", field="store")
    return None


def pattern_refused(exc: BaseException, field: str) -> BadRequestData | None:
    """A BadRequestData on ``field`` (q or idPattern) for PostgreSQL refusing a regular
    expression, or SQLite's search giving up on one, else None.

    Patterns are held to a subset that PostgreSQL takes (qlang.portable_regex), so this is a
    second line of defence: a refusal the subset did not foresee is still the client's 400.
    """
    import sqlite3

    import psycopg

    from cityward.bank.query.sqlgen import RegexTooCostly, take_regex_timeout

    if isinstance(exc, psycopg.errors.InvalidRegularExpression):
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return BadRequestData(f"the store cannot run the pattern in {field}: {why}", field=field)
    if isinstance(exc, sqlite3.OperationalError) and "user-defined function" in str(exc):
        # SQLite's regexp() gave up on a value (sqlgen.BoundedPattern), on this thread
        pattern = take_regex_timeout()
        if pattern is not None:
            return BadRequestData(f"{field}: {RegexTooCostly(pattern)}", field=field)
    return None


class AlreadyExists(NgsiError):
    name = "AlreadyExists"
    status = 409


class OperationNotSupported(NgsiError):
    name = "OperationNotSupported"
    status = 422


class ResourceNotFound(NgsiError):
    name = "ResourceNotFound"
    status = 404


class InternalError(NgsiError):
    name = "InternalError"
    status = 500


class TooComplexQuery(NgsiError):
    name = "TooComplexQuery"
    status = 403


class TooManyResults(NgsiError):
    name = "TooManyResults"
    status = 403


class LdContextNotAvailable(NgsiError):
    name = "LdContextNotAvailable"
    status = 504


class NonexistentTenant(NgsiError):
    name = "NonexistentTenant"
    status = 404


class NotAcceptable(NgsiError):
    """HTTP 406: the Accept header cannot be satisfied."""

    name = "NotAcceptable"
    status = 406

    @property
    def type_uri(self) -> str:
        return "https://uri.etsi.org/ngsi-ld/errors/NotAcceptable"


class UnsupportedMediaType(NgsiError):
    name = "UnsupportedMediaType"
    status = 415


class LengthRequired(NgsiError):
    name = "LengthRequired"
    status = 411


class PayloadTooLarge(NgsiError):
    name = "PayloadTooLarge"
    status = 413


class MethodNotAllowed(NgsiError):
    name = "MethodNotAllowed"
    status = 405


class Unauthorized(NgsiError):
    """HTTP 401: no credentials, or credentials that do not verify."""

    name = "Unauthorized"
    status = 401
    type_base = CITYWARD_BASE


class Forbidden(NgsiError):
    """HTTP 403: the caller is known but lacks a permission or a purpose."""

    name = "Forbidden"
    status = 403
    type_base = CITYWARD_BASE

    def __init__(self, detail: str, *, field: str | None = None, missing: str = "") -> None:
        super().__init__(detail, field=field)
        self.missing = missing

    def problem(self) -> dict[str, Any]:
        body = super().problem()
        if self.missing:
            body["missingPermission"] = self.missing
        return body


class ServiceUnavailable(NgsiError):
    name = "ServiceUnavailable"
    status = 503
    type_base = CITYWARD_BASE
