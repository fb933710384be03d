"""The ``veloxseg`` command line.

Each sub-command lives in its own module under ``VeloxSegLib.commands`` exposing
``register(subparsers)`` (adds its parser and sets ``func``). Modules are imported lazily so
``veloxseg --help`` stays fast and a missing optional dependency only affects its command.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import threading
import sys

from .errors import VeloxSegError

# sub-command name -> module under VeloxSegLib.commands
COMMANDS = {
    "predict": "predict",
    "evaluate": "evaluate",
    "models": "models",
    "phantom": "phantom",
    "convert": "convert",
    "plan": "plan",
    "train": "train",
    "finetune": "finetune",
    "bench": "bench",
    "compare": "compare",
    "visibility": "visibility",
    "ensemble": "ensemble",
    "crossval": "crossval",
    "demo": "demo",
}


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line, like every other error (``--help`` shows the usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="veloxseg",
        description="VeloxSeg: lightweight multimodal 3D medical image segmentation.",
    )
    parser.add_argument("--version", action="version", version=f"veloxseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(f".commands.{module}", __package__)
        except ModuleNotFoundError as exc:  # command not shipped in this build
            if exc.name and exc.name.endswith(f"commands.{module}"):
                continue
            raise
        mod.register(sub)
    return parser


class _Terminated(BaseException):
    """SIGTERM before a command installs its own handler. Not a KeyboardInterrupt: raised inside
    torch's import (code run through PyRun_String), that would make Python end itself with SIGINT
    at exit even though it was handled."""


_terminated = threading.Event()


def _terminate(signum, frame):
    _terminated.set()
    raise _Terminated


def stop_if_terminated() -> None:
    """End the run if SIGTERM came and its exception was lost.

    Python runs a signal handler between two bytecodes of whatever code is running, and an
    exception raised where nobody can receive it (inside an object's ``__del__``, a weakref
    callback) is printed as "Exception ignored" and dropped: the run would go on to the end. The
    commands whose long loops rely on ``_terminate`` call this at each case boundary, so such a
    SIGTERM still cancels the run there (cleanup runs, one line, exit 130).
    """
    if _terminated.is_set():
        raise _Terminated


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM while the command line starts up (its modules and torch import).

    torch's import runs Python code called from C++ (pybind11): an exception a signal handler
    raises there cannot unwind through the C++ frames, and the process aborts with
    "terminate called after throwing an instance of 'pybind11::error_already_set'" (exit -6, a
    core dump) instead of ending cleanly. So a signal that arrives meanwhile is only noted, and
    once the imports are done it ends the run the usual way (one line, exit 130). Nothing is
    written before that point, so holding it for the second or two of the import loses nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if arrived:
        raise KeyboardInterrupt if arrived[0] == signal.SIGINT else _Terminated


def main(argv=None) -> int:
    command = None
    _terminated.clear()
    try:
        # SIGTERM before a command installs its own handler (while torch is imported, say) ends
        # the run like Ctrl-C: cleanup runs, one line, exit 130
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _terminate)
        with _signals_held():
            parser = build_parser()
            args = parser.parse_args(argv)
            command = args.command
            logging.basicConfig(
                level=logging.DEBUG if args.verbose else logging.WARNING,
                format="%(levelname)s %(name)s: %(message)s",
                stream=sys.stderr,
            )
            if not getattr(args, "func", None):
                parser.print_help()
                return 2
            from .infer.device import keep_freed_memory  # imports torch

            keep_freed_memory()  # sliding windows re-allocate the same activations: no page fault per window
        return int(args.func(args) or 0)
    except VeloxSegError as exc:
        print(f"veloxseg {command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (KeyboardInterrupt, _Terminated):
        print(f"veloxseg{' ' + command if command else ''}: cancelled", file=sys.stderr)
        return 130
    finally:
        _terminated.clear()


if __name__ == "__main__":
    sys.exit(main())
