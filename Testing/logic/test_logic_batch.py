"""VeloxSegBatch.py under plain Python with slicer-core: failures are one line + exit code; end to end
with a random-weights bundle when the library can build and save one."""
import os
import subprocess
import sys

import numpy as np
import pytest
from logic_helpers import EXTENSION, ROOT, random_bundle

BATCH = os.path.join(EXTENSION, "VeloxSegBatch.py")


def run_batch(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, BATCH, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _write_pair(folder, ct_name="ct.nii.gz", pet_name="pet.nii.gz"):
    import SimpleITK as sitk

    from logic_helpers import rotation

    rng = np.random.default_rng(0)
    shape = (24, 40, 36)  # z, y, x
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    body = ((kk - 12) / 10) ** 2 + ((jj - 20) / 17) ** 2 + ((ii - 18) / 15) ** 2 < 1
    ct = sitk.GetImageFromArray((np.where(body, 40, -1000) + rng.normal(0, 5, shape)).astype(np.int16))
    pet = sitk.GetImageFromArray((np.where(body, 1.0, 0.0) + rng.normal(0, 0.05, shape)).astype(np.float32))
    for image in (ct, pet):
        image.SetSpacing((1.5, 1.2, 3.0))
        image.SetOrigin((-20.0, 10.0, 5.0))
        image.SetDirection(tuple(rotation(0, 0, 12).ravel()))
    paths = [os.path.join(folder, ct_name), os.path.join(folder, pet_name)]
    sitk.WriteImage(ct, paths[0])
    sitk.WriteImage(pet, paths[1])
    return paths


def test_missing_input_file_fails_with_one_line_and_input_exit_code(tmp_path, metadata_bundle):
    result = run_batch("--model", str(metadata_bundle), "--input", str(tmp_path / "nope_ct.nii.gz"),
                       str(tmp_path / "nope_pet.nii.gz"), "--output", str(tmp_path / "out.seg.nrrd"))
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.startswith("VeloxSegBatch")]
    assert lines == [f"VeloxSegBatch: error: no such image file: {tmp_path / 'nope_ct.nii.gz'}"]
    assert "Traceback" not in result.stderr


def test_wrong_number_of_inputs_names_the_expected_channels(tmp_path, metadata_bundle):
    ct, _ = _write_pair(str(tmp_path))
    result = run_batch("--model", str(metadata_bundle), "--input", ct, "--output", str(tmp_path / "out.seg.nrrd"))
    assert result.returncode == 2
    assert "needs 2 input(s) in this order: CT, PET" in result.stderr


def test_unknown_model_fails_with_bundle_exit_code(tmp_path):
    ct, pet = _write_pair(str(tmp_path))
    result = run_batch("--model", "no-such-model-xyz", "--input", ct, pet, "--output", str(tmp_path / "o.seg.nrrd"))
    assert result.returncode == 3 and "no-such-model-xyz" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("mode", ["in-process", "subprocess", "in-process-bf16"])
def test_batch_end_to_end_writes_seg_nrrd_with_names_and_geometry(tmp_path, session, mode):
    import slicer

    from VeloxSegLogic.segmentation import load_segmentation
    from VeloxSegLogic.volumes import ijk_to_ras, read_volume

    bundle = random_bundle(str(tmp_path / "bundle"))
    ct, pet = _write_pair(str(tmp_path))
    out = str(tmp_path / "out.seg.nrrd")
    extra = {"subprocess": ["--subprocess"], "in-process-bf16": ["--precision", "bf16"]}.get(mode, [])
    result = run_batch("--model", str(bundle), "--input", ct, pet, "--output", out, "--device", "cpu", *extra)
    assert result.returncode == 0, result.stderr
    scene = session.scene
    try:
        seg = load_segmentation(out, scene)
        segmentation = seg.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        assert names == ["lesion"]
        assert "108369006" in segmentation.GetNthSegment(0).GetTerminology()
        reference = read_volume(ct, scene)
        import vtk

        labelmap = segmentation.GetNthSegment(0).GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        image_to_world = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        assert np.allclose(image_to_world[:3, :3], ijk_to_ras(reference)[:3, :3], atol=1e-4)
        # the segmentation's geometry string is the CT grid (origin, spacing, directions, extent)
        geometry = segmentation.GetConversionParameter("Reference image geometry")
        values = [float(v) for v in geometry.split(";")[:12]]
        assert np.allclose(np.array(values).reshape(3, 4)[:, :3], ijk_to_ras(reference)[:3, :3], atol=1e-4)
    finally:
        scene.Clear(1)


