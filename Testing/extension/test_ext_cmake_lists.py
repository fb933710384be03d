"""Packaging: every shipped file is listed in the CMake files, every listed file exists, and the
extension metadata is what the Slicer ExtensionsIndex checks."""
import json
import os
import re

from extension_paths import EXTENSION, ROOT

MODULE_CMAKE = os.path.join(EXTENSION, "CMakeLists.txt")
TOP_CMAKE = os.path.join(ROOT, "CMakeLists.txt")


def _strip_comments(text):
    """CMake text without ``#`` comments (a ``#`` inside a quoted string is kept)."""
    lines = []
    for line in text.splitlines():
        quoted = False
        for i, char in enumerate(line):
            if char == '"':
                quoted = not quoted
            elif char == "#" and not quoted:
                line = line[:i]
                break
        lines.append(line)
    return "\n".join(lines)


def _cmake_lists(path):
    """{variable: [items]} for every ``set(NAME item ...)`` in a CMake file."""
    text = _strip_comments(open(path, encoding="utf-8").read())
    return {m.group(1): m.group(2).split() for m in re.finditer(r"set\(\s*(\w+)\s+([^)]*)\)", text)}


def _files_under(folder, base):
    out = set()
    for dirpath, dirnames, filenames in os.walk(os.path.join(base, folder)):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
        for name in filenames:
            if name.endswith((".pyc", ".pyo")) or name.startswith("."):
                continue
            out.add(os.path.relpath(os.path.join(dirpath, name), base).replace(os.sep, "/"))
    return out


def _listed():
    lists = _cmake_lists(MODULE_CMAKE)
    module = set(lists["MODULE_PYTHON_SCRIPTS"]) | set(lists["EFFECT_PYTHON_SCRIPTS"])
    root = set(lists["VELOXSEG_ROOT_PYTHON_SCRIPTS"]) | set(lists["VELOXSEG_ROOT_RESOURCES"])
    return lists, module, root


def test_every_listed_file_exists():
    _, module, root = _listed()
    missing = sorted([f for f in module if not os.path.isfile(os.path.join(EXTENSION, f))]
                     + [f for f in root if not os.path.isfile(os.path.join(ROOT, f))])
    assert not missing, f"listed in VeloxSegExtension/CMakeLists.txt but absent: {missing}"


def test_every_extension_file_is_listed():
    _, module, _ = _listed()
    shipped = {f for f in _files_under(".", EXTENSION) if f != "CMakeLists.txt"}
    shipped = {f[2:] if f.startswith("./") else f for f in shipped}
    unlisted = sorted(shipped - module)
    assert not unlisted, f"add to VeloxSegExtension/CMakeLists.txt (MODULE_/EFFECT_PYTHON_SCRIPTS): {unlisted}"


def test_every_library_file_and_resource_is_listed():
    lists, _, root = _listed()
    library = _files_under("VeloxSegLib", ROOT)
    resources = _files_under("Resources", ROOT)
    scripts, other = {f for f in library if f.endswith(".py")}, {f for f in library if not f.endswith(".py")}
    problems = []
    for wanted, var in ((scripts, "VELOXSEG_ROOT_PYTHON_SCRIPTS"), (other | resources, "VELOXSEG_ROOT_RESOURCES")):
        missing = sorted(wanted - set(lists[var]))
        if missing:
            problems.append(f"add to {var} in VeloxSegExtension/CMakeLists.txt (or run "
                            f"Testing/extension/update_cmake_lists.py):\n  " + "\n  ".join(missing))
    assert not problems, "\n".join(problems)


def test_module_cmake_builds_both_modules_with_generic_tests_and_the_self_test():
    text = _strip_comments(open(MODULE_CMAKE, encoding="utf-8").read())
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}[^)]*WITH_GENERIC_TESTS", text)
    assert "NAME SegmentEditorVeloxSeg" in text
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT \$\{MODULE_NAME\}\.py", text)
    assert "set(MODULE_NAME VeloxSeg)" in text
    assert "SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR}/.." in text


def test_extension_metadata_matches_the_index_entry():
    text = _strip_comments(open(TOP_CMAKE, encoding="utf-8").read())
    assert re.search(r"project\(VeloxSeg\)", text)
    values = dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', text))
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert values.get(key), key
    assert values["EXTENSION_CATEGORY"] == "Segmentation"
    assert "add_subdirectory(VeloxSegExtension)" in text
    assert "${Slicer_EXTENSION_GENERATE_CONFIG}" in text and "${Slicer_EXTENSION_CPACK}" in text
    entry = json.load(open(os.path.join(ROOT, "VeloxSeg.json"), encoding="utf-8"))  # project() name == file name
    assert entry["category"] == values["EXTENSION_CATEGORY"]
    assert entry["build_dependencies"] == values["EXTENSION_DEPENDS"].split(";")
    assert entry["scm_url"].endswith(".git") and "slicer-extension-catalog-entry-schema-v1.0.1" in entry["$schema"]
    assert values["EXTENSION_ICONURL"].endswith("Resources/Icons/VeloxSeg.png")
    assert os.path.isfile(os.path.join(ROOT, "Resources", "Icons", "VeloxSeg.png"))
    # the Extensions Manager shows these: each must be a PNG committed at that path
    for url in values["EXTENSION_SCREENSHOTURLS"].split(" "):
        path = url.split("/main/", 1)[1]
        with open(os.path.join(ROOT, *path.split("/")), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", url


def test_license_is_apache_2():
    text = open(os.path.join(ROOT, "LICENSE"), encoding="utf-8").read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_icon_is_a_png():
    with open(os.path.join(ROOT, "Resources", "Icons", "VeloxSeg.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
