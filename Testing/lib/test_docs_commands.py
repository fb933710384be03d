"""Every command line the README and docs/ show in a code block parses with the real parsers: an
option renamed or dropped in the code fails here, not in a user's terminal."""
import re
import shlex
import sys
from pathlib import Path

import pytest

from VeloxSegLib.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _code_lines(path):
    """The lines of a file's fenced code blocks, continuations (a trailing backslash, or an indented
    line starting with an option) joined."""
    lines, fenced, pending = [], False, ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.lstrip().startswith("```"):
            fenced, pending = not fenced, ""
            continue
        if not fenced:
            continue
        if raw.startswith("  ") and raw.strip().startswith(("[", "-")) and lines and not pending:
            lines[-1] += " " + raw.strip()  # a synopsis wrapped onto an indented line
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        lines.append(line)
    return lines


def _strip_comment(line):
    words = shlex.shlex(line, posix=True, punctuation_chars=False)
    words.whitespace_split = True
    words.commenters = "#"
    return list(words)


def _without_optional_parts(words):
    """A synopsis without its ``[optional parts]`` (placeholders such as ``X Y Z`` live there)."""
    out, depth = [], 0
    for word in words:
        depth += word.count("[")
        if depth == 0:
            out.append(word)
        depth -= word.count("]")
    return out


def _commands(tool):
    """(file, words after the tool) for every shown invocation of ``tool``, ``[optional parts]``
    dropped; synopses with ``...`` are left out (they are not runnable as written)."""
    found = []
    for path in DOCS:
        for line in _code_lines(path):
            if not re.search(rf"(^|[\s/]){re.escape(tool)}(\s|$)", line):
                continue
            words = _strip_comment(line)
            for i, word in enumerate(words):
                if word == tool or word.endswith("/" + tool):
                    args = _without_optional_parts(words[i + 1:])
                    if tool == "VeloxSegBatch.py" and args[:1] == ["--"]:
                        args = args[1:]
                    if any("..." in a for a in args) or not args:
                        break
                    found.append((path.name, args))
                    break
    return found


CLI_COMMANDS = _commands("veloxseg") + [(f, a) for f, a in _commands("VeloxSegLib.cli")]


def test_the_docs_show_every_command():
    shown = {args[0] for _f, args in CLI_COMMANDS}
    assert {"predict", "evaluate", "phantom", "convert", "plan", "train", "finetune", "compare", "models",
            "demo", "bench", "visibility"} <= shown, shown


@pytest.mark.parametrize("where,args", CLI_COMMANDS, ids=[f"{f}:{' '.join(a)[:60]}" for f, a in CLI_COMMANDS])
def test_cli_command_shown_in_the_docs_parses(where, args, capsys):
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{where}: `veloxseg {' '.join(args)}` does not parse: {capsys.readouterr().err.strip()} ({exc})")
    assert getattr(parsed, "func", None) is not None


BATCH_COMMANDS = _commands("VeloxSegBatch.py")


@pytest.mark.parametrize("where,args", BATCH_COMMANDS, ids=[f"{f}:{' '.join(a)[:60]}" for f, a in BATCH_COMMANDS])
def test_batch_command_shown_in_the_docs_parses(where, args, capsys):
    sys.path.insert(0, str(ROOT / "VeloxSegExtension"))
    try:
        import VeloxSegBatch
    finally:
        sys.path.pop(0)
    try:
        VeloxSegBatch.parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{where}: `VeloxSegBatch.py {' '.join(args)}` does not parse: {capsys.readouterr().err.strip()} ({exc})")


def test_batch_commands_are_found():
    assert len(BATCH_COMMANDS) >= 2 and re.search(r"--model", " ".join(BATCH_COMMANDS[0][1]))
