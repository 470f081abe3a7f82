"""The real ``cityward`` command, run as a process of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def run_cityward(args: list[str], cwd: Path, **env: str) -> tuple[int, str]:
    """Exit status and output (stdout then stderr) of the real command, in a session of its
    own (ended whole on a hang: serve's workers too), with no CITYWARD_* setting of the
    caller's environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CITYWARD_")}
    clean["COLUMNS"] = "1000"  # one message, one line: rich wraps at 80 columns otherwise
    proc = subprocess.Popen(
        [sys.executable, "-m", "cityward.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**clean, **env},
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"cityward {' '.join(args)} still ran after 60 s:\n{out}{err}")
    return proc.returncode, out + err
