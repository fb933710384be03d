"""The inference pipeline: geometry, alignment, cropping, padding, post-processing, files."""
import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from VeloxSegLib import build_model
from VeloxSegLib.errors import Cancelled, ConfigError, InputError
from VeloxSegLib.infer.pipeline import InferencePlan, Segmenter, find_cases, predict_case, predict_files, predict_folder

ROT_Z90 = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
OBLIQUE = tuple(sitk.VersorTransform((0.1, 0.2, 0.9), 0.3).GetMatrix())


class PetThreshold(torch.nn.Module):
    """Stand-in network: class 1 where the normalized PET (channel 1) exceeds 1."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:2] - 1.0], 1)


def _plan(**kw):
    base = dict(
        patch_size=(32, 32, 32), spacing=(2.0, 2.0, 2.0),
        channels=[{"name": "CT", "normalization": {"scheme": "ct", "clip": [-1000, 600], "mean": 0, "std": 100}},
                  {"name": "PET", "normalization": {"scheme": "pet_zscore_body"}}],
        labels=[{"value": 0, "name": "background"}, {"value": 1, "name": "lesion"}])
    base.update(kw)
    return InferencePlan(**base)


def _ct(shape=(40, 60, 70), spacing=(1.5, 1.5, 2.5), origin=(-50.0, -40.0, 10.0), direction=None):
    arr = np.full(shape, -1000, np.int16)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    body = ((y - shape[1] / 2) / (shape[1] * 0.35)) ** 2 + ((x - shape[2] / 2) / (shape[2] * 0.4)) ** 2 <= 1
    arr[:, body[0]] = 40
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction:
        img.SetDirection(direction)
    return img


def _pet_with_blob(ct, point, shape=(30, 30, 30), spacing=(3.0, 3.0, 3.0), origin=None, direction=None, r=1):
    """A PET grid covering the CT centre with uniform body uptake and a hot blob at ``point``."""
    img = sitk.Image([shape[2], shape[1], shape[0]], sitk.sitkFloat32)
    img.SetSpacing(spacing)
    if direction:
        img.SetDirection(direction)
    if origin is None:  # centre the PET on the CT
        c_ct = np.array(ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ct.GetSize()]))
        img.SetOrigin((0, 0, 0))
        c_pet = np.array(img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()]))
        origin = tuple(c_ct - c_pet)
    img.SetOrigin(origin)
    arr = np.zeros(shape, np.float32)
    arr[2:-2, 2:-2, 2:-2] = 1.0  # body uptake; the minimum (0) is outside the body
    i, j, k = img.TransformPhysicalPointToIndex(point)
    arr[k - r:k + r + 1, j - r:j + r + 1, i - r:i + r + 1] = 50.0
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out, np.array(img.TransformIndexToPhysicalPoint((i, j, k)))


def _label_centroid(labels):
    arr = sitk.GetArrayViewFromImage(labels)
    zyx = np.argwhere(arr == 1).mean(axis=0)
    return np.array(labels.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]]))


def _same_geometry_exactly(a, b):
    return (a.GetSize() == b.GetSize() and a.GetOrigin() == b.GetOrigin() and a.GetSpacing() == b.GetSpacing()
            and a.GetDirection() == b.GetDirection())


@pytest.mark.parametrize("pet_grid", [
    dict(spacing=(4.0, 4.0, 4.0), shape=(20, 25, 25)),                      # coarser grid
    dict(spacing=(3.0, 3.0, 3.0), shape=(20, 20, 20), origin=(-30.0, -25.0, 30.0)),  # shifted, partial FOV
    dict(spacing=(3.0, 3.0, 3.0), shape=(30, 30, 30), direction=ROT_Z90),   # another orientation
], ids=["coarser", "shifted", "rotated"])
def test_pet_lesion_lands_where_it_belongs_on_the_ct_grid(pet_grid):
    ct = _ct()
    point = (-5.0, 2.0, 60.0)
    pet, centre = _pet_with_blob(ct, point, **pet_grid)
    labels, _ = predict_case(PetThreshold(), [ct, pet], plan=_plan())
    assert _same_geometry_exactly(labels, ct)
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert np.linalg.norm(_label_centroid(labels) - centre) < 2.0
    idx = ct.TransformPhysicalPointToIndex(tuple(centre))
    assert sitk.GetArrayViewFromImage(labels)[idx[2], idx[1], idx[0]] == 1


@pytest.mark.parametrize("spacing", [(2.0, 2.0, 2.0), (1.5, 1.5, 2.5), None])
def test_output_geometry_equals_the_reference_input_exactly(spacing):
    ct = _ct(shape=(37, 51, 45), spacing=(1.37, 0.93, 2.41), origin=(-17.3, 81.1, -402.7), direction=OBLIQUE)
    pet, _ = _pet_with_blob(ct, ct.TransformContinuousIndexToPhysicalPoint((22.0, 25.0, 18.0)),
                            spacing=(2.5, 2.5, 2.5))
    result = predict_case(PetThreshold(), [ct, pet], plan=_plan(spacing=spacing), probabilities=True)
    assert _same_geometry_exactly(result.labels, ct)
    assert _same_geometry_exactly(result.probabilities, ct)
    assert result.probabilities.GetNumberOfComponentsPerPixel() == 2
    p = sitk.GetArrayViewFromImage(result.probabilities)
    assert np.allclose(p.sum(-1), 1.0, atol=1e-5)
    lab = sitk.GetArrayViewFromImage(result.labels)
    assert np.array_equal(lab, (p[..., 1] > p[..., 0]).astype(np.uint8))  # resampled or not
    assert 0 < np.count_nonzero(lab) < lab.size


class PetBands(torch.nn.Module):
    """Stand-in 3-class network on un-normalized PET x: class 0 where x < 1, 1 where 1 < x < 3,
    2 where x > 3 (logits 0, x - 1, 2 (x - 2))."""

    def forward(self, x):
        pet = x[:, 1:2]
        return torch.cat([torch.zeros_like(pet), pet - 1.0, 2.0 * (pet - 2.0)], 1)


def _radial_case(spacing=1.0, n=48, slope=0.1, peak=2.0):
    """CT (flat body) and PET = peak - slope * r (r in mm from the centre) on one grid."""
    z, y, x = (np.indices((n, n, n)) - (n - 1) / 2) * spacing
    r = np.sqrt(x * x + y * y + z * z)
    imgs = []
    for arr in (np.full((n, n, n), 40, np.float32), (peak - slope * r).astype(np.float32)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((spacing,) * 3)
        img.SetOrigin((-(n - 1) / 2 * spacing,) * 3)
        imgs.append(img)
    return imgs, r


def _plain_plan(spacing, labels=2, **kw):
    return _plan(spacing=spacing, crop_to_body=False,
                 channels=[{"name": "CT", "normalization": {"scheme": "none"}},
                           {"name": "PET", "normalization": {"scheme": "none"}}],
                 labels=[{"value": v, "name": f"c{v}"} for v in range(labels)], **kw)


def _dice(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_a_coarser_working_grid_gives_smooth_boundaries_on_the_reference_grid():
    """The network runs on a 4 mm grid; its probabilities are resampled onto the 1 mm input
    before the arg-max, so the boundary lands within a millimetre of where the
    network puts it (PET = 1 at r = 10 mm), not on the 4 mm staircase that putting the 4 mm
    labels back by nearest neighbour gives (computed here with SimpleITK as the peer)."""
    (ct, pet), r = _radial_case()
    truth = r < 10.0
    result = predict_case(PetThreshold(), [ct, pet], plan=_plain_plan((4.0, 4.0, 4.0)))
    assert result.info["resampled"] and result.info["working_spacing"] == (4.0, 4.0, 4.0)
    ours = sitk.GetArrayFromImage(result.labels).astype(bool)
    # the peer: the same network on the 4 mm grid itself, put back by nearest neighbour
    coarse = [sitk.Resample(img, [12] * 3, sitk.Transform(), sitk.sitkLinear, (-22.0,) * 3, (4.0,) * 3)
              for img in (ct, pet)]
    coarse_labels = predict_case(PetThreshold(), coarse, plan=_plain_plan(None)).labels
    nearest = sitk.GetArrayFromImage(sitk.Resample(coarse_labels, ct, sitk.Transform(), sitk.sitkNearestNeighbor))
    d_ours, d_nearest = _dice(ours, truth), _dice(nearest.astype(bool), truth)
    assert d_ours > 0.94 and d_nearest < d_ours - 0.05, (d_ours, d_nearest)
    # every voxel whose centre is over 1 mm from the r = 10 mm sphere is on its right side
    assert np.array_equal(ours[np.abs(r - 10.0) > 1.0], truth[np.abs(r - 10.0) > 1.0])


def test_several_classes_are_decided_after_resampling():
    (ct, pet), r = _radial_case(peak=5.0, slope=0.2)  # x > 3 for r < 10 mm, x > 1 for r < 20 mm
    result = predict_case(PetBands(), [ct, pet], plan=_plain_plan((3.0, 3.0, 3.0), labels=3), probabilities=True)
    lab = sitk.GetArrayViewFromImage(result.labels)
    p = sitk.GetArrayViewFromImage(result.probabilities)
    assert np.array_equal(lab, np.argmax(p, axis=-1))
    away = (np.abs(r - 10.0) > 1.0) & (np.abs(r - 20.0) > 1.0)
    want = np.where(r < 10.0, 2, np.where(r < 20.0, 1, 0))
    assert np.array_equal(lab[away], want[away])
    # without probabilities the labels are the same (float16 maps instead of float32)
    alone = predict_case(PetBands(), [ct, pet], plan=_plain_plan((3.0, 3.0, 3.0), labels=3))
    assert np.count_nonzero(sitk.GetArrayViewFromImage(alone.labels) != lab) <= 0.001 * lab.size


@pytest.mark.parametrize("direction", [None, OBLIQUE], ids=["axes", "oblique"])
def test_resampling_probabilities_in_slabs_equals_one_pass(direction):
    from VeloxSegLib.data.alignment import Grid
    from VeloxSegLib.infer.postprocess import probabilities_to_grid

    rng = np.random.default_rng(0)
    source = Grid((14, 11, 9), (3.0, -7.0, 20.0), (3.0, 3.5, 4.0), direction or (1, 0, 0, 0, 1, 0, 0, 0, 1))
    target = source.with_spacing((1.1, 1.3, 0.9))
    raw = torch.from_numpy(rng.random((3,) + source.shape).astype(np.float32))
    probs = raw / raw.sum(0, keepdim=True)
    out = {}
    for max_voxels in (1 << 30, 1, 500):  # one slab; one z-slice per slab; a few slices per slab
        lab = np.full(target.shape, 9, np.uint8)
        pr = np.full(target.shape + (3,), -1.0, np.float32)
        probabilities_to_grid(probs, source, target, 3, lab, pr, max_voxels=max_voxels)
        out[max_voxels] = (lab, pr)
    lab, pr = out[1 << 30]
    assert set(np.unique(lab)) <= {0, 1, 2} and np.array_equal(lab, np.argmax(pr, -1))
    assert np.allclose(pr.sum(-1), 1.0, atol=1e-5)
    # the peer: SimpleITK resampling each whole map at once
    img = source.stamp(sitk.GetImageFromArray(probs[1].numpy()))
    whole = sitk.GetArrayFromImage(sitk.Resample(img, [int(s) for s in target.size], sitk.Transform(),
                                                 sitk.sitkLinear, target.origin, target.spacing, target.direction,
                                                 0.0, sitk.sitkFloat32))
    assert np.allclose(pr[..., 1], whole, atol=1e-6)
    for other in (1, 500):
        assert np.array_equal(out[other][0], lab) and np.allclose(out[other][1], pr, atol=1e-6)


def test_volume_smaller_than_a_window_is_padded_not_rejected():
    ct = _ct(shape=(10, 20, 24), spacing=(2.0, 2.0, 2.0))
    pet, centre = _pet_with_blob(ct, ct.TransformContinuousIndexToPhysicalPoint((12.0, 10.0, 5.0)),
                                 shape=(10, 20, 24), spacing=(2.0, 2.0, 2.0))
    result = predict_case(PetThreshold(), [ct, pet], plan=_plan(patch_size=(32, 32, 32)))
    assert _same_geometry_exactly(result.labels, ct)
    assert result.info["windows_total"] == 1
    assert np.linalg.norm(_label_centroid(result.labels) - centre) < 1.0


def test_air_is_cropped_and_empty_windows_are_not_run():
    ct = _ct(shape=(60, 100, 100), spacing=(2.0, 2.0, 2.0))
    arr = sitk.GetArrayFromImage(ct)
    arr[:] = -1000
    arr[5:25, 10:40, 10:40] = 40  # a small body in one corner
    ct2 = sitk.GetImageFromArray(arr)
    ct2.CopyInformation(ct)
    pet, _ = _pet_with_blob(ct2, ct2.TransformContinuousIndexToPhysicalPoint((25.0, 25.0, 15.0)),
                            shape=(60, 100, 100), spacing=(2.0, 2.0, 2.0), origin=ct.GetOrigin())
    cropped = predict_case(PetThreshold(), [ct2, pet], plan=_plan())
    full = predict_case(PetThreshold(), [ct2, pet], plan=_plan(), crop_to_body=False)
    assert cropped.info["windows_run"] < full.info["windows_run"]
    assert np.array_equal(sitk.GetArrayViewFromImage(cropped.labels), sitk.GetArrayViewFromImage(full.labels))


def _two_hot_cubes(big, small):
    """A 40 mm CT and PET at 1 mm with hot cubes over the index ranges ``big`` and ``small``
    (start, stop) on every axis."""
    ct = _ct(shape=(40, 40, 40), spacing=(1.0, 1.0, 1.0))
    pet = np.zeros((40, 40, 40), np.float32)
    pet[1:-1, 1:-1, 1:-1] = 1.0
    for a, b in (big, small):
        pet[a:b, a:b, a:b] = 50
    peti = sitk.GetImageFromArray(pet)
    peti.CopyInformation(ct)
    return ct, peti


def test_small_components_are_removed_by_volume():
    ct, peti = _two_hot_cubes((5, 15), (30, 32))  # 1000 and 8 mm^3
    plan = _plan(spacing=(1.0, 1.0, 1.0), crop_to_body=False)
    keep = sitk.GetArrayFromImage(predict_case(PetThreshold(), [ct, peti], plan=plan).labels)
    assert np.count_nonzero(keep) == 1008
    drop = sitk.GetArrayFromImage(predict_case(PetThreshold(), [ct, peti], plan=plan, min_component_mm3=50).labels)
    assert np.count_nonzero(drop) == 1000


def test_small_components_are_measured_on_the_output_grid_after_resampling():
    ct, peti = _two_hot_cubes((4, 16), (26, 32))  # 1728 and 216 mm^3
    plan = _plan(spacing=(2.5, 2.5, 2.5), crop_to_body=False)

    def components(labels):  # component sizes in output voxels, largest first
        cc = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(labels, True)))
        return np.bincount(cc.ravel())[1:].tolist()

    keep = predict_case(PetThreshold(), [ct, peti], plan=plan).labels
    assert keep.GetSpacing() == (1.0, 1.0, 1.0)
    big, small = components(keep)
    assert 1500 < big < 2300 and 300 < small < 600  # the two cubes, in 1 mm voxels (grown by the stand-in)
    # the threshold falls exactly at the small cube's size in 1 mm^3 output voxels (on the 2.5 mm
    # working grid it would be counted in 15.6 mm^3 voxels, which do not map to whole output voxels)
    at = predict_case(PetThreshold(), [ct, peti], plan=plan, min_component_mm3=small).labels
    assert components(at) == [big, small]
    above = predict_case(PetThreshold(), [ct, peti], plan=plan, min_component_mm3=small + 0.5).labels
    assert components(above) == [big]


def test_mirror_tta_of_a_flip_invariant_network_changes_nothing():
    ct = _ct()
    pet, _ = _pet_with_blob(ct, (-5.0, 2.0, 60.0))
    a = predict_case(PetThreshold(), [ct, pet], plan=_plan()).labels
    b = predict_case(PetThreshold(), [ct, pet], plan=_plan(), tta=True, blending="gaussian").labels
    assert np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


class _CountingNet(torch.nn.Module):
    """PetThreshold that records the input of every forward pass."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return PetThreshold()(x)


