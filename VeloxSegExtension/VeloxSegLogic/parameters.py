"""The panel's state in a vtkMRMLScriptedModuleNode, so a saved scene restores it.

Plain values are node parameters (strings); volumes and segmentations are node references
(IDs are remapped by the scene on import). Fine-tuning cases are references with indexed roles.
"""
from __future__ import annotations

import json

MODULE_NAME = "VeloxSeg"


def _flag(key, doc):
    """A boolean parameter stored as "true"/"false"."""
    return property(lambda self: self._get(key).lower() == "true",
                    lambda self, value: self._set(key, "true" if value else "false"), doc=doc)


DEFAULTS = {
    "Model": "",
    "EnsembleWith": "[]",  # JSON list of bundle paths predicting together with Model
    "Device": "auto",
    "Overlap": "",  # empty: the bundle's default
    "TTA": "false",
    "BF16": "false",
    "PETRefine": "true",
    "Epochs": "50",
    "LearningRate": "0.0001",
    "NewModelName": "",
}


def paths_from_text(text) -> list:
    """A saved list of bundle paths (a JSON list of strings, as ``paths_to_text`` writes it);
    anything unreadable reads as no paths, and entries that are not non-empty strings are skipped."""
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    return [v for v in value if isinstance(v, str) and v] if isinstance(value, list) else []


def paths_to_text(paths) -> str:
    """Bundle paths as the text a parameter node keeps (a JSON list)."""
    return json.dumps([str(p) for p in paths])


def get_parameter_node(scene, create=True):
    """The module's singleton parameter node (same tag and module name Slicer's logic uses)."""
    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is None and create:
        import slicer

        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetSingletonTag(MODULE_NAME)
        node.SetModuleName(MODULE_NAME)
        node.SetName(f"{MODULE_NAME} parameters")
        node = scene.AddNode(node)
    return node


class Parameters:
    """Typed access to the parameter node."""

    def __init__(self, node):
        self.node = node
        for key, value in DEFAULTS.items():
            if not node.GetParameter(key):
                node.SetParameter(key, value)

    # plain values
    def _get(self, key):
        return self.node.GetParameter(key) or DEFAULTS.get(key, "")

    def _set(self, key, value):
        self.node.SetParameter(key, str(value))

    model = property(lambda self: self._get("Model"), lambda self, v: self._set("Model", v))
    device = property(lambda self: self._get("Device"), lambda self, v: self._set("Device", v))
    new_model_name = property(lambda self: self._get("NewModelName"), lambda self, v: self._set("NewModelName", v))

    @property
    def ensemble_with(self) -> list:
        """Bundle paths that predict together with the model (an ensemble); [] for none."""
        return paths_from_text(self._get("EnsembleWith"))

    @ensemble_with.setter
    def ensemble_with(self, paths):
        self._set("EnsembleWith", paths_to_text(paths))

    @property
    def overlap(self):
        text = self._get("Overlap")
        return float(text) if text else None

    @overlap.setter
    def overlap(self, value):
        self._set("Overlap", "" if value is None else f"{float(value):g}")

    tta = _flag("TTA", "mirror test-time augmentation")
    bf16 = _flag("BF16", "opt-in bfloat16 arithmetic on the CPU (``veloxseg predict --precision bf16``)")
    pet_refine = _flag("PETRefine", "keep the model's PET border refinement (off: ``veloxseg predict --no-pet-refine``)")

    @property
    def epochs(self):
        return int(self._get("Epochs"))

    @epochs.setter
    def epochs(self, value):
        self._set("Epochs", int(value))

    @property
    def learning_rate(self):
        return float(self._get("LearningRate"))

    @learning_rate.setter
    def learning_rate(self, value):
        self._set("LearningRate", f"{float(value):g}")

    # node references
    def input_node(self, index):
        return self.node.GetNodeReference(f"Input{index}")

    def set_input_node(self, index, node):
        self.node.SetNodeReferenceID(f"Input{index}", node.GetID() if node else None)

    @property
    def output_segmentation(self):
        return self.node.GetNodeReference("OutputSegmentation")

    @output_segmentation.setter
    def output_segmentation(self, node):
        self.node.SetNodeReferenceID("OutputSegmentation", node.GetID() if node else None)

    # fine-tuning cases: roles Case{i}Segmentation, Case{i}Volume{c}
    def cases(self):
        result = []
        index = 0
        while self.node.GetNodeReference(f"Case{index}Segmentation") is not None:
            volumes = []
            c = 0
            while self.node.GetNodeReference(f"Case{index}Volume{c}") is not None:
                volumes.append(self.node.GetNodeReference(f"Case{index}Volume{c}"))
                c += 1
            result.append((volumes, self.node.GetNodeReference(f"Case{index}Segmentation")))
            index += 1
        return result

    def set_cases(self, cases):
        """``cases``: [(volume_nodes, segmentation_node)], replacing the stored list."""
        for role in list(self._case_roles()):
            self.node.RemoveNodeReferenceIDs(role)
        for index, (volumes, segmentation) in enumerate(cases):
            for c, volume in enumerate(volumes):
                self.node.SetNodeReferenceID(f"Case{index}Volume{c}", volume.GetID())
            self.node.SetNodeReferenceID(f"Case{index}Segmentation", segmentation.GetID())

    def _case_roles(self):
        roles = []
        for i in range(self.node.GetNumberOfNodeReferenceRoles()):
            role = self.node.GetNthNodeReferenceRole(i)
            if role.startswith("Case"):
                roles.append(role)
        return roles
