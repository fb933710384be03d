"""The panel's path end to end with a stand-in predictor: volumes out, progress, segments in."""
import os
import sys

import numpy as np
import pytest
from logic_helpers import HELPERS, ijk_to_ras_matrix

from VeloxSegLogic import logic as L
from VeloxSegLogic import segmentation as S
from VeloxSegLogic import volumes as V
from VeloxSegLogic.errors import InputError


@pytest.fixture
def fake_cli(monkeypatch):
    def command(bundle, inputs, output, device="auto", overlap=None, tta=False, precision="fp32", pet_refine=True,
                ensemble_with=()):
        args = L.predict_command.__wrapped__(bundle, inputs, output, device, overlap, tta, precision, pet_refine,
                                             ensemble_with)
        index = args.index("predict")
        return [sys.executable, os.path.join(HELPERS, "fake_predict.py")] + args[index + 1:]

    command.__wrapped__ = L.predict_command
    monkeypatch.setattr(L, "predict_command", command)


def _pet_ct(scene):
    ct = V.add_volume_from_array(scene, np.zeros((12, 20, 20), np.int16),
                                 ijk_to_ras_matrix((1.0, 1.0, 2.0), (0, 0, 0), (0, 0, 10)), "patient1 CT")
    pet_data = np.zeros((10, 12, 12), np.float32)
    pet_data[4:7, 5:8, 5:8] = 100.0
    pet = V.add_volume_from_array(scene, pet_data, ijk_to_ras_matrix((2.0, 2.0, 3.0), (-3, -2, -1)), "patient1 PET")
    return ct, pet


def test_subprocess_job_reports_progress_and_imports_named_segments(scene, metadata_bundle, fake_cli):
    logic = L.VeloxSegCoreLogic()
    ct, pet = _pet_ct(scene)
    fractions, done = [], []
    request = L.SegmentationRequest(bundle=str(metadata_bundle), input_nodes=[ct, pet])
    job = logic.start_segmentation(request, on_progress=lambda f, s, r: fractions.append(f),
                                   on_done=lambda node, err: done.append((node, err)))
    job.wait(timeout=120)
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    node, error = done[0]
    assert error is None and node is not None
    names = [node.GetSegmentation().GetNthSegment(i).GetName() for i in range(node.GetSegmentation().GetNumberOfSegments())]
    assert names == ["lesion", "liver", "kidney"]
    lesion = S.segment_array(node, node.GetSegmentation().GetSegmentIdBySegmentName("lesion"), ct)
    assert lesion.sum() > 0
    # the hot PET block lands where it is in physical space, on the CT grid
    from logic_helpers import ras_grid_points

    ras = ras_grid_points(V.ijk_to_ras(ct), lesion.shape)[lesion > 0]
    pet_ijk = np.linalg.solve(V.ijk_to_ras(pet), np.c_[ras, np.ones(len(ras))].T)[:3].T
    assert np.all((pet_ijk > [4, 4, 3]) & (pet_ijk < [8, 8, 7]))
    assert not os.path.exists(job.temp_dir)


def test_blocking_segment_returns_the_output_node(scene, metadata_bundle, fake_cli):
    logic = L.VeloxSegCoreLogic()
    ct, pet = _pet_ct(scene)
    existing = S.create_segmentation_node(scene, "mine", ct)
    node = logic.segment(L.SegmentationRequest(bundle=str(metadata_bundle), input_nodes=[ct, pet], output_node=existing), timeout=120)
    assert node is existing and node.GetSegmentation().GetNumberOfSegments() == 3


def test_request_with_a_missing_input_is_refused(scene, metadata_bundle):
    logic = L.VeloxSegCoreLogic()
    ct, _ = _pet_ct(scene)
    with pytest.raises(InputError, match="needs 2 inputs"):
        logic.start_segmentation(L.SegmentationRequest(bundle=str(metadata_bundle), input_nodes=[ct]))


def test_one_volume_for_two_inputs_is_refused(scene, metadata_bundle):
    logic = L.VeloxSegCoreLogic()
    ct, _ = _pet_ct(scene)
    with pytest.raises(InputError, match="'patient1 CT' is selected as both CT and PET"):
        logic.start_segmentation(L.SegmentationRequest(bundle=str(metadata_bundle), input_nodes=[ct, ct]))


def test_volumes_named_in_another_order_are_refused(scene, metadata_bundle):
    logic = L.VeloxSegCoreLogic()
    ct, pet = _pet_ct(scene)
    ct.SetName("patient1 PET")  # the selectors hold the volumes the other way round from their names
    pet.SetName("patient1 CT")
    with pytest.raises(InputError, match=r"input 1 \(CT\) is 'patient1 PET', named like PET; input 2 \(PET\) is "
                                         r"'patient1 CT', named like CT; model '.*' expects CT, PET in this order"):
        logic.start_segmentation(L.SegmentationRequest(bundle=str(metadata_bundle), input_nodes=[ct, pet]))
    ct.SetName("patient1 CT")
    pet.SetName("patient1 PET")
    L.SegmentationRequest(bundle=str(metadata_bundle), input_nodes=[ct, pet]).validate(logic.bundle_info(str(metadata_bundle)))


