"""Static checks of the Segment Editor effect (it needs the Slicer application to run).

Every effect parameter it reads has a default, and it hands the models ticked under
'Ensemble with' to the logic's request as the panel does."""
import ast
import os

from extension_paths import EXTENSION

EFFECT = os.path.join(EXTENSION, "SegmentEditorVeloxSegLib", "SegmentEditorEffect.py")


def _tree():
    with open(EFFECT, encoding="utf-8") as f:
        return ast.parse(f.read(), EFFECT)


def _method(tree, name):
    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)


def _string_args_of(node, attr):
    """First arguments (string constants) of every ``<...>.attr("...")`` call under ``node``."""
    out = set()
    for call in ast.walk(node):
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == attr
                and call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
            out.add(call.args[0].value)
    return out


def test_every_parameter_read_has_a_default_and_is_written():
    tree = _tree()
    read = _string_args_of(tree, "parameter")
    defaults = _string_args_of(_method(tree, "setMRMLDefaults"), "setParameterDefault")
    written = _string_args_of(_method(tree, "updateMRMLFromGUI"), "setParameter")
    assert {"Model", "Mode", "Label", "Device", "EnsembleWith"} <= read
    assert read <= defaults, f"read without a default: {sorted(read - defaults)}"
    assert read <= written, f"read but never saved from the options: {sorted(read - written)}"


def test_apply_passes_the_ticked_models_to_the_request():
    apply = _method(_tree(), "onApply")
    calls = [c for c in ast.walk(apply) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
             and c.func.id == "SegmentationRequest"]
    assert len(calls) == 1
    keywords = {k.arg: k.value for k in calls[0].keywords}
    assert "ensemble_with" in keywords
    # the value is what the list shows ticked: the ensemblePaths() result, directly or via a name bound to it
    value = keywords["ensemble_with"]
    if isinstance(value, ast.Name):
        bound = [a.value for a in ast.walk(apply) if isinstance(a, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == value.id for t in a.targets)]
        assert len(bound) == 1
        value = bound[0]
    assert isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr == "ensemblePaths"
