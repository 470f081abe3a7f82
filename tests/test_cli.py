"""The ``cityward`` command line: serve answers the API with no configuration; demo seeds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cityward.bank.store.sqlite import SqliteStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_answers_on_sqlite_with_no_configuration(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYWARD_")}
    env["CITYWARD_DATA_DIR"] = str(tmp_path / "from-env")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cityward.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}/ngsi-ld/v1"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/types", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                assert time.monotonic() < deadline, "cityward serve did not answer in 60 s"
                time.sleep(0.2)
        # closed by default: no token, no data; the public register needs none
        r = httpx.get(f"{base}/types", timeout=10)
        assert r.status_code == 401, r.text
        assert r.json()["field"] == "Authorization"
        assert httpx.get(f"http://127.0.0.1:{port}/register", timeout=10).status_code == 200
        # the first start wrote an admin token, and said where
        token_file = tmp_path / "from-env" / "governance" / "admin.token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        auth = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
        entity = {"id": "urn:ngsi-ld:Sensor:s1", "type": "Sensor", "level": 3}
        r = httpx.post(f"{base}/entities", json=entity, timeout=10, headers=auth)
        assert r.status_code == 201, r.text
        r = httpx.get(
            f"{base}/entities", params={"type": "Sensor", "options": "keyValues"}, headers=auth
        )
        assert r.json() == [entity]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert str(token_file.resolve()) in output.replace("\n", ""), output
    # the data went where CITYWARD_DATA_DIR said, and survives the restart
    store = SqliteStore(tmp_path / "from-env" / "cityward.db")
    try:
        assert store.get("", "urn:ngsi-ld:Sensor:s1") is not None
    finally:
        store.close()


def test_demo_seeds_the_city_once(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "cityward.cli", "demo", "--data-dir", str(tmp_path), "--seed-only"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    assert "new entities" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    assert "0 new entities" in second.stdout, second.stdout
    store = SqliteStore(tmp_path / "cityward.db")
    try:
        n = store._select("SELECT count(*) FROM entities", [])[0][0]
        assert n == int(first.stdout.split("new entities")[0].split()[-1])
    finally:
        store.close()


def test_a_bad_configuration_file_is_a_usage_error_naming_the_setting(tmp_path: Path) -> None:
    """`serve`, `dpia` and the bank commands printed a traceback for a mistyped key, a wrong
    type or a file that is not TOML."""
    from typer.testing import CliRunner

    from cityward.cli import app as cli_app

    cases = {
        "unknown.toml": ("max_limt = 10\n", "max_limt: Extra inputs are not permitted"),
        "wrongtype.toml": ('max_limit = "many"\n', "max_limit: Input should be a valid integer"),
        "broken.toml": ("max_limit = \n", "not valid TOML"),
    }
    for name, (text, says) in cases.items():
        config = tmp_path / name
        config.write_text(text)
        for command in (["serve"], ["dpia", "--out", str(tmp_path / "dpia")]):
            r = CliRunner().invoke(cli_app, [*command, "--config", str(config)])
            flat = " ".join(r.output.split())
            assert r.exit_code == 2, (name, command, r.output)
            assert says in flat and "Traceback" not in flat, (name, command, r.output)


def test_demo_refuses_a_port_another_program_holds(tmp_path: Path) -> None:
    """The demo built its city and started its traffic feed before its server found the port
    taken: the feed sent the 7-day operator token to whatever program held the port."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cmd = [sys.executable, "-m", "cityward.cli", "demo", "--no-browser", "--port", str(port)]
        r = subprocess.run(
            [*cmd, "--data-dir", str(tmp_path / "demo")],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "COLUMNS": "80"},
        )
        held.setblocking(False)
        try:
            held.accept()[0].close()
            reached = True
        except BlockingIOError:
            reached = False
    output = r.stdout + r.stderr
    assert r.returncode != 0, output
    assert output.strip().splitlines() == [
        f"--port {port}: Address already in use; choose another port"
    ], output
    assert not reached, "the demo connected to the program on its port"
    # nothing made before the port was known to be ours: no token, no database
    assert not (tmp_path / "demo").exists(), output


def _cityward(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``cityward ARGS`` as the installed command runs it (cityward.cli:main)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYWARD_")}
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "cityward.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bad_values_are_usage_errors_naming_the_option(tmp_path: Path) -> None:
    """Each of these was a traceback, or a token expired at birth (-1) or that never expires
    in effect (1e300)."""
    token = ["token", "create", "--role", "operator", "--purpose", "traffic-management"]
    cases = [
        ([*token, "--ttl-days", "-1"], "--ttl-days"),
        ([*token, "--ttl-days", "nan"], "--ttl-days"),
        ([*token, "--ttl-days", "inf"], "--ttl-days"),
        ([*token, "--ttl-days", "1e300"], "--ttl-days"),
        (["serve", "--port", "99999"], "--port"),
        (["serve", "--log-level", "bogus"], "--log-level"),
        (["device-key", "create", "--device", "d", "--pattern", "("], "--pattern"),
    ]
    for args, option in cases:
        proc = _cityward([*args, "--data-dir", str(tmp_path / "d")], tmp_path)
        said = proc.stdout + proc.stderr
        assert proc.returncode == 2 and option in said, (args, said)
        assert "Traceback" not in said, (args, said)


def test_what_the_machine_refuses_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """A data folder that is a file (or read-only) ended every command in a traceback."""
    afile = tmp_path / "afile"
    afile.write_text("")
    token = ["token", "create", "--role", "operator", "--purpose", "traffic-management"]
    for args in (token, ["dpia", "--out", str(afile / "x")], ["serve", "--port", "1"]):
        proc = _cityward([*args, "--data-dir", str(afile)], tmp_path)
        said = proc.stdout + proc.stderr
        assert proc.returncode == 1, (args, said)
        assert "Traceback" not in said and str(afile) in said, (args, said)
        assert said.strip().splitlines()[-1].startswith("cityward: "), (args, said)