@pytest.mark.parametrize("axes,passes", [(("z",), 2), (("x", "z"), 4), (("x", "y", "z"), 8)])
def test_mirror_tta_runs_only_the_flips_of_the_plans_axes(axes, passes):
    ct = _ct()
    pet, _ = _pet_with_blob(ct, (-5.0, 2.0, 60.0))
    plain, net = _CountingNet(), _CountingNet()
    predict_case(plain, [ct, pet], plan=_plan(crop_to_body=False))
    predict_case(net, [ct, pet], plan=_plan(tta_axes=axes, crop_to_body=False), tta=True)
    assert len(net.inputs) == passes * len(plain.inputs)
    # every pass of a window is the window mirrored along a combination of exactly these axes
    window = plain.inputs[0]
    dims = {"z": 2, "y": 3, "x": 4}
    seen = set()
    for x in net.inputs[:passes]:
        match = [f for f in _subsets([dims[a] for a in axes]) if torch.equal(x, torch.flip(window, f) if f else window)]
        assert match, "a pass is not a flip of the window along the plan's axes"
        seen.add(match[0])
    assert len(seen) == passes


def _subsets(dims):
    out = [()]
    for d in dims:
        out += [s + (d,) for s in out]
    return out


def test_mirror_tta_averages_the_flipped_predictions():
    from VeloxSegLib.infer.pipeline import _WindowPredictor

    torch.manual_seed(0)
    net = torch.nn.Conv3d(2, 2, 3, padding=1).eval()  # not flip-invariant
    x = torch.randn(1, 2, 8, 10, 12)
    with torch.no_grad():
        z_only = _WindowPredictor(net, torch.device("cpu"), tta=True, max_batch=1, tta_axes=("z",))(x)
        every = _WindowPredictor(net, torch.device("cpu"), tta=True, max_batch=1, tta_axes=("x", "y", "z"))(x)
        expect_z = (net(x) + torch.flip(net(torch.flip(x, (2,))), (2,))) / 2
        expect_all = sum(torch.flip(net(torch.flip(x, d)), d) if d else net(x) for d in _subsets([2, 3, 4])) / 8
    assert torch.allclose(z_only, expect_z, atol=1e-6) and torch.allclose(every, expect_all, atol=1e-6)
    assert not torch.allclose(z_only, every, atol=1e-3)


