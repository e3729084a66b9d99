"""The process supervision the demo and the distributed tests share (``flare_provider.poc.processes``)."""

from __future__ import annotations

import sys
import time

import psutil
import pytest

from flare_provider.poc.processes import ProcessError, Service, run_logged, stop_all, wait_for

# A parent that ignores SIGTERM, with one child in its group and one that made a session of its own.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sleeper = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"]
subprocess.Popen(sleeper)
subprocess.Popen(sleeper, start_new_session=True)
print("started", flush=True)
time.sleep(600)
"""


def test_stop_all_leaves_nothing_of_a_process_tree(tmp_path):
    service = Service("stubborn", [sys.executable, "-c", STUBBORN], {}, tmp_path,
                      ready=lambda s: "started" in s.log_text())
    service.start()
    service.wait_ready(timeout=30)
    tree = service.processes()
    assert len(tree) == 3 and service.runs(tree[-1].pid)
    started = time.monotonic()
    stop_all([service], grace=0.5)
    assert time.monotonic() - started < 15
    assert not service.alive
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_an_exited_service_is_reported_with_its_log(tmp_path):
    service = Service("quits", [sys.executable, "-c", "print('bad config'); raise SystemExit(3)"], {}, tmp_path,
                      ready=lambda s: False)
    service.start()
    with pytest.raises(ProcessError, match=r"(?s)quits exited with 3; see .*quits.log:\nbad config"):
        service.wait_ready(timeout=30)


def test_wait_for_names_what_it_waited_for():
    with pytest.raises(ProcessError, match=r"the answer: not within 0 s\nstill nothing"):
        wait_for("the answer", lambda: None, timeout=0.1, interval=0.01, details=lambda: "still nothing")
    assert wait_for("a value", lambda: 42, timeout=1) == 42


def test_a_failing_command_shows_the_end_of_its_log(tmp_path):
    log = tmp_path / "cmd.log"
    with pytest.raises(ProcessError, match=r"(?s)failed \(exit 2\); see .*cmd.log:\n.*went wrong"):
        run_logged([sys.executable, "-c", "import sys; print('went wrong'); sys.exit(2)"], log, env={}, timeout=30)
    run_logged([sys.executable, "-c", "print('fine')"], log, env={}, timeout=30)
    assert log.read_text().endswith("fine\n")
