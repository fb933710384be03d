"""Label maps -> segmentation nodes with the bundle's names, colours and terminology; .seg.nrrd I/O."""
from __future__ import annotations

import os
import uuid

import numpy as np

from .errors import InputError

# Segments created here carry this tag, so a re-run replaces its own segments only.
SOURCE_TAG = "VeloxSeg.LabelValue"
MODEL_TAG = "VeloxSeg.Model"  # which model made the segment: a re-run replaces only its own
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"


def terminology_string(terminology: dict | None) -> str:
    """Slicer's serialized terminology entry for a bundle label's ``terminology`` dict.

    ``terminology`` holds DICOM code triplets [scheme, value, meaning] under ``category``,
    ``type`` and optionally ``type_modifier``, ``region``, ``region_modifier``.
    Returns "" when there is no category/type.
    """
    if not terminology or "category" not in terminology or "type" not in terminology:
        return ""

    def code(key):
        triplet = terminology.get(key) or ["", "", ""]
        if len(triplet) != 3:
            raise InputError(f"terminology '{key}' must be [scheme, value, meaning], got {triplet!r}")
        scheme, value, meaning = (str(x) for x in triplet)
        return scheme, value, meaning

    def part(key):
        scheme, value, meaning = code(key)
        return f"{scheme}^{value}^{meaning}"

    region_context = "Anatomic codes - DICOM master list" if terminology.get("region") else ""
    return "~".join([
        TERMINOLOGY_CONTEXT,
        part("category"),
        part("type"),
        part("type_modifier"),
        region_context,
        part("region"),
        part("region_modifier"),
    ])


def parse_terminology_string(text: str) -> dict:
    """Inverse of :func:`terminology_string` (for checks and the effect's display)."""
    fields = text.split("~")
    if len(fields) != 7:
        return {}
    keys = ["context", "category", "type", "type_modifier", "region_context", "region", "region_modifier"]
    result = {}
    for key, value in zip(keys, fields):
        if key.endswith("context"):
            result[key] = value
        else:
            triplet = value.split("^")
            if any(triplet):
                result[key] = triplet
    return result


def _foreground_labels(labels):
    return [lab for lab in labels if int(lab["value"]) != 0]


def reference_geometry(segmentation_node) -> str:
    """The segmentation's reference image geometry (a conversion parameter string; "" if none)."""
    import slicer

    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    return segmentation_node.GetSegmentation().GetConversionParameter(name) or ""


def create_segmentation_node(scene, name: str, reference_node=None):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    if reference_node is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    return node