@pytest.mark.parametrize("mode", ["in-process", "subprocess"])
def test_batch_segments_with_an_ensemble_bundle(tmp_path, session, mode):
    """The folds of a cross-validation packed by `veloxseg ensemble` reach Slicer as one bundle."""
    import SimpleITK as sitk

    from VeloxSegLib.cli import main
    from VeloxSegLib.infer.pipeline import predict_case
    from VeloxSegLogic.segmentation import load_segmentation

    folds = [random_bundle(str(tmp_path / f"fold{k}"), seed=k) for k in range(2)]
    ens = tmp_path / "ens"
    assert main(["ensemble", *map(str, folds), "-o", str(ens)]) == 0
    ct, pet = _write_pair(str(tmp_path))
    out = str(tmp_path / "out.seg.nrrd")
    result = run_batch("--model", str(ens), "--input", ct, pet, "--output", out, "--device", "cpu",
                       *(["--subprocess"] if mode == "subprocess" else []))
    assert result.returncode == 0, result.stderr
    scene = session.scene
    try:
        segmentation = load_segmentation(out, scene).GetSegmentation()
        assert segmentation.GetNumberOfSegments() == 1 and segmentation.GetNthSegment(0).GetName() == "lesion"
    finally:
        scene.Clear(1)
    # the same voxels as the two folds predicting together through the library
    written = sitk.GetArrayFromImage(sitk.ReadImage(out))
    expected = sitk.GetArrayFromImage(predict_case([str(f) for f in folds], [ct, pet], device="cpu").labels)
    assert int((written > 0).sum()) == int((expected > 0).sum()) > 0


@pytest.mark.parametrize("mode", ["in-process", "subprocess"])
def test_batch_averages_several_models_given_together(tmp_path, session, mode):
    """`-m A B`: two configurations (3 mm and 2 x 2 x 4 mm) predict together, as `veloxseg predict
    -m A B` does, in both of the logic's ways to run the network."""
    import SimpleITK as sitk

    from VeloxSegLib.infer.pipeline import predict_case

    coarse = random_bundle(str(tmp_path / "coarse"), seed=0)
    fine = random_bundle(str(tmp_path / "fine"), seed=1, spacing=(2.0, 2.0, 4.0))
    ct, pet = _write_pair(str(tmp_path))
    out = str(tmp_path / "out.seg.nrrd")
    result = run_batch("--model", str(coarse), str(fine), "--input", ct, pet, "--output", out, "--device", "cpu",
                       *(["--subprocess"] if mode == "subprocess" else []))
    assert result.returncode == 0, result.stderr
    written = int((sitk.GetArrayFromImage(sitk.ReadImage(out)) > 0).sum())
    both = predict_case([str(coarse), str(fine)], [ct, pet], device="cpu")
    assert both.info["networks"] == 2 and len(both.info["configurations"]) == 2
    alone = predict_case(str(coarse), [ct, pet], device="cpu")
    assert written == int((sitk.GetArrayFromImage(both.labels) > 0).sum()) > 0
    assert written != int((sitk.GetArrayFromImage(alone.labels) > 0).sum())  # the second model counted


def test_batch_refuses_models_that_cannot_predict_together(tmp_path):
    first = random_bundle(str(tmp_path / "first"), seed=0)
    other = random_bundle(str(tmp_path / "other"), seed=1,
                          labels=[{"value": 0, "name": "background"}, {"value": 1, "name": "tumour"}])
    ct, pet = _write_pair(str(tmp_path))
    out = tmp_path / "out.seg.nrrd"
    result = run_batch("--model", str(first), str(other), "--input", ct, pet, "--output", str(out), "--device", "cpu")
    assert result.returncode == 2 and f"({other}) gives other labels than model 'batch-random' ({first})" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_batch_folder_of_nnunet_cases(tmp_path, metadata_bundle):
    cases = tmp_path / "cases"
    cases.mkdir()
    _write_pair(str(cases), "a_0000.nii.gz", "a_0001.nii.gz")
    (cases / "b_0000.nii.gz").write_bytes((cases / "a_0000.nii.gz").read_bytes())
    result = run_batch("--model", str(metadata_bundle), "--input", str(cases), "--output", str(tmp_path / "out"))
    # case b lacks its PET: the whole folder is refused before anything runs
    assert result.returncode == 2 and "case 'b' needs 2 file(s)" in result.stderr