def test_tta_axes_are_checked_and_overridable_per_call():
    with pytest.raises(ConfigError, match="TTA axes must be distinct axes out of x, y, z; got w"):
        _plan(tta_axes=("w",))
    with pytest.raises(ConfigError, match="got z, z"):
        _plan(tta_axes=("z", "z"))
    assert _plan(tta_axes=("z", "x")).tta_axes == ("x", "z")
    ct = _ct()
    pet, _ = _pet_with_blob(ct, (-5.0, 2.0, 60.0))
    net = _CountingNet()
    predict_case(net, [ct, pet], plan=_plan(crop_to_body=False), tta=True, tta_axes=("y", "z"))
    n_windows = len(net.inputs) // 4
    net.inputs.clear()
    predict_case(net, [ct, pet], plan=_plan(crop_to_body=False), tta=True)  # the plan's default: z
    assert len(net.inputs) == 2 * n_windows
    with pytest.warns(UserWarning, match="records no mirror axes"):
        predict_case(PetThreshold(), [ct, pet], plan=_plan(tta_axes=()), tta=True)


def test_wrong_number_of_inputs_prints_the_expected_order():
    with pytest.raises(InputError, match=r"expects 2 input image\(s\) in this order: 1\) CT, 2\) PET; got 1"):
        predict_case(PetThreshold(), [_ct()], plan=_plan())


