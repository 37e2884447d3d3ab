"""server.reaper: what a launcher started is stopped when the launcher is SIGKILLed.

A kill -9 of ``python -m server.simulation`` left flwr-simulation and Ray running the
federation to its last round (every site's budget spent) and Ray's agents alive after it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.launch import _alive

ROOT = Path(__file__).resolve().parents[2]

# A root that starts a grandchild in a session of its own (as the SuperLink starts
# flwr-simulation), prints the grandchild's pid, and both sleep.
TREE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(120)
"""


def _wait_gone(pids, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return not any(_alive(p) for p in pids)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the reaper reads /proc")
def test_a_sigkilled_launcher_leaves_nothing_running():
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    root = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True, start_new_session=True)
    grandchild = int(root.stdout.readline())
    reaper = subprocess.Popen([sys.executable, "-m", "server.reaper", str(launcher.pid), str(root.pid)], cwd=ROOT,
                              start_new_session=True)
    try:
        time.sleep(1.5)  # it notes the tree twice a second
        assert _alive(root.pid) and _alive(grandchild)  # nothing is touched while the launcher lives
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        assert _wait_gone([root.pid, grandchild], 15), "the launcher's processes outlived it"
        assert reaper.wait(timeout=15) == 0
    finally:
        for proc in (launcher, root, reaper):
            if proc.poll() is None:
                proc.kill()
        if _alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)
        root.wait()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the reaper reads /proc")
def test_a_launcher_that_ends_normally_stops_the_reaper_first():
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    root = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    reaper = subprocess.Popen([sys.executable, "-m", "server.reaper", str(launcher.pid), str(root.pid)], cwd=ROOT,
                              start_new_session=True)
    try:
        time.sleep(1.0)
        reaper.terminate()
        reaper.wait(timeout=10)
        launcher.kill()
        launcher.wait()
        time.sleep(1.0)
        assert _alive(root.pid)  # stopped before the launcher ended: it signals nothing
    finally:
        for proc in (launcher, root, reaper):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
