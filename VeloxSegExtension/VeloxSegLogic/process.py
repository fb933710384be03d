"""Run a command as a child process with JSON-line progress, a log, and a cancel that ends the tree.

Output is read on background threads and queued; :meth:`ProcessRunner.poll` delivers the
callbacks on the caller's thread (the Qt widget calls it from a timer, so callbacks may touch
widgets; the batch script calls :meth:`ProcessRunner.wait`). Output is decoded as UTF-8 with
replacement, whatever the system locale.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)


def python_executable() -> str:
    """The Python to run VeloxSegLib with: PythonSlicer inside Slicer, else this interpreter."""
    import shutil

    from .core import in_slicer_app

    try:
        in_app = in_slicer_app()
    except ImportError:
        in_app = False
    if in_app:
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def library_env(extra: dict | None = None) -> dict:
    """Environment for a child Python that can import VeloxSegLib from where this process does."""
    import importlib.util

    env = dict(os.environ)
    paths = []
    spec = importlib.util.find_spec("VeloxSegLib")
    if spec is not None and spec.submodule_search_locations:
        paths.append(os.path.dirname(os.path.abspath(list(spec.submodule_search_locations)[0])))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def parse_progress_line(line: str):
    """The JSON object on a progress line, or None for ordinary log output."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def kill_process_tree(process: subprocess.Popen, timeout: float = 5.0) -> None:
    """End a child started by :class:`ProcessRunner` and all its descendants.

    With psutil: terminate the child and every descendant (listed before anything dies, so
    none escapes by being re-parented), wait, kill what is left. Without psutil: signal the
    child's process group (POSIX) or ``taskkill /T`` (Windows). The child itself is reaped with
    ``Popen.wait`` so its exit code is kept.
    """
    try:
        import psutil
    except ImportError:
        psutil = None
    descendants = []
    if psutil is not None:
        try:
            descendants = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        for proc in descendants:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
    if os.name == "nt":
        if psutil is None:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True)
        process.terminate()
    elif psutil is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    else:
        process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)
    if psutil is not None:
        _, alive = psutil.wait_procs(descendants, timeout=timeout)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=timeout)
    if os.name != "nt":
        try:  # whatever is left in the child's process group
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class ProcessRunner:
    """One child process. Callbacks (all optional, called from :meth:`poll`):

    - ``on_progress(dict)`` for each JSON object printed on stdout,
    - ``on_log(str)`` for every other stdout/stderr line,
    - ``on_finished(returncode, error_message)`` once, after the process and its output ended;
      ``error_message`` is the last non-empty stderr line when the exit code is non-zero.
    """

    def __init__(self, args, env=None, cwd=None, on_progress=None, on_log=None, on_finished=None):
        self.args = [str(a) for a in args]
        self.env = env
        self.cwd = cwd
        self.on_progress = on_progress
        self.on_log = on_log
        self.on_finished = on_finished
        self.process = None
        self.returncode = None
        self.cancelled = False
        self.error_message = ""
        self.started_at = None
        self._queue = queue.Queue()
        self._threads = []
        self._stderr_tail = []
        self._finished_delivered = False

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self):
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        log.debug("starting %s", " ".join(self.args))
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env=self.env, cwd=self.cwd, **kwargs)
        for stream, name in ((self.process.stdout, "stdout"), (self.process.stderr, "stderr")):
            thread = threading.Thread(target=self._reader, args=(stream, name), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _reader(self, stream, name):
        try:
            for raw in iter(stream.readline, b""):
                self._queue.put((name, raw.decode("utf-8", errors="replace").rstrip("\r\n")))
        finally:
            stream.close()
            self._queue.put((name, None))

    @property
    def elapsed(self) -> float:
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    @property
    def running(self) -> bool:
        return self.process is not None and not self._finished_delivered

    def poll(self) -> bool:
        """Deliver queued callbacks; returns True while the job is not finished."""
        if self.process is None:
            return False
        while True:
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                continue
            self._handle_line(name, line)
        if not self._finished_delivered and self.process.poll() is not None and not any(t.is_alive() for t in self._threads):
            # drain what the readers queued before they ended
            while not self._queue.empty():
                name, line = self._queue.get_nowait()
                if line is not None:
                    self._handle_line(name, line)
            self.returncode = self.process.returncode
            if self.returncode != 0:
                self.error_message = next((l for l in reversed(self._stderr_tail) if l.strip()), "")
                if self.cancelled:
                    self.error_message = "cancelled"
                elif not self.error_message:
                    self.error_message = f"process exited with code {self.returncode}"
            self._finished_delivered = True
            if self.on_finished:
                self.on_finished(self.returncode, self.error_message)
        return not self._finished_delivered

    def _handle_line(self, name, line):
        if name == "stdout":
            progress = parse_progress_line(line)
            if progress is not None:
                if self.on_progress:
                    self.on_progress(progress)
                return
        else:
            self._stderr_tail = (self._stderr_tail + [line])[-20:]
        if self.on_log:
            self.on_log(line)

    def wait(self, timeout=None, interval=0.05) -> int:
        """Block (polling) until the job ends; cancels it and raises TimeoutError after ``timeout``.

        Whatever ends the wait early (the timeout, Ctrl-C in a batch run) also ends the child: it
        runs in its own session, so a terminal's interrupt never reaches it. ``on_finished`` is
        still delivered, so the owner removes its temporary files.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self.poll():
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{self.args[0]} did not finish in {timeout} s")
                time.sleep(interval)
        except BaseException:
            self.shutdown()
            raise
        return self.returncode

    def shutdown(self, timeout: float = 10.0, interval: float = 0.02) -> None:
        """Cancel the child (if it still runs) and deliver ``on_finished`` within ``timeout`` s:
        for scene close, application exit and interrupted waits."""
        if self.process is None:
            return
        self.cancel()
        deadline = time.monotonic() + timeout
        while self.poll() and time.monotonic() < deadline:
            time.sleep(interval)

    def cancel(self, timeout: float = 5.0) -> None:
        """End the child and everything it started. Safe to call more than once."""
        if self.process is None or self._finished_delivered or self.cancelled:
            return
        self.cancelled = True
        kill_process_tree(self.process, timeout=timeout)
