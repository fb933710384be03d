"""Array orientation: the same scan stored with its axes reversed or swapped is the same scan."""
import itertools

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from VeloxSegLib.data.alignment import Grid
from VeloxSegLib.data.orientation import AxisOrder
from VeloxSegLib.infer.pipeline import InferencePlan, Segmenter

STORAGES = {  # (stored axis along world L, P, S), (runs against it)
    "LPS": ((0, 1, 2), (False, False, False)),
    "RAS": ((0, 1, 2), (True, True, False)),        # nibabel / MONAI NIfTI
    "LAS": ((0, 1, 2), (False, True, False)),       # dcm2niix
    "SLP-swapped": ((1, 2, 0), (False, True, True)),  # axes stored in another order, two reversed
}


def restored(img, perm, flip, interpolator=sitk.sitkNearestNeighbor):
    """``img`` (identity direction) stored another way: the same voxels at the same physical points."""
    size, spacing, origin = [0] * 3, [0.0] * 3, np.array(img.GetOrigin(), float)
    d = np.zeros((3, 3))
    for k in range(3):
        a = perm[k]
        size[a], spacing[a] = img.GetSize()[k], img.GetSpacing()[k]
        d[k, a] = -1.0 if flip[k] else 1.0
        if flip[k]:
            origin[k] += (img.GetSize()[k] - 1) * img.GetSpacing()[k]
    ref = sitk.Image(size, img.GetPixelID())
    ref.SetSpacing(spacing)
    ref.SetDirection(d.ravel().tolist())
    ref.SetOrigin(origin.tolist())
    return sitk.Resample(img, ref, sitk.Transform(), interpolator)


def back_on(img, like):
    """``img`` on ``like``'s grid (exact: the grids share their voxel centres)."""
    return sitk.GetArrayFromImage(sitk.Resample(img, like, sitk.Transform(), sitk.sitkNearestNeighbor))


def test_axis_order_turns_every_storage_back_to_the_same_array():
    rng = np.random.default_rng(0)
    arr = rng.random((5, 6, 7)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 2.0, 3.0))
    for perm in itertools.permutations(range(3)):
        for flip in itertools.product((False, True), repeat=3):
            stored = restored(img, perm, flip)
            order = AxisOrder.of_direction(stored.GetDirection())
            assert (order.perm, order.flip) == (perm, flip)
            s = sitk.GetArrayFromImage(stored)
            assert np.array_equal(order.to_canonical(s), arr)
            assert np.array_equal(order.to_stored(order.to_canonical(s)), s)
            t = torch.from_numpy(s)[None, None]  # leading axes stay where they are
            assert torch.equal(order.to_canonical(t)[0, 0], torch.from_numpy(arr))
            assert torch.equal(order.to_stored(order.to_canonical(t)), t)
            assert order.canonical_shape(s.shape) == arr.shape
            assert order.canonical_vector(stored.GetSpacing()) == (1.0, 2.0, 3.0)
            assert order.stored_vector((1.0, 2.0, 3.0)) == stored.GetSpacing()


def test_an_oblique_direction_takes_the_nearest_axes():
    # RAS storage, then tilted 25 degrees about z: still x ~ R, y ~ A
    tilt = np.array(sitk.VersorTransform((0, 0, 1), np.radians(25)).GetMatrix()).reshape(3, 3)
    d = tilt @ np.diag([-1.0, -1.0, 1.0])
    order = AxisOrder.of_direction(d.ravel())
    assert order.perm == (0, 1, 2) and order.flip == (True, True, False)
    # a sagittal acquisition: stored x runs along P, y along -S (rows go down), z along L
    sag = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)
    order = AxisOrder.of_direction(sag.ravel())
    assert order.perm == (2, 0, 1) and order.flip == (False, False, True)