def test_batch_folder_checks_every_output_before_the_first_case_runs(tmp_path):
    bundle = random_bundle(str(tmp_path / "bundle"))
    cases = tmp_path / "cases"
    cases.mkdir()
    _write_pair(str(cases), "a_0000.nii.gz", "a_0001.nii.gz")
    _write_pair(str(cases), "b_0000.nii.gz", "b_0001.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.seg.nrrd").write_bytes(b"the user's earlier result")
    result = run_batch("--model", str(bundle), "--input", str(cases), "--output", str(out), "--device", "cpu")
    assert result.returncode == 2 and f"{out / 'b.seg.nrrd'} exists (use --overwrite)" in result.stderr
    assert sorted(os.listdir(out)) == ["b.seg.nrrd"]  # case a was not run either
    assert (out / "b.seg.nrrd").read_bytes() == b"the user's earlier result"
    result = run_batch("--model", str(bundle), "--input", str(cases), "--output", str(out), "--device", "cpu",
                       "--overwrite", "--quiet")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["a.seg.nrrd", "b.seg.nrrd"]
    assert (out / "b.seg.nrrd").read_bytes()[:4] == b"NRRD"


def test_missing_torch_points_to_the_pytorch_extension(tmp_path, metadata_bundle):
    shim = tmp_path / "shim" / "torch"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n')
    ct, pet = _write_pair(str(tmp_path))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "shim"), ROOT]))
    result = subprocess.run([sys.executable, BATCH, "--model", str(metadata_bundle), "--input", ct, pet,
                             "--output", str(tmp_path / "o.seg.nrrd")], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "missing Python package 'torch'" in result.stderr and "PyTorch extension" in result.stderr
    assert not os.path.exists(tmp_path / "o.seg.nrrd")


def test_help_exits_zero_and_a_leading_separator_is_accepted(tmp_path, metadata_bundle):
    assert run_batch("--help").returncode == 0
    result = run_batch("--", "--model", str(metadata_bundle), "--input", str(tmp_path / "a.nii.gz"),
                       str(tmp_path / "b.nii.gz"), "--output", str(tmp_path / "o.seg.nrrd"))
    assert result.returncode == 2 and "no such image file" in result.stderr


def test_batch_keeps_or_turns_off_the_models_pet_border_refinement(tmp_path, session, petct_case):
    """The real petct-lesion-demo through the batch script: by default its PET border refinement
    runs, --no-pet-refine turns it off. Slicer puts PET onto the CT grid before the library sees
    it, so each lesion volume is the library's for that setting within a few voxels, and the
    refinement moves it the same way."""
    import SimpleITK as sitk
    import slicer
    from vtk.util.numpy_support import vtk_to_numpy

    from VeloxSegLib.infer.pipeline import Segmenter
    from VeloxSegLogic.segmentation import load_segmentation

    inputs, _label = petct_case(900)
    seg = Segmenter("petct-lesion-demo", threads=2)
    expected = {flag: int((sitk.GetArrayFromImage(seg.predict(inputs, pet_refine=flag).labels) == 1).sum())
                for flag in (True, False)}
    assert expected[True] != expected[False]
    scene = session.scene
    got = {}
    for flag, extra in ((True, []), (False, ["--no-pet-refine"])):
        out = str(tmp_path / f"refine-{flag}.seg.nrrd")
        result = run_batch("--model", "petct-lesion-demo", "--input", *inputs, "--output", out, "--device", "cpu",
                           "--quiet", *extra)
        assert result.returncode == 0, result.stderr
        try:
            node = load_segmentation(out, scene)
            segment = node.GetSegmentation().GetNthSegment(0)
            assert "52988006" in segment.GetTerminology()  # the shipped model's DICOM code: Lesion
            labelmap = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
            got[flag] = int((vtk_to_numpy(labelmap.GetPointData().GetScalars()) == segment.GetLabelValue()).sum())
        finally:
            scene.Clear(1)
    for flag in (True, False):
        assert abs(got[flag] - expected[flag]) <= 0.1 * expected[flag], (got, expected)
    assert np.sign(got[True] - got[False]) == np.sign(expected[True] - expected[False]) != 0, (got, expected)
