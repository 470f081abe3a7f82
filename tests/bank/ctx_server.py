"""A small @context server on 127.0.0.1 for the tests of remote context fetching."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import orjson


@dataclass
class CtxServer:
    """``/ctx/NAME``: a context defining NAME; ``/redirect?to=URL``: a 302 to URL;
    ``/pad/NAME?kb=N``: a context of about N KiB; ``/slow/NAME``: a context sent once
    ``release`` is set (or after ``delay`` seconds when it is set to a number)."""

    base: str = ""
    paths: list[str] = field(default_factory=list)  # every path asked for, in order
    release: threading.Event = field(default_factory=threading.Event)
    delay: float | None = None
    slow_wait: float = 30.0  # the longest a /slow answer waits for ``release``
    served_slow: threading.Event = field(default_factory=threading.Event)


def _body(name: str, pad_kb: int = 0) -> bytes:
    ctx: dict[str, str] = {name: f"https://example.org/{name}"}
    for i in range(pad_kb * 16):
        ctx[f"pad{i:06d}"] = "https://example.org/" + "p" * 32
    return orjson.dumps({"@context": ctx})


@contextmanager
def ctx_server() -> Iterator[CtxServer]:
    state = CtxServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.paths.append(self.path)
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            kind, _, name = parts.path.strip("/").partition("/")
            if kind == "redirect":
                self.send_response(302)
                self.send_header("Location", query["to"][0])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if kind == "slow":
                if state.delay is not None:
                    time.sleep(state.delay)
                else:
                    state.release.wait(state.slow_wait)
                state.served_slow.set()
            pad = int(query.get("kb", ["0"])[0]) if kind == "pad" else 0
            if kind not in ("ctx", "slow", "pad"):
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = _body(name, pad)
            self.send_response(200)
            self.send_header("Content-Type", "application/ld+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
