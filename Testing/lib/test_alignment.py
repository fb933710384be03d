"""Physical-space alignment: modalities land on the reference (first) channel's grid."""
import numpy as np
import pytest
import SimpleITK as sitk

from VeloxSegLib.data.alignment import (Grid, align_to_reference, check_overlap, resample_to_spacing,
                                        spacing_close)
from VeloxSegLib.errors import InputError

ROT_Z90 = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _image(shape_zyx, spacing, origin, direction=None, value=0.0):
    img = sitk.GetImageFromArray(np.full(shape_zyx, value, dtype=np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def _put_blob(img, point, radius_vox=1, value=100.0):
    arr = sitk.GetArrayFromImage(img)
    i, j, k = img.TransformPhysicalPointToIndex(point)
    arr[k - radius_vox:k + radius_vox + 1, j - radius_vox:j + radius_vox + 1, i - radius_vox:i + radius_vox + 1] = value
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out, np.array(img.TransformIndexToPhysicalPoint((i, j, k)))  # the blob's true centre


def _centroid_physical(img):
    arr = sitk.GetArrayViewFromImage(img)
    zyx = np.argwhere(arr > arr.max() / 2).mean(axis=0)
    return np.array(img.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]]))


CT = dict(shape_zyx=(40, 50, 60), spacing=(1.0, 1.0, 1.5), origin=(-30.0, -20.0, 10.0))
P = (2.0, 4.0, 40.0)  # a physical point inside the CT


@pytest.mark.parametrize("pet_grid", [
    dict(shape_zyx=(20, 20, 24), spacing=(3.0, 3.0, 3.0), origin=(-30.0, -20.0, 10.0)),          # coarser
    dict(shape_zyx=(30, 30, 30), spacing=(2.0, 2.0, 2.5), origin=(-20.0, -15.0, 20.0)),          # shifted FOV
    dict(shape_zyx=(30, 40, 40), spacing=(2.0, 2.0, 2.0), origin=(30.0, -30.0, 5.0), direction=ROT_Z90),
], ids=["coarser", "shifted", "rotated"])
def test_pet_blob_lands_at_its_physical_point_on_the_ct_grid(pet_grid):
    ct = _image(**CT, value=-1000.0)
    pet, centre = _put_blob(_image(**pet_grid), P)
    assert np.linalg.norm(centre - np.array(P)) < 3.0
    ct_out, pet_out = align_to_reference([ct, pet])
    assert pet_out.GetSize() == ct.GetSize()
    assert pet_out.GetOrigin() == ct.GetOrigin() and pet_out.GetDirection() == ct.GetDirection()
    assert np.linalg.norm(_centroid_physical(pet_out) - centre) < 0.6
    assert np.array_equal(sitk.GetArrayViewFromImage(ct_out), sitk.GetArrayViewFromImage(ct))


def test_outside_the_pet_field_of_view_is_the_pet_background():
    ct = _image(**CT)
    pet = _image((10, 10, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 20.0), value=5.0)
    _, pet_out = align_to_reference([ct, pet])
    arr = sitk.GetArrayViewFromImage(pet_out)
    assert arr.max() == 5.0 and arr.min() == 5.0  # the PET's own minimum fills outside its FOV


def test_non_overlapping_modalities_are_rejected_naming_the_file():
    ct = _image(**CT)
    pet = _image((10, 10, 10), (2.0, 2.0, 2.0), (500.0, 0.0, 0.0))
    with pytest.raises(InputError, match="pet.nii.gz.*does not overlap"):
        check_overlap([ct, pet], ["ct.nii.gz", "pet.nii.gz"])
    with pytest.raises(InputError):
        align_to_reference([ct, pet])


def test_resample_to_spacing_keeps_the_physical_box():
    img, centre = _put_blob(_image(**CT), P)
    out = resample_to_spacing(img, (2.0, 2.0, 3.0))
    assert out.GetSpacing() == (2.0, 2.0, 3.0)
    assert out.GetSize() == (30, 25, 20)
    lo = Grid.of(img).corners().min(0)
    assert np.allclose(Grid.of(out).corners().min(0), lo)
    assert np.linalg.norm(_centroid_physical(out) - centre) < 1.5


def test_grid_index_physical_round_trip_matches_simpleitk():
    img = _image((5, 6, 7), (0.7, 1.3, 2.1), (4.0, -3.0, 9.0), direction=ROT_Z90)
    g = Grid.of(img)
    idx = np.array([1.5, 2.0, 3.25])
    assert np.allclose(g.index_to_physical(idx), img.TransformContinuousIndexToPhysicalPoint(idx.tolist()))
    assert np.allclose(g.physical_to_index(g.index_to_physical(idx)), idx)


def test_spacing_tolerance():
    assert spacing_close((2.04, 2.04, 3.0), (2.0364, 2.0364, 3.0), 0.02)
    assert not spacing_close((1.0, 1.0, 3.0), (2.0, 2.0, 3.0), 0.02)
