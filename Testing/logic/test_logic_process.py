"""Child processes: JSON progress parsed, output decoded safely, cancel ends the whole tree."""
import os
import sys
import time

import pytest
from logic_helpers import HELPERS

from VeloxSegLogic.process import ProcessRunner, parse_progress_line

CHILD = os.path.join(HELPERS, "progress_child.py")


class Recorder:
    def __init__(self):
        self.progress, self.logs, self.finished = [], [], []

    def runner(self, *args):
        return ProcessRunner([sys.executable, CHILD, *args], on_progress=self.progress.append,
                             on_log=self.logs.append, on_finished=lambda code, msg: self.finished.append((code, msg)))


def test_progress_lines_become_records_and_other_lines_logs():
    rec = Recorder()
    assert rec.runner("ok").start().wait(timeout=60) == 0
    assert [p["fraction"] for p in rec.progress] == [0.25, 0.5, 0.75, 1.0]
    assert rec.progress[-1]["stage"] == "done"
    assert any("bad bytes" in line and "\ufffd" in line and "é" in line for line in rec.logs)
    assert rec.finished == [(0, "")]


def test_failure_reports_the_last_stderr_line():
    rec = Recorder()
    runner = rec.runner("fail").start()
    assert runner.wait(timeout=60) == 3
    assert rec.finished == [(3, "veloxseg predict: error: input image is empty")]


def test_parse_progress_line_ignores_non_objects():
    assert parse_progress_line('{"stage": "done", "fraction": 1.0}') == {"stage": "done", "fraction": 1.0}
    assert parse_progress_line("[1, 2]") is None
    assert parse_progress_line("{not json}") is None
    assert parse_progress_line("plain text") is None


def _alive(pid):
    try:
        import psutil

        return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except ImportError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    except Exception:
        return False


@pytest.mark.parametrize("use_psutil", [True, False])
def test_cancel_ends_child_and_grandchild(tmp_path, monkeypatch, use_psutil):
    if not use_psutil:
        if os.name == "nt":
            pytest.skip("process-group fallback is POSIX only")
        monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError
    pidfile = tmp_path / "pids"
    rec = Recorder()
    runner = rec.runner("hang", str(pidfile)).start()
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        runner.poll()
        time.sleep(0.05)
    child, grandchild = (int(x) for x in pidfile.read_text().split())
    assert _alive(child) and _alive(grandchild)
    runner.cancel(timeout=5)
    runner.wait(timeout=30)
    monkeypatch.undo()
    deadline = time.monotonic() + 10
    while (_alive(child) or _alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child) and not _alive(grandchild)
    assert runner.cancelled and rec.finished and rec.finished[0][0] != 0
    assert rec.finished[0][1] == "cancelled"
    assert any(p.get("stage") == "waiting" for p in rec.progress)


def _hanging(tmp_path, on_progress=None):
    pidfile = tmp_path / "pids"
    finished = []
    runner = ProcessRunner([sys.executable, CHILD, "hang", str(pidfile)], on_progress=on_progress,
                           on_finished=lambda code, msg: finished.append((code, msg)))
    return runner, pidfile, finished


def _pids(pidfile):
    return [int(x) for x in pidfile.read_text().split()]


def _gone(pids, seconds=10):
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(_alive(p) for p in pids)


def test_an_interrupted_wait_ends_the_child_tree_and_still_reports_the_end(tmp_path):
    """Ctrl-C in a headless batch run: the child runs in its own session, so wait() must end it."""
    def interrupt(record):
        if record.get("stage") == "waiting":  # the child and grandchild are up, their PIDs written
            raise KeyboardInterrupt

    runner, pidfile, finished = _hanging(tmp_path, on_progress=interrupt)
    runner.start()
    with pytest.raises(KeyboardInterrupt):
        runner.wait(timeout=60)
    assert _gone(_pids(pidfile))
    assert runner.cancelled and finished == [(finished[0][0], "cancelled")] and finished[0][0] != 0
    assert not runner.running


def test_a_timed_out_wait_ends_the_child_tree_and_still_reports_the_end(tmp_path):
    runner, pidfile, finished = _hanging(tmp_path)
    runner.start()
    with pytest.raises(TimeoutError, match="did not finish in 2 s"):
        runner.wait(timeout=2)
    assert pidfile.exists() and _gone(_pids(pidfile))
    assert finished and finished[0][1] == "cancelled" and not runner.running
