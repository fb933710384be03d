"""The Qt layer compiles, never imports torch when Slicer loads it, and the MRML logic stays Qt-free."""
import ast
import json
import os
import subprocess
import sys

import pytest
from extension_paths import EXTENSION, ROOT

HEAVY = ("torch", "VeloxSegLib.model", "VeloxSegLib.train", "VeloxSegLib.infer", "monai", "safetensors")


def _py_files():
    out = []
    for dirpath, dirnames, filenames in os.walk(EXTENSION):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        out += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(out)


def _module_level_imports(tree):
    """Imports executed when the file is imported: top level and top-level if/try blocks, not functions/classes."""
    found = []

    def visit(body):
        for node in body:
            if isinstance(node, ast.Import):
                found.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                found.append(("." * node.level) + (node.module or ""))
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(node.body)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "orelse", []))
                visit(getattr(node, "finalbody", []))

    visit(tree.body)
    return found


@pytest.mark.parametrize("path", _py_files(), ids=lambda p: os.path.relpath(p, EXTENSION))
def test_file_compiles_and_imports_nothing_heavy_at_module_level(path):
    source = open(path, encoding="utf-8").read()
    tree = ast.parse(source, path)
    compile(tree, path, "exec")
    heavy = [name for name in _module_level_imports(tree) if name.split(".")[0] == "torch" or name.startswith(HEAVY)]
    assert not heavy, f"{os.path.relpath(path, ROOT)} imports {heavy} at module level"


def test_mrml_logic_never_uses_qt_ctk_or_slicer_app():
    folder = os.path.join(EXTENSION, "VeloxSegLogic")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, name), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] in ("qt", "ctk", "PythonQt") for a in node.names), name
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in ("qt", "ctk", "PythonQt"), name
            elif isinstance(node, ast.Attribute) and node.attr == "app" and isinstance(node.value, ast.Name):
                assert node.value.id != "slicer", f"{name} uses slicer.app"


def test_importing_the_logic_and_batch_loads_no_torch():
    code = (
        "import sys, json\n"
        f"sys.path[:0] = [{EXTENSION!r}, {ROOT!r}]\n"
        "import VeloxSegLogic, VeloxSegLogic.bundles, VeloxSegLogic.finetune, VeloxSegLogic.logic, "
        "VeloxSegLogic.parameters, VeloxSegLogic.process, VeloxSegLogic.segmentation, VeloxSegLogic.volumes, "
        "VeloxSegLogic.dependencies, VeloxSegBatch\n"
        "from VeloxSegLogic.bundles import list_bundle_infos\n"
        "list_bundle_infos()\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'qt', 'ctk', 'PySide6'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_requirements_parse_and_missing_ones_are_reported():
    sys.path[:0] = [EXTENSION]
    from VeloxSegLogic.dependencies import missing_requirements, parse_requirements

    text = open(os.path.join(ROOT, "Resources", "requirements.txt"), encoding="utf-8").read()
    names = [name for name, _ in parse_requirements(text)]
    assert "torch" not in names and {"einops", "safetensors"} <= set(names)
    assert missing_requirements("numpy>=1.0\nno-such-package-veloxseg>=1\n# comment\n") == ["no-such-package-veloxseg>=1"]
    assert missing_requirements("numpy<1.0") == ["numpy<1.0"]


def test_the_panels_torch_requirement_is_the_librarys():
    """The panel installs (and checks) the torch the library declares, not an older one."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = [d for d in tomllib.load(f)["project"]["dependencies"] if d.replace(" ", "").startswith("torch")]
    tree = ast.parse(open(os.path.join(EXTENSION, "VeloxSeg.py"), encoding="utf-8").read())
    values = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
              and any(getattr(t, "id", None) == "TORCH_REQUIREMENT" for t in node.targets)]
    assert values == [declared[0].replace(" ", "")]