def test_non_overlapping_modalities_are_rejected():
    ct = _ct()
    pet, _ = _pet_with_blob(ct, (-5.0, 2.0, 60.0))
    pet.SetOrigin((1000.0, 0.0, 0.0))
    with pytest.raises(InputError, match="does not overlap"):
        predict_case(PetThreshold(), [ct, pet], plan=_plan())


def test_in_memory_inputs_are_not_modified():
    ct = _ct()
    pet, _ = _pet_with_blob(ct, (-5.0, 2.0, 60.0))
    before = [sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(pet)]
    predict_case(PetThreshold(), [ct, pet], plan=_plan())
    assert np.array_equal(sitk.GetArrayViewFromImage(ct), before[0])
    assert np.array_equal(sitk.GetArrayViewFromImage(pet), before[1])


def test_progress_reports_stages_in_order_and_cancel_stops():
    ct = _ct()
    pet, _ = _pet_with_blob(ct, (-5.0, 2.0, 60.0))
    seen = []
    predict_case(PetThreshold(), [ct, pet], plan=_plan(), progress=lambda s, f: seen.append((s, f)))
    stages = [s for s, _ in seen]
    assert stages.index("read") < stages.index("preprocess") < stages.index("predict") < stages.index("postprocess")
    assert all(0.0 <= f <= 1.0 for _, f in seen) and ("predict", 1.0) in seen
    ev = threading.Event()

    def cancel_on_predict(stage, fraction):
        if stage == "predict":
            ev.set()

    with pytest.raises(Cancelled):
        predict_case(PetThreshold(), [ct, pet], plan=_plan(), progress=cancel_on_predict, cancel=ev)


