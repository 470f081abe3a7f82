"""Roles, permissions and the one table that maps every route to the permission it needs.

The permission matrix below is the single source of truth: the middleware enforces it, the
tests walk it (every route x every role) and docs/governance.md prints it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    PUBLIC = "public"
    DEVICE = "device"
    OPERATOR = "operator"
    ANALYST = "analyst"
    AUDITOR = "auditor"
    ADMIN = "admin"


class Permission(StrEnum):
    REGISTER_READ = "register:read"  # the public register
    DATA_READ = "data:read"  # entities, types, attributes (purpose-bound)
    DATA_WRITE = "data:write"  # create / update entities (purpose-bound; devices: own only)
    DATA_DELETE = "data:delete"  # delete entities and attributes (purpose-bound)
    HISTORY_READ = "history:read"  # temporal retrieval and queries: an export (purpose-bound)
    HISTORY_WRITE = "history:write"  # temporal create / append / delete (purpose-bound)
    SUBSCRIPTIONS = "subscriptions:manage"  # own subscriptions; notifications purpose-bound
    CONTEXTS_READ = "contexts:read"
    CONTEXTS_WRITE = "contexts:write"
    AUDIT_READ = "audit:read"
    POLICY_READ = "policy:read"  # sources, permission matrix, DPIA draft
    IDENTITY_ADMIN = "identity:admin"  # tokens and device keys
    SELF = "self"  # who am I


P = Permission
MATRIX: dict[Role, frozenset[Permission]] = {
    Role.PUBLIC: frozenset({P.REGISTER_READ}),
    Role.DEVICE: frozenset({P.REGISTER_READ, P.SELF, P.DATA_WRITE, P.CONTEXTS_READ}),
    Role.OPERATOR: frozenset(
        {
            P.REGISTER_READ,
            P.SELF,
            P.DATA_READ,
            P.DATA_WRITE,
            P.DATA_DELETE,
            P.HISTORY_READ,
            P.SUBSCRIPTIONS,
            P.CONTEXTS_READ,
            P.CONTEXTS_WRITE,
        }
    ),
    Role.ANALYST: frozenset(
        {P.REGISTER_READ, P.SELF, P.DATA_READ, P.HISTORY_READ, P.SUBSCRIPTIONS, P.CONTEXTS_READ}
    ),
    Role.AUDITOR: frozenset({P.REGISTER_READ, P.SELF, P.AUDIT_READ, P.POLICY_READ}),
    Role.ADMIN: frozenset(Permission),
}

ROLE_HELP = {
    Role.PUBLIC: "anyone without a token: the public register only",
    Role.DEVICE: "a sensor or gateway: writes its own entities, nothing else",
    Role.OPERATOR: "control-room staff: read and act on live data of their purposes",
    Role.ANALYST: "reads live data and history of their purposes; writes nothing",
    Role.AUDITOR: "data-protection officer: reads the audit trail and the policy, no city data",
    Role.ADMIN: "configures cityward: tokens, device keys, contexts; all purposes",
}


@dataclass(frozen=True, slots=True)
class Route:
    methods: frozenset[str]
    pattern: re.Pattern[str]
    permission: Permission
    audit: str  # the audit action class: read, write, export, config, stream, none


def _r(methods: str, path: str, permission: Permission, audit: str) -> Route:
    return Route(frozenset(methods.split()), re.compile(path + r"/?$"), permission, audit)


NGSI = r"/ngsi-ld/v1"
# First match wins; a path that matches no route needs ADMIN (nothing is open by accident).
ROUTES: tuple[Route, ...] = (
    _r("GET HEAD", r"/register(\.json)?", P.REGISTER_READ, "none"),
    _r("GET HEAD", r"/(healthz)", P.REGISTER_READ, "none"),
    _r("GET", r"/cityward/v1/whoami", P.SELF, "none"),
    _r("GET", r"/cityward/v1/audit(/verify)?", P.AUDIT_READ, "read"),
    _r("GET", r"/cityward/v1/(policy|sources|dpia)", P.POLICY_READ, "none"),
    _r(
        "POST GET DELETE", r"/cityward/v1/(tokens|device-keys)(/[^/]+)?", P.IDENTITY_ADMIN, "config"
    ),
    # the API description of open-source software is no secret
    _r("GET HEAD", r"/(docs|openapi\.json|docs/oauth2-redirect)", P.REGISTER_READ, "none"),
    # the dashboard's page and files: public (the page holds no data; a visitor without a
    # token sees the login and the public register)
    _r("GET HEAD", r"/(ui/[A-Za-z0-9._-]+)?", P.REGISTER_READ, "none"),
    # the dashboard's live stream: audited when it opens (what it carries is not known yet)
    _r("GET", r"/dashboard/v1/events", P.DATA_READ, "stream"),
    # device pushes (the ingest http adapter): writes of the device's own entities
    _r("POST", r"/ingest/[A-Za-z0-9_-]+", P.DATA_WRITE, "write"),
    # temporal: reads are exports of history
    # ids are URIs and may hold '/' (the routes take them as paths): `.+`, not `[^/]+`, or
    # such an id fell through to the admin-only fallback, and an admin's export of it went
    # unaudited
    _r("GET", NGSI + r"/temporal/entities(/.+)?", P.HISTORY_READ, "export"),
    _r("POST", NGSI + r"/temporal/entityOperations/query", P.HISTORY_READ, "export"),
    _r("POST PATCH", NGSI + r"/temporal/entities(/.*)?", P.HISTORY_WRITE, "write"),
    _r("DELETE", NGSI + r"/temporal/entities(/.*)?", P.HISTORY_WRITE, "write"),
    # subscriptions
    _r("GET POST PATCH DELETE", NGSI + r"/subscriptions(/.+)?", P.SUBSCRIPTIONS, "config"),
    # contexts
    _r("GET", NGSI + r"/jsonldContexts(/.*)?", P.CONTEXTS_READ, "none"),
    _r("POST DELETE", NGSI + r"/jsonldContexts(/.*)?", P.CONTEXTS_WRITE, "config"),
    # entities
    _r("GET", NGSI + r"/(entities|types|attributes)(/.*)?", P.DATA_READ, "read"),
    _r("POST", NGSI + r"/entityOperations/query", P.DATA_READ, "read"),
    _r("DELETE", NGSI + r"/entities/.+", P.DATA_DELETE, "write"),  # an entity or attribute
    _r("POST", NGSI + r"/entityOperations/delete", P.DATA_DELETE, "write"),
    _r("POST PATCH PUT", NGSI + r"/(entities|entityOperations)(/.*)?", P.DATA_WRITE, "write"),
)
FALLBACK = Route(frozenset(), re.compile(""), P.IDENTITY_ADMIN, "config")


def route_for(method: str, path: str) -> Route:
    """The route entry of a request (FALLBACK, admin only, when none matches)."""
    m = "GET" if method == "HEAD" else method
    for route in ROUTES:
        if (m in route.methods or method in route.methods) and route.pattern.match(path):
            return route
    return FALLBACK


def allowed(role: Role, permission: Permission) -> bool:
    return permission in MATRIX[role]


def matrix_markdown() -> str:
    """The permission matrix as a Markdown table (docs, DPIA, closing notes)."""
    roles = list(Role)
    lines = [
        "| permission | " + " | ".join(r.value for r in roles) + " |",
        "|---" * (len(roles) + 1) + "|",
    ]
    for perm in Permission:
        cells = ["yes" if perm in MATRIX[r] else "-" for r in roles]
        lines.append(f"| `{perm.value}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
