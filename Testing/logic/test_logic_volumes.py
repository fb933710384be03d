"""Volume nodes <-> files and SimpleITK images, geometry included; PET onto the CT grid."""
import numpy as np
import pytest
from logic_helpers import ijk_to_ras_matrix, phantom_function, ras_grid_points

from VeloxSegLogic import volumes as V


def test_oblique_anisotropic_volume_round_trips_through_nifti(scene, tmp_path, oblique_matrix):
    data = np.random.default_rng(0).normal(size=(11, 9, 7)).astype(np.float32)
    node = V.add_volume_from_array(scene, data, oblique_matrix, "ct")
    path = V.write_volume(node, str(tmp_path / "ct.nii.gz"))
    back = V.read_volume(path, scene)
    assert np.allclose(V.ijk_to_ras(back), oblique_matrix, atol=1e-4)
    assert np.array_equal(V.array_from_volume(back), data)


def test_sitk_image_has_lps_geometry_matching_the_file_itk_writes(scene, tmp_path, oblique_matrix):
    import SimpleITK as sitk

    node = V.add_volume_from_array(scene, np.zeros((5, 6, 7), np.int16), oblique_matrix, "ct")
    from_node = V.volume_to_sitk(node)
    from_file = sitk.ReadImage(V.write_volume(node, str(tmp_path / "ct.nrrd")))
    assert np.allclose(from_node.GetOrigin(), from_file.GetOrigin(), atol=1e-4)
    assert np.allclose(from_node.GetSpacing(), from_file.GetSpacing(), atol=1e-5)
    assert np.allclose(from_node.GetDirection(), from_file.GetDirection(), atol=1e-5)
    # RAS -> LPS: the first two world axes flip
    assert np.allclose(from_node.GetOrigin(), [-oblique_matrix[0, 3], -oblique_matrix[1, 3], oblique_matrix[2, 3]])


def test_sitk_image_round_trips_into_a_node(scene, oblique_matrix):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    node = V.add_volume_from_array(scene, data, oblique_matrix, "a")
    copy = V.sitk_to_volume(V.volume_to_sitk(node), scene=scene, name="b")
    assert np.allclose(V.ijk_to_ras(copy), oblique_matrix, atol=1e-9)
    assert np.array_equal(V.array_from_volume(copy), data)


def test_linear_parent_transform_is_part_of_the_written_geometry(scene, tmp_path):
    import vtk

    base = ijk_to_ras_matrix((1.0, 1.0, 2.0), (0, 0, 0))
    node = V.add_volume_from_array(scene, np.ones((3, 4, 5), np.float32), base, "pet")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 15.0)
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    back = V.read_volume(V.write_volume(node, str(tmp_path / "pet.nii.gz")), scene)
    expected = base.copy()
    expected[0, 3] += 15.0
    assert np.allclose(V.ijk_to_ras(back), expected, atol=1e-4)
    assert node.GetParentTransformNode() is transform  # the original node is untouched


def _pet_ct_pair(scene):
    ct_matrix = ijk_to_ras_matrix((0.9, 0.9, 2.0), (-20.0, -15.0, -10.0), (0, 0, 12))
    ct_shape = (14, 30, 32)
    ct = V.add_volume_from_array(scene, np.zeros(ct_shape, np.float32), ct_matrix, "CT")
    # PET: coarser, shifted, differently oriented grid covering the CT
    pet_matrix = ijk_to_ras_matrix((2.0, 2.2, 3.0), (-60.0, -45.0, -45.0), (5, -4, -20))
    pet_shape = (35, 50, 60)
    pet_values = phantom_function(ras_grid_points(pet_matrix, pet_shape))
    pet = V.add_volume_from_array(scene, pet_values, pet_matrix, "PET")
    return ct, pet


def test_pet_on_coarser_oblique_grid_lands_on_ct_grid(scene):
    ct, pet = _pet_ct_pair(scene)
    resampled = V.resample_to_reference(pet, ct, scene)
    assert V.same_geometry(resampled, ct)
    values = V.array_from_volume(resampled)
    # a linear function of position is reproduced exactly by linear interpolation
    expected = phantom_function(ras_grid_points(V.ijk_to_ras(ct), values.shape))
    assert np.allclose(values, expected, atol=1e-2)


def test_pet_resampling_agrees_with_slicer_volumes_logic(scene):
    import slicer

    ct, pet = _pet_ct_pair(scene)
    ours = V.array_from_volume(V.resample_to_reference(pet, ct, scene))
    slicers = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(pet, ct)
    if slicers is None:
        pytest.skip("ResampleVolumeToReferenceVolume needs Slicer's CLI modules in this build")
    theirs = V.array_from_volume(slicers)
    assert theirs.shape == ours.shape
    assert np.allclose(V.ijk_to_ras(slicers), V.ijk_to_ras(ct), atol=1e-4)
    inside = np.abs(theirs) > 0
    assert inside.mean() > 0.9
    assert np.allclose(ours[inside], theirs[inside], atol=0.05)


def test_inputs_are_written_on_the_first_channel_grid(scene, tmp_path):
    import SimpleITK as sitk

    from VeloxSegLogic.logic import write_inputs

    ct, pet = _pet_ct_pair(scene)
    paths = write_inputs([ct, pet], str(tmp_path))
    images = [sitk.ReadImage(p) for p in paths]
    assert images[0].GetSize() == images[1].GetSize()
    assert np.allclose(images[0].GetOrigin(), images[1].GetOrigin(), atol=1e-4)
    assert np.allclose(images[0].GetDirection(), images[1].GetDirection(), atol=1e-5)
    pet_on_ct = sitk.GetArrayFromImage(images[1])
    expected = phantom_function(ras_grid_points(V.ijk_to_ras(ct), pet_on_ct.shape))
    assert np.allclose(pet_on_ct, expected, atol=1e-2)