def test_predict_command_uses_this_python_and_json_progress():
    args = L.predict_command("/b", ["/a.nii.gz", "/p.nii.gz"], "/o.nii.gz", device="cpu", overlap=0.5, tta=True)
    assert args[:5] == [sys.executable, "-m", "VeloxSegLib.cli", "predict", "-m"]
    assert args[args.index("-i") + 1: args.index("-o")] == ["/a.nii.gz", "/p.nii.gz"]
    assert "--tta" in args and args[args.index("--overlap") + 1] == "0.5"
    assert args[args.index("--progress") + 1] == "json"
    assert "--precision" not in args  # fp32: the library's default, not spelled out
    args = L.predict_command("/b", ["/a.nii.gz"], "/o.nii.gz", device="cpu", precision="bf16")
    assert args[args.index("--precision") + 1] == "bf16"
    assert "--no-pet-refine" not in args and "--pet-refine" not in args  # the bundle's setting
    args = L.predict_command("/b", ["/a.nii.gz"], "/o.nii.gz", pet_refine=False)
    assert args[-1] == "--no-pet-refine"
    args = L.predict_command("/b", ["/a.nii.gz"], "/o.nii.gz", ensemble_with=["/c", "/d"])  # one ensemble
    assert args[args.index("predict") + 1: args.index("-i")] == ["-m", "/b", "/c", "/d"]


def test_request_refuses_an_unknown_precision(scene, metadata_bundle):
    ct, pet = _pet_ct(scene)
    with pytest.raises(InputError, match="precision must be one of fp32, bf16"):
        L.SegmentationRequest(bundle=str(metadata_bundle), input_nodes=[ct, pet], precision="fp16").validate()


def test_labelmap_result_for_the_segment_editor_is_on_the_source_grid(scene, metadata_bundle, fake_cli):
    logic = L.VeloxSegCoreLogic()
    ct, pet = _pet_ct(scene)
    request = L.SegmentationRequest(bundle=str(metadata_bundle), input_nodes=[ct, pet], output_kind="labelmap")
    label_node = logic.segment(request, timeout=120)
    assert label_node.IsA("vtkMRMLLabelMapVolumeNode") and V.same_geometry(label_node, ct)
    image = S.binary_oriented_image(label_node, 1)
    assert image.GetPointData().GetScalars().GetRange()[1] == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_temporary_nodes_leave_no_display_or_storage_nodes_behind(scene, metadata_bundle, fake_cli):
    logic = L.VeloxSegCoreLogic()
    ct, pet = _pet_ct(scene)  # PET on another grid: resampled through a temporary node too

    def counts():
        return {c: scene.GetNumberOfNodesByClass(c) for c in (
            "vtkMRMLScalarVolumeDisplayNode", "vtkMRMLLabelMapVolumeDisplayNode", "vtkMRMLVolumeArchetypeStorageNode",
            "vtkMRMLScalarVolumeNode")}

    before = counts()
    node = logic.segment(L.SegmentationRequest(bundle=str(metadata_bundle), input_nodes=[ct, pet]), timeout=120)
    scene.RemoveNode(node)
    assert counts() == before


def test_device_query_runs_torch_in_a_child_and_reports_json():
    pytest.importorskip("torch")
    info = L.VeloxSegCoreLogic.query_devices(timeout=120)
    assert set(info) >= {"cuda", "name", "memory_gb"} and "error" not in info
    assert isinstance(info["cuda"], bool)


def test_a_job_whose_inputs_cannot_be_written_leaves_no_temporary_folder(scene, metadata_bundle, tmp_path, monkeypatch):
    import tempfile

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    logic = L.VeloxSegCoreLogic()
    ct, pet = _pet_ct(scene)
    transform = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    import vtk

    warp = vtk.vtkThinPlateSplineTransform()  # non-linear: refused when the volumes are written
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p in ((0, 0, 0), (10, 0, 0), (0, 10, 0), (0, 0, 10)):
        source.InsertNextPoint(p)
        target.InsertNextPoint(p[0] + 1, p[1], p[2])
    warp.SetSourceLandmarks(source)
    warp.SetTargetLandmarks(target)
    transform.SetAndObserveTransformToParent(warp)
    pet.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(InputError):
        logic.start_segmentation(L.SegmentationRequest(bundle=str(metadata_bundle), input_nodes=[ct, pet]))
    assert os.listdir(temp) == []


def test_shutdown_on_scene_close_imports_nothing_and_removes_the_temporary_folder(scene, metadata_bundle, fake_cli, monkeypatch):
    """The panel shuts a running job down when the scene closes: the previous patient's result
    must never land in the next scene."""
    import time

    monkeypatch.setenv("FAKE_PREDICT_HANG", "1")
    logic = L.VeloxSegCoreLogic()
    ct, pet = _pet_ct(scene)
    done, stages = [], []
    job = logic.start_segmentation(L.SegmentationRequest(bundle=str(metadata_bundle), input_nodes=[ct, pet]),
                                   on_progress=lambda f, s, r: stages.append(s), on_done=lambda *a: done.append(a))
    deadline = time.monotonic() + 60
    while not stages and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    assert stages and job.running
    job.shutdown(timeout=30)
    assert not job.running and job.result is None and job.error == "cancelled" and done == []
    assert not os.path.exists(job.temp_dir)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_a_failure_while_importing_is_reported_not_raised(scene, metadata_bundle, fake_cli):
    logic = L.VeloxSegCoreLogic()
    ct, pet = _pet_ct(scene)
    done = []
    request = L.SegmentationRequest(bundle=str(metadata_bundle), input_nodes=[ct, pet])
    job = logic.start_segmentation(request, on_done=lambda *a: done.append(a))

    def broken(*args):
        raise AttributeError("'NoneType' object has no attribute 'AddNewNodeByClass'")

    logic.import_prediction_file = broken  # e.g. the scene went away while the network ran
    with pytest.raises(Exception, match="importing the segmentation failed"):
        job.wait(timeout=120)
    assert done == [(None, job.error)] and not os.path.exists(job.temp_dir)
