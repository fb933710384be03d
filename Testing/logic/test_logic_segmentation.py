"""Label maps become named, coloured, coded segments on the reference grid; .seg.nrrd round trip."""
import numpy as np
from logic_helpers import labels_meta

from VeloxSegLogic import segmentation as S
from VeloxSegLogic import volumes as V


def _label_array(shape):
    labels = np.zeros(shape, np.uint8)
    labels[2:5, 3:7, 2:6] = 1
    labels[6:9, 1:4, 5:8] = 2
    return labels  # label 3 (kidney) absent on purpose


def _reference(scene, oblique_matrix, shape=(10, 9, 8)):
    return V.add_volume_from_array(scene, np.zeros(shape, np.int16), oblique_matrix, "CT")


def test_segments_get_bundle_names_colours_and_terminology(scene, oblique_matrix):
    ref = _reference(scene, oblique_matrix)
    seg = S.create_segmentation_node(scene, "out", ref)
    ids = S.import_label_array(seg, _label_array((10, 9, 8)), ref, labels_meta())
    segmentation = seg.GetSegmentation()
    assert [segmentation.GetSegment(i).GetName() for i in ids] == ["lesion", "liver", "kidney"]
    lesion = segmentation.GetSegment(ids[0])
    assert np.allclose(lesion.GetColor(), np.array([230, 80, 60]) / 255.0)
    term = S.parse_terminology_string(lesion.GetTerminology())
    assert term["category"] == ["SCT", "49755003", "Morphologically Altered Structure"]
    assert term["type"] == ["SCT", "108369006", "Neoplasm"]


def test_every_label_gets_a_segment_even_when_absent(scene, oblique_matrix):
    ref = _reference(scene, oblique_matrix)
    seg = S.create_segmentation_node(scene, "out", ref)
    ids = S.import_label_array(seg, _label_array((10, 9, 8)), ref, labels_meta())
    kidney = S.segment_array(seg, ids[2], ref)
    assert kidney.shape == (10, 9, 8) and kidney.sum() == 0


def test_segmentation_reference_geometry_is_the_reference_volume(scene, oblique_matrix):
    import slicer

    ref = _reference(scene, oblique_matrix)
    seg = S.create_segmentation_node(scene, "out", None)
    S.import_label_array(seg, _label_array((10, 9, 8)), ref, labels_meta())
    assert seg.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) is ref
    assert np.array_equal(S.label_array_from_segmentation(seg, ref, labels_meta()), _label_array((10, 9, 8)))


def test_rerun_replaces_own_segments_and_keeps_the_users(scene, oblique_matrix):
    import slicer

    ref = _reference(scene, oblique_matrix)
    seg = S.create_segmentation_node(scene, "out", ref)
    seg.GetSegmentation().AddEmptySegment("mine", "my notes")
    S.import_label_array(seg, _label_array((10, 9, 8)), ref, labels_meta())
    S.import_label_array(seg, _label_array((10, 9, 8)), ref, labels_meta())
    names = sorted(seg.GetSegmentation().GetNthSegment(i).GetName() for i in range(seg.GetSegmentation().GetNumberOfSegments()))
    assert names == ["kidney", "lesion", "liver", "my notes"]
    assert isinstance(seg, slicer.vtkMRMLSegmentationNode)


def test_seg_nrrd_written_and_read_back_keeps_names_colours_terms_and_geometry(scene, tmp_path, oblique_matrix):
    ref = _reference(scene, oblique_matrix)
    seg = S.create_segmentation_node(scene, "out", ref)
    S.import_label_array(seg, _label_array((10, 9, 8)), ref, labels_meta())
    path = S.save_segmentation(seg, str(tmp_path / "out.seg.nrrd"))
    back = S.load_segmentation(path, scene)
    segmentation = back.GetSegmentation()
    segments = [segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments())]
    assert [s.GetName() for s in segments] == ["lesion", "liver", "kidney"]
    assert np.allclose(segments[1].GetColor(), np.array([221, 130, 101]) / 255.0, atol=1e-3)
    assert "108369006" in segments[0].GetTerminology()
    assert [S.segment_label_value(s) for s in segments] == [1, 2, 3]
    assert np.array_equal(S.label_array_from_segmentation(back, ref, labels_meta()), _label_array((10, 9, 8)))
    # the file's geometry is the reference's (oblique, anisotropic)
    import vtk

    labelmap = segmentation.GetSegment(segmentation.GetSegmentIDs()[0]).GetRepresentation("Binary labelmap")
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    directions = np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    assert np.allclose(directions, oblique_matrix[:3, :3], atol=1e-4)