def test_an_empty_scan_gives_an_empty_segmentation():
    ct = _ct()
    air = sitk.GetImageFromArray(np.full(sitk.GetArrayViewFromImage(ct).shape, -1000, np.int16))
    air.CopyInformation(ct)
    pet = sitk.GetImageFromArray(np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.float32))
    pet.CopyInformation(ct)
    result = predict_case(PetThreshold(), [air, pet], plan=_plan())
    assert result.info["windows_run"] == 0
    assert _same_geometry_exactly(result.labels, ct) and sitk.GetArrayViewFromImage(result.labels).max() == 0


def _write_case(folder, case="case", ct=None):
    ct = ct or _ct()
    pet, _ = _pet_with_blob(ct, (-5.0, 2.0, 60.0))
    paths = [folder / f"{case}_0000.nii.gz", folder / f"{case}_0001.nii.gz"]
    sitk.WriteImage(ct, str(paths[0]), True)
    sitk.WriteImage(pet, str(paths[1]), True)
    return paths


def test_predict_files_writes_labels_and_probabilities_atomically(tmp_path):
    inputs = _write_case(tmp_path)
    before = [p.read_bytes() for p in inputs]
    out, prob = tmp_path / "seg.nii.gz", tmp_path / "prob.nii.gz"
    predict_files(PetThreshold(), inputs, out, probabilities_path=prob, plan=_plan())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_0000.nii.gz", "case_0001.nii.gz",
                                                          "prob.nii.gz", "seg.nii.gz"]
    assert [p.read_bytes() for p in inputs] == before
    seg = sitk.ReadImage(str(out))
    assert _same_geometry_exactly(seg, sitk.ReadImage(str(inputs[0])))
    with pytest.raises(InputError, match="exists"):
        predict_files(PetThreshold(), inputs, out, plan=_plan())