def test_a_new_spacing_samples_the_same_points_however_the_box_is_stored():
    img = sitk.Image([37, 29, 23], sitk.sitkFloat32)  # 37 x 1.5 mm = 55.5 mm: not a whole number of 2 mm
    img.SetSpacing((1.5, 1.5, 2.5))
    img.SetOrigin((-20.0, 11.0, 3.0))
    fine = Grid.of(img).with_spacing((2.0, 2.0, 2.0))
    want = {tuple(np.round(p, 6)) for p in fine.index_to_physical(np.argwhere(np.ones(fine.size, bool)))}
    for name, (perm, flip) in STORAGES.items():
        g = Grid.of(restored(img, perm, flip))
        assert np.allclose(np.sort(g.corners(), axis=0), np.sort(Grid.of(img).corners(), axis=0))
        w = g.with_spacing(AxisOrder.of_direction(g.direction).stored_vector((2.0, 2.0, 2.0)))
        got = {tuple(np.round(p, 6)) for p in w.index_to_physical(np.argwhere(np.ones(w.size, bool)))}
        assert got == want, name


class OneSidedEdge(torch.nn.Module):
    """Stand-in network that is not mirror-symmetric: class 1 where the PET falls towards the next
    voxel along any array axis (a hot box's upper faces), so a mirrored array marks other faces."""

    def forward(self, x):
        pet = x[:, 1:2]
        drop = pet - torch.nn.functional.pad(pet, (0, 1))[..., 1:]
        drop = drop + pet - torch.nn.functional.pad(pet, (0, 0, 0, 1))[..., 1:, :]
        drop = drop + pet - torch.nn.functional.pad(pet, (0, 0, 0, 0, 0, 1))[..., 1:, :, :]
        return torch.cat([torch.zeros_like(pet), drop - 1.37], 1)


def _case():
    z, y, x = np.mgrid[:30, :40, :44]
    ct = np.full((30, 40, 44), -1000, np.int16)
    ct[((y - 20) / 15.0) ** 2 + ((x - 22) / 18.0) ** 2 <= 1] = 40
    pet = np.where(ct > 0, 1.0, 0.0).astype(np.float32)
    pet[12:18, 14:20, 10:17] = 6.0  # a box: its low-x face is where the PET rises, its high-x face where it falls
    pet[8:11, 24:27, 28:31] = 4.0
    images = []
    for a in (ct, pet):
        img = sitk.GetImageFromArray(a)
        img.SetSpacing((1.5, 1.5, 2.5))
        img.SetOrigin((-33.0, -30.0, 40.0))
        images.append(img)
    return images


def _plan(orientation, spacing):
    return InferencePlan(
        patch_size=(16, 24, 24), spacing=spacing, orientation=orientation,
        channels=[{"name": "CT", "normalization": {"scheme": "ct", "clip": [-1000, 600], "mean": 0, "std": 100}},
                  {"name": "PET", "normalization": {"scheme": "none"}}],
        labels=[{"value": 0, "name": "background"}, {"value": 1, "name": "lesion"}])


# resampled: 2.2 mm, so that no working voxel centre lies exactly on the scan's edge, where ITK
# counts the lower edge in and the upper one out (75 mm at 2 mm would put one there)
@pytest.mark.parametrize("spacing", [(1.5, 1.5, 2.5), (2.0, 2.0, 2.2)], ids=["own-grid", "resampled"])
def test_the_network_sees_the_same_arrays_however_the_scan_is_stored(spacing):
    images = _case()
    seg = Segmenter(OneSidedEdge(), _plan("LPS", spacing), device="cpu")
    want = sitk.GetArrayFromImage(seg.predict(images).labels)
    assert 0 < want.sum() < want.size // 20
    legacy = Segmenter(OneSidedEdge(), _plan(None, spacing), device="cpu")
    for name, (perm, flip) in STORAGES.items():
        stored = [restored(img, perm, flip) for img in images]
        result = seg.predict(stored)
        assert result.labels.GetDirection() == stored[0].GetDirection()  # the output stays on the input's grid
        assert result.info["reoriented"] == (name != "LPS")
        assert np.array_equal(back_on(result.labels, images[0]), want), name
        if name != "LPS":  # without turning the arrays, the network marks the mirrored side
            assert not np.array_equal(back_on(legacy.predict(stored).labels, images[0]), want), name


# --------------------------------------------------------------------------- training side


