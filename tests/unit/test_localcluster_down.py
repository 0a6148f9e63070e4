"""`localcluster.down` returns only when every process it started, and their children, is gone.

Real processes, no control plane: stand-ins that ignore SIGTERM or fork a child of their own,
started through the same ``_spawn`` that ``up`` uses.
"""

from __future__ import annotations

import sys
import time

import pytest

import localcluster

# Ignores SIGTERM and leaves a grandchild in its process group, as a stubborn server might.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(600)
"""
# Exits on SIGTERM, but only after a while, and says so in a file; says when it is listening.
SLOW_TO_STOP = """
import signal, sys, time
def stop(*_):
    time.sleep(1.5)
    open(sys.argv[1] + ".stopped", "w").write("after 1.5 s")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(sys.argv[1], "w").write("ready")
time.sleep(600)
"""


def running(pid: int) -> bool:
    stat = localcluster._proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def wait_for_file(path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise TimeoutError(path)


def test_down_kills_what_ignores_sigterm_and_its_children(tmp_path):
    child_pid_file = tmp_path / "child.pid"
    stubborn = localcluster._spawn(tmp_path, "stubborn", [sys.executable, "-c", STUBBORN,
                                                          str(child_pid_file)])
    slow_ready = tmp_path / "slow.ready"
    slow = localcluster._spawn(tmp_path, "slow", [sys.executable, "-c", SLOW_TO_STOP,
                                                  str(slow_ready)])
    grandchild = int(wait_for_file(child_pid_file))
    wait_for_file(slow_ready)  # its handler is installed
    assert running(stubborn.pid) and running(slow.pid) and running(grandchild)

    localcluster.down(tmp_path, grace=4, kill_wait=10)

    assert not running(stubborn.pid)
    assert not running(slow.pid)
    assert not running(grandchild)  # not our child: only the process-group wait sees it
    assert not (tmp_path / "pids").exists()
    # It waited for the slow one to finish its handler rather than killing it at once.
    assert (tmp_path / "slow.ready.stopped").read_text() == "after 1.5 s"


def test_down_refuses_to_call_a_stuck_process_gone(tmp_path, monkeypatch):
    proc = localcluster._spawn(tmp_path, "sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        # As if SIGKILL never took effect (a process in uninterruptible sleep): signals go
        # nowhere, so the process stays and down must say so instead of returning.
        monkeypatch.setattr(localcluster.os, "killpg", lambda pid, sig: None)
        with pytest.raises(RuntimeError, match=r"sleeper \(\d+\)"):
            localcluster.down(tmp_path, grace=0.3, kill_wait=0.3)
        assert (tmp_path / "pids").exists()  # still known, so a second down can finish it
    finally:
        proc.kill()
        proc.wait(10)


def test_a_reused_pid_is_not_taken_for_ours(tmp_path):
    proc = localcluster._spawn(tmp_path, "sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        line = (tmp_path / "pids").read_text().split()
        ours = localcluster._Started.parse(" ".join(line))
        # Same pid, another start time: how a pid handed to a new process looks.
        someone_elses = localcluster._Started(ours.pid, ours.name, ours.start_ticks + 1)
        assert ours.running()
        assert not someone_elses.running()
    finally:
        proc.kill()
        proc.wait(10)