def test_predict_files_cancelled_leaves_no_file(tmp_path):
    inputs = _write_case(tmp_path)
    with pytest.raises(Cancelled):
        predict_files(PetThreshold(), inputs, tmp_path / "seg.nii.gz", plan=_plan(), cancel=lambda: True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_0000.nii.gz", "case_0001.nii.gz"]


def test_predict_folder_runs_every_nnunet_case(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _write_case(src, "a")
    _write_case(src, "b")
    seg = Segmenter(PetThreshold(), _plan())
    results = predict_folder(seg, src, tmp_path / "out")
    assert sorted(results) == ["a", "b"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "b.nii.gz"]


def test_incomplete_nnunet_case_names_the_missing_channel(tmp_path):
    _write_case(tmp_path, "a")
    (tmp_path / "a_0001.nii.gz").unlink()
    with pytest.raises(InputError, match=r"case 'a' needs 2 file\(s\): a_0000 \(CT\), a_0001 \(PET\)"):
        find_cases(tmp_path, 2, ["CT", "PET"])


class _OomNet(torch.nn.Module):
    """Pretends to run out of accelerator memory for batches larger than ``limit`` (or always
    when ``limit`` is 0) on a non-CPU device; answers on the CPU."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit
        self.calls = []

    def forward(self, x):
        self.calls.append((x.device.type, x.shape[0]))
        if x.device.type != "cpu" and x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.zeros((x.shape[0], 2) + tuple(x.shape[2:]))


def test_out_of_memory_halves_the_window_batch():
    from VeloxSegLib.infer.pipeline import _WindowPredictor

    net = _OomNet(limit=1)
    pred = _WindowPredictor(net, torch.device("meta"), tta=False, max_batch=4)
    out = pred(torch.zeros(4, 2, 8, 8, 8))
    assert out.shape == (4, 2, 8, 8, 8) and pred.max_batch == 1 and not pred.fell_back
    assert [b for _, b in net.calls] == [4, 2, 1, 1, 1, 1]


def test_out_of_memory_at_one_window_falls_back_to_cpu_with_a_warning():
    from VeloxSegLib.infer.pipeline import _WindowPredictor

    net = _OomNet(limit=0)
    pred = _WindowPredictor(net, torch.device("meta"), tta=False, max_batch=2)
    with pytest.warns(UserWarning, match="continuing on the CPU"):
        out = pred(torch.zeros(2, 2, 8, 8, 8))
    assert out.shape == (2, 2, 8, 8, 8) and pred.fell_back and pred.device.type == "cpu"
    assert net.calls[-1] == ("cpu", 1)


def test_other_errors_are_not_swallowed():
    from VeloxSegLib.infer.pipeline import _WindowPredictor

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        _WindowPredictor(Broken(), torch.device("meta"), tta=False, max_batch=2)(torch.zeros(2, 2, 8, 8, 8))


def test_seg_nrrd_output_names_and_colors_the_segments(tmp_path):
    inputs = _write_case(tmp_path)
    out = tmp_path / "seg.seg.nrrd"
    plan = _plan(labels=[{"value": 0, "name": "background"},
                         {"value": 1, "name": "lesion", "color": [255, 0, 0]}])
    predict_files(PetThreshold(), inputs, out, plan=plan)
    seg = sitk.ReadImage(str(out))
    assert seg.GetMetaData("Segment0_Name") == "lesion"
    assert seg.GetMetaData("Segment0_LabelValue") == "1"
    assert seg.GetMetaData("Segment0_Color") == "1 0 0"
    assert seg.GetPixelID() == sitk.sitkUInt8


def test_seg_nrrd_output_opens_as_a_slicer_segmentation(tmp_path):
    slicer = pytest.importorskip("slicer")
    inputs = _write_case(tmp_path)
    out = tmp_path / "seg.seg.nrrd"
    plan = _plan(labels=[{"value": 0, "name": "background"}, {"value": 1, "name": "lesion", "color": [0, 255, 0]}])
    predict_files(PetThreshold(), inputs, out, plan=plan)
    scene = slicer.vtkMRMLScene()
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage.SetFileName(str(out))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment = segmentation.GetNthSegment(0)
    assert segment.GetName() == "lesion" and tuple(segment.GetColor()) == (0.0, 1.0, 0.0)


def test_plan_from_bundle_meta_takes_the_inference_defaults():
    meta = {
        "name": "m", "model": {"name": "veloxseg-b", "in_channels": [1, 1], "num_classes": 2, "patch_size": [64, 96, 96]},
        "spacing": [2.0, 2.0, 3.0],
        "channels": [{"name": "CT", "normalization": {"scheme": "ct", "clip": [-1000, 600], "mean": 0, "std": 1}},
                     {"name": "PET", "normalization": {"scheme": "pet_zscore_body"}}],
        "labels": [{"value": 0, "name": "background"}, {"value": 1, "name": "lesion"}],
        "inference": {"overlap": 0.5, "blending": "gaussian", "tta": True, "min_component_mm3": 10.0,
                      "crop_to_body": False},
    }
    plan = InferencePlan.from_meta(meta)
    assert plan.patch_size == (64, 96, 96) and plan.spacing == (2.0, 2.0, 3.0)
    assert (plan.overlap, plan.blending, plan.tta, plan.min_component_mm3, plan.crop_to_body) == \
        (0.5, "gaussian", True, 10.0, False)
    assert plan.channel_names == ["CT", "PET"] and plan.num_classes == 2
    assert plan.expected_inputs() == "1) CT, 2) PET"
    assert plan.tta_axes == ("z",)  # bundles without the field: our trainer's z-flip
    meta["inference"]["tta_axes"] = ["y", "z"]
    assert InferencePlan.from_meta(meta).tta_axes == ("y", "z")


# --------------------------------------------------------------------------- opt-in CPU bfloat16


@pytest.fixture(scope="module")
def demo_case(petct_case):
    return petct_case(905)


def test_bf16_segments_like_fp32(demo_case):
    """The shipped PET/CT demo in bf16 gives (nearly) the fp32 segmentation of a phantom."""
    from VeloxSegLib.bundle import embedded_bundles_dir
    from VeloxSegLib.metrics import dice_score

    images, _ = demo_case
    bundle = str(embedded_bundles_dir() / "petct-lesion-demo")
    ref = Segmenter(bundle, device="cpu", threads=1).predict(images, probabilities=True)
    seg = Segmenter(bundle, device="cpu", threads=1, precision="bf16")
    assert next(seg.model.parameters()).dtype == torch.bfloat16
    got = seg.predict(images, probabilities=True)
    a, b = sitk.GetArrayFromImage(ref.labels), sitk.GetArrayFromImage(got.labels)
    assert (a == 1).sum() > 100 and dice_score(a == 1, b == 1) > 0.98  # measured: 1.000 on 557 voxels
    pa, pb = sitk.GetArrayFromImage(ref.probabilities), sitk.GetArrayFromImage(got.probabilities)
    assert pb.dtype == np.float32 and np.abs(pa - pb).max() < 0.08 and np.abs(pa - pb).mean() < 1e-4


def test_bf16_fast_and_plain_paths_stay_close_to_fp32():
    from VeloxSegLib.model import set_fast_path

    torch.manual_seed(0)
    net = build_model("veloxseg-b", in_channels=(1, 1), num_classes=2, patch_size=(64, 64, 64)).eval()
    x = torch.randn(1, 2, 64, 64, 64)
    with torch.inference_mode():
        ref = net(x)
        scale = ref.abs().max().item()
        bf = net.to(torch.bfloat16)
        for fast in (True, False):
            y = set_fast_path(bf, fast)(x.to(torch.bfloat16)).float()
            assert (y - ref).abs().max().item() < 0.05 * scale, fast
            assert (y.argmax(1) == ref.argmax(1)).float().mean().item() > 0.97, fast


def test_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16"):
        Segmenter(torch.nn.Identity(), _plan(), precision="fp16")


MRI_CHANNELS = ["T1", "T1ce", "T2", "FLAIR"]


def _mri_plan():
    return InferencePlan(patch_size=(32, 32, 32), spacing=(2.0, 2.0, 2.0), name="mri",
                         channels=[{"name": n, "normalization": {"scheme": "zscore_nonzero"}} for n in MRI_CHANNELS],
                         labels=[{"value": 0, "name": "background"}, {"value": 1, "name": "tumour"}])


def test_inputs_whose_names_give_another_order_are_refused_before_reading(tmp_path):
    files = [tmp_path / f"BraTS2021_00001_{c}.nii.gz" for c in ("t2", "t1", "t1ce", "flair")]  # none exists
    with pytest.raises(InputError, match=r"input 1 \(T1\) is '.*_t2\.nii\.gz', named like T2; input 2 \(T1ce\) is "
                                         r"'.*_t1\.nii\.gz', named like T1; .*in this order: 1\) T1, 2\) T1ce, 3\) T2"):
        Segmenter(PetThreshold(), _mri_plan(), device="cpu").predict(files)


@pytest.mark.parametrize("names", [
    ("BraTS2021_00001_t1", "BraTS2021_00001_t1ce", "BraTS2021_00001_t2", "BraTS2021_00001_flair"),
    ("BraTS-GLI-00001-000-t1n", "BraTS-GLI-00001-000-t1c", "BraTS-GLI-00001-000-t2w", "BraTS-GLI-00001-000-t2f"),
    ("case_0000", "case_0001", "case_0002", "case_0003"),
    ("3 T1 AX SE", "5 T1 AX post contrast", "4 T2 AX FSE", "6 T2 FLAIR AX"),  # Slicer's DICOM volume names
], ids=["brats2021", "brats2023", "nnunet", "series-descriptions"])
def test_inputs_named_in_the_models_order_or_without_contrast_names_pass(names):
    from VeloxSegLib.infer.checks import input_order_problems

    assert input_order_problems([f"/data/{n}.nii.gz" for n in names], MRI_CHANNELS) == (False, [])


def test_only_some_inputs_named_out_of_order_give_a_warning(tmp_path, caplog):
    from VeloxSegLib.infer.checks import input_order_problems

    certain, problems = input_order_problems(["a_flair.nii.gz", "b.nii.gz", "c.nii.gz", "d.nii.gz"], MRI_CHANNELS)
    assert not certain and problems == ["input 1 (T1) is 'a_flair.nii.gz', named like FLAIR"]
    files = []
    for i, name in enumerate(("a_flair", "b", "c", "d")):
        img = _ct()
        files.append(tmp_path / f"{name}.nii.gz")
        sitk.WriteImage(img, str(files[-1]))
    with caplog.at_level("WARNING"):
        Segmenter(PetThreshold(), _mri_plan(), device="cpu").predict(files)
    assert "check the order of the inputs: input 1 (T1) is" in caplog.text and "named like FLAIR" in caplog.text