@pytest.fixture(scope="module")
def two_storages(tmp_path_factory):
    """A small PET/CT phantom dataset, and the same cases with every file stored axes-swapped."""
    import shutil

    from VeloxSegLib.data.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("orientation")
    plain = root / "plain"
    write_phantom_dataset(plain, "petct", 2, seed=5, size=(48, 40, 32))
    swapped = root / "swapped"
    shutil.copytree(plain, swapped)
    perm, flip = STORAGES["SLP-swapped"]
    for path in sorted(swapped.glob("*Tr/*.nii.gz")):
        sitk.WriteImage(restored(sitk.ReadImage(str(path)), perm, flip), str(path))
    return plain, swapped


def test_training_cases_become_the_same_arrays_however_they_are_stored(two_storages):
    from VeloxSegLib.data.nnunet import load_dataset
    from VeloxSegLib.train.planner import make_plans, fingerprint_dataset
    from VeloxSegLib.train.trainer import RunSetup, TrainConfig, preprocess_case

    fps = [fingerprint_dataset(root) for root in two_storages]
    assert fps[0]["spacings"] == fps[1]["spacings"] and fps[0]["sizes"] == fps[1]["sizes"]
    plans = make_plans(fps[0])
    assert plans["orientation"] == "LPS"
    setup = RunSetup.from_plans(plans, TrainConfig())
    setup = RunSetup(**{**setup.__dict__, "spacing": tuple(fps[0]["spacings"][0])})  # the cases' own grid: no resampling
    plain, swapped = (load_dataset(root) for root in two_storages)
    for case in plain.cases:
        a, b = preprocess_case(plain, case, setup), preprocess_case(swapped, case, setup)
        assert a.image.shape == b.image.shape and a.spacing == b.spacing
        assert np.allclose(a.image, b.image, atol=1e-5)  # the PET is resampled from its own grid
        assert np.array_equal(a.label, b.label) and a.label.any()
    legacy = RunSetup(**{**setup.__dict__, "orientation": None})
    assert not np.array_equal(preprocess_case(swapped, plain.cases[0], legacy).label, a.label)


def test_bundles_record_the_orientation_and_older_bundles_keep_their_arrays():
    from VeloxSegLib.bundle import validate_meta
    from VeloxSegLib.errors import BundleError
    from VeloxSegLib.train.trainer import RunSetup, build_bundle_meta

    setup = RunSetup(model_name="veloxseg-b", in_channels=(1, 1), num_classes=2, patch_size=(32, 32, 32),
                     spacing=(2.0, 2.0, 2.0), labels=[{"value": 0, "name": "background"}, {"value": 1, "name": "x"}],
                     channels=[{"name": "CT", "modality": "CT", "normalization": {"scheme": "none"}},
                               {"name": "PET", "modality": "PET", "normalization": {"scheme": "none"}}])
    meta = validate_meta(build_bundle_meta(setup, "m", {}))
    assert meta["orientation"] == "LPS" and InferencePlan.from_meta(meta).orientation == "LPS"
    older = dict(meta)
    del older["orientation"]
    assert InferencePlan.from_meta(validate_meta(older)).orientation is None
    assert "orientation" not in build_bundle_meta(RunSetup(**{**setup.__dict__, "orientation": None}), "m", {})
    with pytest.raises(BundleError, match="orientation must be one of LPS"):
        validate_meta({**meta, "orientation": "RAS"})


def test_a_fine_tune_keeps_its_parents_orientation(tmp_path, monkeypatch):
    import json
    import shutil

    from VeloxSegLib.bundle import embedded_bundles_dir
    from VeloxSegLib.data.phantom import write_phantom_dataset
    from VeloxSegLib.train import finetune as ft

    seen = []
    monkeypatch.setattr(ft, "run_training", lambda *a, setup, **k: seen.append(setup.orientation))
    data = tmp_path / "local"
    write_phantom_dataset(data, "petct", 2, seed=6, size=(48, 40, 32))
    older = tmp_path / "older"
    shutil.copytree(embedded_bundles_dir() / "petct-lesion-demo", older)
    meta = json.loads((older / "bundle.json").read_text())
    del meta["orientation"]
    (older / "bundle.json").write_text(json.dumps(meta))
    for source in ("petct-lesion-demo", str(older)):
        ft.run_finetune(source, data, tmp_path / "out", ft.TrainConfig())
    assert seen == ["LPS", None]
