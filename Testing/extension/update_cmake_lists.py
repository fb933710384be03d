"""Rewrite the VeloxSegLib lists in VeloxSegExtension/CMakeLists.txt from the source tree.

usage: python Testing/extension/update_cmake_lists.py   (then review the diff)
The module's own scripts are listed by hand; this only refreshes VELOXSEG_ROOT_PYTHON_SCRIPTS and
VELOXSEG_ROOT_RESOURCES (library scripts, embedded bundles, schemas, Resources/).
"""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CMAKE = os.path.join(ROOT, "VeloxSegExtension", "CMakeLists.txt")


def tree_files(folder):
    out = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        out += [os.path.relpath(os.path.join(dirpath, f), ROOT).replace(os.sep, "/")
                for f in filenames if not f.endswith((".pyc", ".pyo")) and not f.startswith(".")]
    return sorted(out)


def replace_list(text, name, items):
    body = "\n".join(f"  {item}" for item in items)
    return re.sub(rf"set\({name}\n.*?\n  \)", lambda m: f"set({name}\n{body}\n  )", text, flags=re.S)


def main():
    library = tree_files("VeloxSegLib")
    text = open(CMAKE, encoding="utf-8").read()
    text = replace_list(text, "VELOXSEG_ROOT_PYTHON_SCRIPTS", [f for f in library if f.endswith(".py")])
    text = replace_list(text, "VELOXSEG_ROOT_RESOURCES", tree_files("Resources") + [f for f in library if not f.endswith(".py")])
    with open(CMAKE, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