def test_a_failed_write_leaves_no_partial_file_and_keeps_the_old_one(scene, tmp_path, oblique_matrix, monkeypatch):
    import os

    import slicer

    ref = _reference(scene, oblique_matrix)
    seg = S.create_segmentation_node(scene, "out", ref)
    S.import_label_array(seg, _label_array((10, 9, 8)), ref, labels_meta())
    path = str(tmp_path / "out.seg.nrrd")
    S.save_segmentation(seg, path)
    assert os.listdir(tmp_path) == ["out.seg.nrrd"]  # no temporary name left after a good write
    before = open(path, "rb").read()

    class FailingStorage(slicer.vtkMRMLSegmentationStorageNode):
        """Disk full halfway: some bytes reach the file, then the writer reports failure."""

        def WriteData(self, node):
            with open(self.GetFileName(), "wb") as f:
                f.write(before[: len(before) // 2])
            return 0

    monkeypatch.setattr(slicer, "vtkMRMLSegmentationStorageNode", FailingStorage)
    import pytest

    from VeloxSegLogic.errors import InputError

    with pytest.raises(InputError, match="could not write segmentation to .*out.seg.nrrd"):
        S.save_segmentation(seg, path)
    assert os.listdir(tmp_path) == ["out.seg.nrrd"] and open(path, "rb").read() == before
    with pytest.raises(InputError):
        S.save_segmentation(seg, str(tmp_path / "new.seg.nrrd"))
    assert os.listdir(tmp_path) == ["out.seg.nrrd"]


def test_rerun_of_one_model_keeps_another_models_segments(scene, oblique_matrix):
    ref = _reference(scene, oblique_matrix)
    seg = S.create_segmentation_node(scene, "out", ref)
    petct = [{"value": 0, "name": "background"}, {"value": 1, "name": "lesion"}]
    S.import_label_array(seg, _label_array((10, 9, 8)), ref, petct, model="petct-lesion-demo")
    S.import_label_array(seg, _label_array((10, 9, 8)), ref, labels_meta(), model="brain-tumor-mri-demo")
    S.import_label_array(seg, _label_array((10, 9, 8)), ref, labels_meta(), model="brain-tumor-mri-demo")  # re-run
    segmentation = seg.GetSegmentation()
    made = sorted((S.get_tag(segmentation.GetNthSegment(i), S.MODEL_TAG), segmentation.GetNthSegment(i).GetName())
                  for i in range(segmentation.GetNumberOfSegments()))
    assert made == [("brain-tumor-mri-demo", "kidney"), ("brain-tumor-mri-demo", "lesion"),
                    ("brain-tumor-mri-demo", "liver"), ("petct-lesion-demo", "lesion")]


def test_modifier_labelmap_is_in_the_segmentations_coordinates_under_a_transform(scene):
    """The Segment Editor applies no world-to-segmentation transform to a modifier labelmap: one
    hardened into world space would land 100 mm off when the segmentation sits under a transform."""
    import vtk

    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 100.0)
    transform.SetMatrixTransformToParent(shift)
    local = np.eye(4)
    local[:3, 3] = (-5.0, 2.0, 7.0)
    ref = V.add_volume_from_array(scene, np.zeros((10, 9, 8), np.int16), local, "CT")
    ref.SetAndObserveTransformNodeID(transform.GetID())
    seg = S.create_segmentation_node(scene, "out", ref)
    seg.SetAndObserveTransformNodeID(transform.GetID())
    label_node = V.add_volume_from_array(scene, _label_array((10, 9, 8)), local, "pred", label=True)
    label_node.SetAndObserveTransformNodeID(transform.GetID())  # as the logic returns it: under the source's transform
    image = S.binary_oriented_image(label_node, 1, seg)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    origin = [matrix.GetElement(r, 3) for r in range(3)]
    assert np.allclose(origin, (-5.0, 2.0, 7.0), atol=1e-6), origin


def test_binary_oriented_image_for_the_segment_editor(scene, oblique_matrix):
    label_node = V.add_volume_from_array(scene, _label_array((10, 9, 8)), oblique_matrix, "pred", label=True)
    image = S.binary_oriented_image(label_node, 2)
    from vtk.util import numpy_support

    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(10, 9, 8)
    assert np.array_equal(values, (_label_array((10, 9, 8)) == 2).astype(np.uint8))


def test_terminology_string_round_trip():
    term = labels_meta()[1]["terminology"]
    text = S.terminology_string(term)
    assert text.split("~")[0] == S.TERMINOLOGY_CONTEXT
    parsed = S.parse_terminology_string(text)
    assert parsed["category"] == term["category"] and parsed["type"] == term["type"]
    assert S.terminology_string(None) == ""


def test_the_segment_editor_keeps_a_reference_geometry_the_user_chose(scene, oblique_matrix):
    """Segment Editor "Add all labels": the segmentation's own geometry (here twice as fine as the
    source, as "Specify geometry" makes it) stays, since Undo restores segments, not geometry."""
    ref = _reference(scene, oblique_matrix)
    fine = V.add_volume_from_array(scene, np.zeros((20, 18, 16), np.int16), oblique_matrix @ np.diag([0.5, 0.5, 0.5, 1]),
                                   "fine")
    seg = S.create_segmentation_node(scene, "edited", fine)
    chosen = S.reference_geometry(seg)
    ids = S.import_label_array(seg, _label_array((10, 9, 8)), ref, labels_meta(), keep_geometry=True)
    assert S.reference_geometry(seg) == chosen
    assert np.array_equal(S.label_array_from_segmentation(seg, ref, labels_meta()), _label_array((10, 9, 8)))
    assert S.segment_array(seg, ids[0], ref).sum() == (_label_array((10, 9, 8)) == 1).sum()
    S.import_label_array(seg, _label_array((10, 9, 8)), ref, labels_meta())  # the panel's output: the input's grid
    assert S.reference_geometry(seg) != chosen