def import_label_array(segmentation_node, label_array: np.ndarray, reference_node, labels, replace=True,
                       model: str | None = None, keep_geometry: bool = False):
    """Add one segment per foreground label of ``labels`` from ``label_array`` (in ``reference_node``'s grid).

    ``labels``: the bundle's label list ([{value, name, color, terminology?}]); ``model``: the
    bundle's name, recorded on each segment. Existing segments created by VeloxSeg for the same
    label values by the same model are replaced; other segments (the user's, another model's)
    are kept. Every label gets a segment, empty if the label is absent. Returns the segment IDs in
    label order. The segmentation's reference geometry becomes ``reference_node``'s, unless
    ``keep_geometry`` and it has one already (the Segment Editor's: a geometry the user chose,
    which Undo would not restore).
    """
    from .core import core_session
    from .volumes import add_volume_from_array, ijk_to_ras, remove_node, update_volume_from_array

    scene = segmentation_node.GetScene()
    session = core_session()
    segmentation = segmentation_node.GetSegmentation()
    label_array = np.asarray(label_array)
    if label_array.shape != tuple(reference_node.GetImageData().GetDimensions()[::-1]):
        raise InputError(
            f"label map shape {label_array.shape} does not match the reference volume "
            f"'{reference_node.GetName()}' {reference_node.GetImageData().GetDimensions()[::-1]}"
        )
    if not (keep_geometry and reference_geometry(segmentation_node)):
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    if replace:
        remove_veloxseg_segments(segmentation_node, [int(lab["value"]) for lab in labels], model=model)
    segment_ids = []
    labelmap_node = add_volume_from_array(scene, np.zeros((1, 1, 1), np.uint8), np.eye(4), name="__veloxseg_tmp__", label=True)
    try:
        for lab in _foreground_labels(labels):
            value = int(lab["value"])
            mask = (label_array == value).astype(np.uint8)
            update_volume_from_array(labelmap_node, mask, ijk_to_ras(reference_node, world=False))
            if reference_node.GetParentTransformNode() is not None:
                labelmap_node.SetAndObserveTransformNodeID(reference_node.GetParentTransformNodeID())
            else:
                labelmap_node.SetAndObserveTransformNodeID(None)
            segment_id = segmentation.GenerateUniqueSegmentID(str(lab["name"]))
            segment = _new_segment(segment_id, lab)
            segmentation.AddSegment(segment, segment_id)
            if mask.any():
                ids = _string_array([segment_id])
                if not session.segmentations_logic.ImportLabelmapToSegmentationNode(labelmap_node, segmentation_node, ids):
                    raise InputError(f"could not import label '{lab['name']}' into '{segmentation_node.GetName()}'")
            _apply_label_properties(segmentation.GetSegment(segment_id), lab)
            if model:
                segmentation.GetSegment(segment_id).SetTag(MODEL_TAG, str(model))
            segment_ids.append(segment_id)
    finally:
        remove_node(labelmap_node)
    return segment_ids


def _string_array(values):
    import vtk

    array = vtk.vtkStringArray()
    for value in values:
        array.InsertNextValue(value)
    return array


def _new_segment(segment_id, lab):
    import slicer

    segment = slicer.vtkSegment()
    segment.SetName(str(lab["name"]))
    _apply_label_properties(segment, lab)
    return segment


def _apply_label_properties(segment, lab):
    segment.SetName(str(lab["name"]))
    color = lab.get("color")
    if color is not None:
        segment.SetColor(*[float(c) / 255.0 for c in color])
    term = terminology_string(lab.get("terminology"))
    if term:
        segment.SetTag(segment.GetTerminologyEntryTagName(), term)
    segment.SetTag(SOURCE_TAG, str(int(lab["value"])))


def get_tag(segment, name):
    """A segment tag's value, or None when absent."""
    import vtk

    value = vtk.reference("")
    if not segment.GetTag(name, value):
        return None
    return str(value)


def remove_veloxseg_segments(segmentation_node, values=None, model=None):
    """Remove segments created by VeloxSeg: all, or those of the given label values, and with
    ``model`` only that model's (a segment from before models were recorded counts as any's)."""
    segmentation = segmentation_node.GetSegmentation()
    wanted = None if values is None else {str(int(v)) for v in values}
    for segment_id in list(segmentation.GetSegmentIDs()):
        segment = segmentation.GetSegment(segment_id)
        tag = get_tag(segment, SOURCE_TAG)
        made_by = get_tag(segment, MODEL_TAG)
        if tag is not None and (wanted is None or tag in wanted) and (model is None or made_by in (None, str(model))):
            segmentation.RemoveSegment(segment_id)


def segment_label_value(segment):
    """The bundle label value a VeloxSeg segment came from, or None."""
    tag = get_tag(segment, SOURCE_TAG)
    try:
        return None if tag is None else int(tag)
    except ValueError:
        return None


