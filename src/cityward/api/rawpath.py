"""Route entity paths on the raw request path, so that ``%2F`` stays inside its segment.

An ASGI server hands the app the decoded path: ``.../attrs/https%3A%2F%2Fex.org%2Fspeed``
arrives as ``.../attrs/https://ex.org/speed``, and the attribute IRI's slashes split the path
before the router sees it (NGSI-LD lets a client name an attribute by its short name or its
percent-encoded IRI). Under ``/entities/`` and ``/temporal/entities/`` the path is rebuilt from
``scope["raw_path"]`` instead: each segment decoded, then ``%`` and ``/`` encoded again, so a
segment stays one segment. The routes there take their parameters through the two convertors
below, which decode those two escapes and nothing else.

Elsewhere the path is left as the server decoded it: /attributes/{attr:path}, /types/{type:path}
and /subscriptions/{id:path} take the whole rest of the path anyway.
"""

from __future__ import annotations

from typing import ClassVar
from urllib.parse import unquote, unquote_to_bytes

from starlette.convertors import Convertor, register_url_convertor
from starlette.types import ASGIApp, Receive, Scope, Send

#: the paths routed on their raw form; each route under them must use the convertors below
RAW_PREFIXES = ("/ngsi-ld/v1/entities/", "/ngsi-ld/v1/temporal/entities/")


def escape_segment(text: str) -> str:
    """A decoded segment with its ``%`` and ``/`` encoded again: one segment still.

    >>> escape_segment("https://ex.org/max%20speed")
    'https:%2F%2Fex.org%2Fmax%2520speed'
    """
    return text.replace("%", "%25").replace("/", "%2F")


def unescape(text: str) -> str:
    """What ``escape_segment`` encoded, decoded: the only escapes in a rebuilt path.

    >>> unescape("https:%2F%2Fex.org%2Fmax%2520speed")
    'https://ex.org/max%20speed'
    """
    return unquote(text)


def escaped_path(scope: Scope) -> str:
    """The request path with ``%`` and ``/`` inside a segment encoded (see the module doc).

    Segments decode as the server decodes a path (UTF-8, a bad sequence as U+FFFD). Without a
    ``raw_path`` (an ASGI server need not give one) the slashes are lost already: the decoded
    path, with only ``%`` encoded, so that the convertors still read it right.
    """
    raw = scope.get("raw_path")
    if not isinstance(raw, bytes):
        return str(scope["path"]).replace("%", "%25")
    raw = raw.split(b"?", 1)[0]  # some clients' transports leave the query in it
    return "/".join(
        escape_segment(unquote_to_bytes(part).decode("utf-8", "replace"))
        for part in raw.split(b"/")
    )


class EscapedPath(Convertor[str]):
    """``{name:escaped_path}``: the rest of the path, ``/`` included, as sent."""

    regex: ClassVar[str] = ".*"

    def convert(self, value: str) -> str:
        return unescape(value)

    def to_string(self, value: str) -> str:
        return escape_segment(value)


class EscapedSegment(Convertor[str]):
    """``{name:escaped_segment}``: one segment, which may hold an encoded ``/`` (an IRI)."""

    regex: ClassVar[str] = "[^/]+"

    def convert(self, value: str) -> str:
        return unescape(value)

    def to_string(self, value: str) -> str:
        assert value, "Must not be empty"
        return escape_segment(value)


register_url_convertor("escaped_path", EscapedPath())
register_url_convertor("escaped_segment", EscapedSegment())


def _route_path(scope: Scope) -> str:
    """The path below the app's root_path (what the router matches)."""
    path = str(scope["path"])
    root = str(scope.get("root_path", ""))
    return path[len(root) :] if root and path.startswith(root + "/") else path


class RawPathMiddleware:
    """Hand the routes under RAW_PREFIXES the path rebuilt from the raw one (module doc).

    Outermost, so that the governance middleware sees the same path: its audit record then
    names an entity id with a ``/`` whole.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _route_path(scope).startswith(RAW_PREFIXES):
            scope = {**scope, "path": escaped_path(scope)}
        await self.app(scope, receive, send)
