"""The panel's .ui loads with PySide6's QUiLoader and has every widget the module code uses."""
import ast
import os
import xml.etree.ElementTree as ET

import pytest
from extension_paths import EXTENSION, UI_FILE

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtWidgets = pytest.importorskip("PySide6.QtWidgets", reason="PySide6 is not installed")

# Slicer/CTK widget classes used in the .ui and the Qt class each must declare as its base
SLICER_WIDGETS = {
    "ctkCollapsibleButton": "QWidget",
    "qMRMLNodeComboBox": "QWidget",
    "qMRMLPlotWidget": "QWidget",
    "qMRMLWidget": "QWidget",
}


def _ui_widgets():
    tree = ET.parse(UI_FILE)
    return {w.get("name"): w.get("class") for w in tree.iter("widget")}


def _ui_names_used_in(path):
    """Every ``self.ui.<name>`` in a Python file."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def test_every_widget_the_module_uses_is_in_the_ui():
    used = _ui_names_used_in(os.path.join(EXTENSION, "VeloxSeg.py"))
    assert len(used) > 20
    missing = sorted(used - set(_ui_widgets()))
    assert not missing, f"VeloxSeg.py uses self.ui.{missing} but Resources/UI/VeloxSeg.ui has no such widget"


def test_widget_names_are_unique():
    names = [w.get("name") for w in ET.parse(UI_FILE).iter("widget")]
    assert len(names) == len(set(names))


def test_slicer_widget_classes_are_declared_with_a_qt_base_class():
    tree = ET.parse(UI_FILE)
    declared = {c.findtext("class"): c.findtext("extends") for c in tree.iter("customwidget")}
    used = {cls for cls in _ui_widgets().values() if not cls.startswith("Q")}
    assert used <= set(declared), f"undeclared custom widgets: {sorted(used - set(declared))}"
    for cls in used:
        assert declared[cls] == SLICER_WIDGETS[cls], f"{cls} must extend {SLICER_WIDGETS[cls]}"


def test_ui_loads_with_quiloader_offscreen():
    from PySide6.QtCore import QFile, QIODevice
    from PySide6.QtUiTools import QUiLoader

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    loader = QUiLoader()
    # stand-ins for Slicer's widgets, registered under their Slicer class names
    for name, base in SLICER_WIDGETS.items():
        loader.registerCustomWidget(type(name, (getattr(QtWidgets, base),), {}))
    ui_file = QFile(UI_FILE)
    assert ui_file.open(QIODevice.ReadOnly)
    widget = loader.load(ui_file)
    ui_file.close()
    assert widget is not None, loader.errorString()
    for name, cls in _ui_widgets().items():
        child = widget if widget.objectName() == name else widget.findChild(QtWidgets.QWidget, name)
        assert child is not None, name
        assert type(child).__name__ == cls or cls in SLICER_WIDGETS and type(child).__mro__[1].__name__ == SLICER_WIDGETS[cls]
    assert widget.findChild(QtWidgets.QPushButton, "applyButton").text() == "Apply"
    assert isinstance(widget.findChild(QtWidgets.QWidget, "inputsFrame").layout(), QtWidgets.QFormLayout)
    widget.deleteLater()
    app.processEvents()
