"""Which Python packages the extension still needs (read from Resources/requirements.txt).

Pure Python: the Qt layer asks the user once, then installs with Slicer's tools.
"""
from __future__ import annotations

import re

_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*(;.*)?$")


def parse_requirements(text: str) -> list:
    """[(name, specifier)] from requirements.txt content (comments and options skipped)."""
    result = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = _REQ.match(line)
        if match:
            result.append((match.group(1), match.group(3) or ""))
    return result


def missing_requirements(text: str) -> list:
    """Requirement lines (name + specifier) not satisfied in this Python."""
    from importlib import metadata

    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # pragma: no cover
        SpecifierSet = None
    missing = []
    for name, spec in parse_requirements(text):
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(f"{name}{spec}")
            continue
        if spec and SpecifierSet is not None:
            try:
                if version not in SpecifierSet(spec):
                    missing.append(f"{name}{spec}")
            except Exception:  # an unparsable specifier: leave it to pip
                pass
    return missing