def segment_array(segmentation_node, segment_id, reference_node) -> np.ndarray:
    """Binary uint8 array of one segment on ``reference_node``'s grid ([k, j, i])."""
    from .core import core_session
    from .volumes import array_from_volume, remove_node

    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__veloxseg_export__")
    try:
        ok = core_session().segmentations_logic.ExportSegmentsToLabelmapNode(
            segmentation_node, _string_array([segment_id]), labelmap, reference_node)
        if not ok:
            raise InputError(f"could not export segment '{segment_id}' of '{segmentation_node.GetName()}'")
        return (array_from_volume(labelmap) > 0).astype(np.uint8)
    finally:
        display = labelmap.GetDisplayNode()
        if display is not None and display.GetColorNode() is not None and display.GetColorNode().GetName().startswith("__"):
            scene.RemoveNode(display.GetColorNode())
        remove_node(labelmap)


def label_array_from_segmentation(segmentation_node, reference_node, labels) -> np.ndarray:
    """Compose a label array (bundle values) from segments matched to ``labels``.

    A segment matches a label by the VeloxSeg value tag, else by name (case-insensitive).
    Later labels win where segments overlap.
    """
    segmentation = segmentation_node.GetSegmentation()
    shape = tuple(reference_node.GetImageData().GetDimensions()[::-1])
    result = np.zeros(shape, np.uint8)
    by_name = {}
    by_value = {}
    for segment_id in segmentation.GetSegmentIDs():
        segment = segmentation.GetSegment(segment_id)
        by_name.setdefault(segment.GetName().strip().lower(), segment_id)
        value = segment_label_value(segment)
        if value is not None:
            by_value.setdefault(value, segment_id)
    matched = 0
    for lab in _foreground_labels(labels):
        value = int(lab["value"])
        segment_id = by_value.get(value) or by_name.get(str(lab["name"]).strip().lower())
        if segment_id is None:
            continue
        matched += 1
        result[segment_array(segmentation_node, segment_id, reference_node) > 0] = value
    if matched == 0:
        names = ", ".join(str(lab["name"]) for lab in _foreground_labels(labels))
        raise InputError(f"segmentation '{segmentation_node.GetName()}' has no segment named {names}")
    return result


def save_segmentation(segmentation_node, path: str) -> str:
    """Write a segmentation node as ``.seg.nrrd`` through vtkMRMLSegmentationStorageNode, to a
    temporary name beside ``path`` and then renamed, so a failed write leaves no partial file."""
    import slicer

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # a fresh name the writer creates itself (so the file gets the usual permissions)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.seg.nrrd")
    try:
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(temporary)
        storage.SetUseCompression(1)
        if not storage.WriteData(segmentation_node):
            raise InputError(f"could not write segmentation to {path}")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def load_segmentation(path: str, scene, name=None):
    """Read a ``.seg.nrrd`` into a new segmentation node."""
    import slicer

    if not os.path.isfile(path):
        raise InputError(f"no such segmentation file: {path}")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or os.path.basename(path).split(".")[0])
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(path)
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise InputError(f"could not read segmentation file: {path}")
    return node


def binary_oriented_image(label_node, value: int, segmentation_node=None):
    """vtkOrientedImageData (0/1) of one label of a label map node, for the Segment Editor.

    Its geometry is in ``segmentation_node``'s coordinates (the editor's modifier labelmaps are):
    a transform above the segmentation is taken into account, not hardened into world space."""
    import slicer
    import vtk

    to = segmentation_node.GetParentTransformNode() if segmentation_node is not None else None
    oriented = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(label_node, to)
    if oriented is None:
        raise InputError(f"label map '{label_node.GetName()}' holds no image")
    oriented.UnRegister(None)  # the method hands over a reference; Python's own keeps it alive here
    threshold = vtk.vtkImageThreshold()
    threshold.SetInputData(oriented)
    threshold.ThresholdBetween(value, value)
    threshold.SetInValue(1)
    threshold.SetOutValue(0)
    threshold.SetOutputScalarTypeToUnsignedChar()
    threshold.Update()
    result = slicer.vtkOrientedImageData()
    result.ShallowCopy(threshold.GetOutput())
    matrix = vtk.vtkMatrix4x4()
    oriented.GetImageToWorldMatrix(matrix)
    result.SetImageToWorldMatrix(matrix)
    return result
