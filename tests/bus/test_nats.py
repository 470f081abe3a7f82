"""The synchronous JetStream facade against the real server."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from cityward.bus.nats import BusError, BusUnavailable, JetStream
from cityward.bus.settings import BusSettings


def _give_up(connect_timeout_s: float) -> tuple[float, str]:
    """connect() to a port nobody listens on: (seconds until it raised, its message)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"nats://127.0.0.1:{port}"
    js = JetStream(url, connect_timeout_s=connect_timeout_s)
    started = time.monotonic()
    try:
        with pytest.raises(BusUnavailable, match=url) as info:
            js.connect()
    finally:
        js.close()
    return time.monotonic() - started, str(info.value)


def test_unreachable_server_is_named_after_the_timeout() -> None:
    short, said = _give_up(0.5)
    long, _ = _give_up(3.0)
    assert "unreachable after 0.5 s" in said, said
    # connect() gives up when its own timeout says, neither after a fixed time nor at the
    # first failure: six times the timeout takes several times as long (two durations of one
    # run, the overrun of an attempt, about 0.5 s, included; equal when the timeout is unused)
    assert long > 2 * short, f"gave up after {short:.2f} s (timeout 0.5) and {long:.2f} s (3.0)"


def test_publish_is_acked_and_deduplicated_by_msg_id(
    js: JetStream, bus_settings: BusSettings
) -> None:
    subject = bus_settings.changes_subject + ".a"
    first = js.publish(subject, b"one", msg_id="m-1")
    assert js.publish(subject, b"one again", msg_id="m-1") == first  # the repeat is dropped
    second = js.publish(subject, b"two")
    assert second == first + 1
    assert js.publish_many([(subject, b"three", "m-3"), (subject, b"x", "m-1")]) == [
        second + 1,
        first,
    ]
    assert js.stream_messages(bus_settings.changes_stream) == 3
    with pytest.raises(BusError, match=r"nowhere\.x"):
        js.publish_many([("nowhere.x", b"lost", None)], timeout=1)


def test_pull_ack_nak_and_ordered(js: JetStream, bus_settings: BusSettings) -> None:
    stream, prefix = bus_settings.changes_stream, bus_settings.changes_subject
    ordered = js.subscribe_ordered(stream, prefix + ".>", deliver="all")
    js.publish_many([(f"{prefix}.t{i % 2}", str(i).encode(), None) for i in range(10)])

    got = js.pull(stream, "workers", prefix + ".>", batch=4, timeout=2)
    assert [m.data for m in got] == [b"0", b"1", b"2", b"3"]
    assert got[1].subject == prefix + ".t1" and got[0].delivered == 1
    got[0].ack()
    got[1].in_progress()
    got[1].ack(confirm=True)
    got[2].nak()  # again at once
    got[3].nak(delay=30)  # not within this test
    js.ack_all([])
    again = js.pull(stream, "workers", prefix + ".>", batch=10, timeout=2)
    # the nak'd message comes again, its second delivery; not necessarily first: the server
    # takes the nak and the next pull request on different paths (a loaded CI machine got 4
    # before 2)
    by_data = {m.data: m for m in again}
    assert set(by_data) == {b"2", b"4", b"5", b"6", b"7", b"8", b"9"}
    assert by_data[b"2"].delivered == 2 and by_data[b"4"].delivered == 1
    js.ack_all(again)
    assert js.pull(stream, "workers", prefix + ".>", batch=10, timeout=0.3) == []

    seen: list[bytes] = []
    deadline = time.monotonic() + 5
    while len(seen) < 10 and time.monotonic() < deadline:
        seen.extend(m.data for m in ordered.fetch(100, timeout=0.5))
    assert seen == [str(i).encode() for i in range(10)]
    ordered.close()
    assert js.delete_consumer(stream, "workers")


def test_a_durable_consumer_with_another_filter_is_an_error_naming_both(
    js: JetStream, bus_settings: BusSettings
) -> None:
    """A durable made with one filter kept it when a restart asked for another (a changed
    changes_subject): the follower received nothing at all, and nothing said why. (NATS 2.9
    takes a new filter on a durable and delivers nothing after it, measured: no update.)"""
    stream, prefix = bus_settings.changes_stream, bus_settings.changes_subject
    js.ensure_consumer(stream, "moved", prefix + ".t0")
    again = JetStream(bus_settings.nats_url, name="cityward-test-restart")
    again.connect()
    try:
        with pytest.raises(BusError, match=rf"filters {prefix}\.t0, and the configuration asks"):
            again.ensure_consumer(stream, "moved", prefix + ".>")
        again.ensure_consumer(stream, "moved", prefix + ".t0")  # the same filter: fine
    finally:
        again.close()


def test_serve_says_in_one_line_when_nats_is_away_or_has_no_jetstream(tmp_path: Path) -> None:
    """`cityward serve` in NATS mode printed a 35-frame traceback from the application's start
    (exit code 3) when NATS was unreachable, and a server without JetStream was reported as
    "ServiceUnavailableError: code=None"."""
    import shutil
    import subprocess

    from typer.testing import CliRunner

    from cityward.cli import app as cli_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "cityward.toml"
    server = shutil.which("nats-server")
    assert server is not None, "nats-server is needed (the CI installs it)"
    for js_enabled in (False, True):
        config.write_text(
            f'[bus]\nkind = "nats"\nnats_url = "nats://127.0.0.1:{port}"\nconnect_timeout_s = 1\n'
        )
        proc = None
        if js_enabled:  # a server, but without -js
            proc = subprocess.Popen(
                [server, "-a", "127.0.0.1", "-p", str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
        try:
            r = CliRunner().invoke(
                cli_app, ["serve", "--config", str(config), "--data-dir", str(tmp_path / "d")]
            )
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait()
        flat = " ".join(r.output.split())
        assert r.exit_code == 1 and "Traceback" not in flat, r.output
        said = "has no JetStream" if js_enabled else f"nats://127.0.0.1:{port}"
        assert said in flat, r.output
