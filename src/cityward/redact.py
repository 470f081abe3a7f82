"""URLs as logs, errors and status may show them: credentials masked.

A camera URL (``rtsp://user:password@host/...``) or a database URL
(``postgresql://user:password@host/db``, ``?password=``) often carries a secret. Everything
that prints one goes through :func:`redact_url` (or :func:`redact` for a message that may
hold URLs): one rule for the whole project, so a new caller cannot forget half of it.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

#: query parameters whose values are secrets: ``password=``, ``pwd=``, ``token=``,
#: ``access_token=``, ``api_key=``, ``auth=``, ``signature=``, ``sslpassword=``...
_SECRET_PARAM = re.compile(r"pass|pwd|token|secret|key|auth|sig|cred|session", re.I)
#: query parameters that name an account (``user=``, ``login=``): masked unless ``keep_user``
_ACCOUNT_PARAM = re.compile(r"user|login", re.I)
#: a password given as a parameter: ``?password=...`` in a URL, ``password=...`` or
#: ``password='...'`` in a key=value connection string
_PASSWORD_PARAM = re.compile(r"(?:^|[?&;\s])(?:password|sslpassword)\s*=\s*'?([^&;#\s']*)", re.I)
#: a URL inside free text: a scheme, ``://``, then anything up to white space or a quote
_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str, *, keep_user: bool = False) -> str:
    """``url`` with its password masked, and the values of query parameters that look secret.

    Everything before the URL's last ``@`` counts as credentials, even where a password holds
    an unencoded ``/`` or ``?``: a log line that hides too much costs less than one that
    shows a password. ``keep_user``: the user name stays (``user:***@``, ``user=`` shown),
    for a URL whose account helps the reader (a database's role); otherwise it is masked too.
    A file path is returned as it is.

    >>> redact_url("rtsp://admin:S3cret@10.0.4.17:554/stream1?channel=1&password=x")
    'rtsp://***@10.0.4.17:554/stream1?channel=1&password=***'
    >>> redact_url("postgresql://u:s3cret@h/db?user=u&password=x", keep_user=True)
    'postgresql://u:***@h/db?user=u&password=***'
    >>> redact_url("/srv/videos/street.mp4")
    '/srv/videos/street.mp4'
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    if "@" in rest:
        userinfo, host = rest.rsplit("@", 1)
        if not keep_user:
            rest = f"***@{host}"
        elif ":" in userinfo:
            rest = f"{userinfo.split(':', 1)[0]}:***@{host}"
    path, q, query = rest.partition("?")
    if q:

        def mask(m: re.Match[str]) -> str:
            name = m[2]
            hidden = _SECRET_PARAM.search(name) or (not keep_user and _ACCOUNT_PARAM.search(name))
            return f"{m[1]}{name}=***" if hidden else m[0]

        query = re.sub(r"(^|[&;])([^=&;#]*)=([^&;#]*)", mask, query)
    return f"{scheme}://{path}{q}{query}"


def redact(text: str) -> str:
    """``text`` (an error message) with :func:`redact_url` applied to every URL in it.

    >>> redact("cannot open 'rtsp://admin:S3cret@10.0.4.17/stream1': timed out")
    "cannot open 'rtsp://***@10.0.4.17/stream1': timed out"
    """
    return _URL_IN_TEXT.sub(lambda m: redact_url(m[0]), text)


def _passwords_of(url: str) -> list[str]:
    """The password of ``url`` (``user:password@``, ``?password=``; ``password=`` of a
    key=value connection string), as written and decoded, longest first."""
    _, sep, rest = url.partition("://")
    if not sep:
        rest = url
    found = []
    if sep and "@" in rest:
        userinfo = rest.rsplit("@", 1)[0]
        if ":" in userinfo:
            found.append(userinfo.split(":", 1)[1])
    found += _PASSWORD_PARAM.findall(rest)
    return sorted({v for s in found for v in (s, unquote(s)) if v}, key=len, reverse=True)


def redact_quoting(url: str, text: str, *, keep_user: bool = False) -> str:
    """``text``, a message about ``url`` that may quote it or pieces of it, with ``url`` shown
    as :func:`redact_url` shows it and any piece of its password masked: a parser quotes what
    it could not read (libpq: "unexpected spaces found in "p w"", the whole URI for a bad
    IPv6 host), password included.

    >>> redact_quoting("postgresql://u:p w@h/db", 'unexpected spaces found in "p w"')
    'unexpected spaces found in "***"'
    """
    text = text.replace(url, redact_url(url, keep_user=keep_user))
    for secret in _passwords_of(url):
        text = text.replace(secret, "***")
    return text
