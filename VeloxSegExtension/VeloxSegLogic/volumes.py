"""Volume nodes <-> files, numpy arrays and SimpleITK images, with their geometry.

Slicer stores geometry as an IJK-to-RAS matrix on the node; ITK/SimpleITK and NIfTI/NRRD files
use LPS. The two differ by a flip of the first two axes (``LPS = diag(-1, -1, 1) @ RAS``).
A volume under a linear parent transform is taken in world coordinates (the transform is
applied to its geometry), so a PET registered to the CT in Slicer stays registered.
"""
from __future__ import annotations

import os

import numpy as np

from .errors import InputError

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _vtk_matrix_to_array(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _array_to_vtk_matrix(array):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras(node, world: bool = True) -> np.ndarray:
    """The node's 4x4 IJK-to-RAS matrix, including a linear parent transform when ``world``."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    result = _vtk_matrix_to_array(matrix)
    parent = node.GetParentTransformNode() if world else None
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(
                f"volume '{node.GetName()}' is under a non-linear transform; harden the transform "
                "(Data module, right-click > Harden transform) before segmenting"
            )
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        result = _vtk_matrix_to_array(to_world) @ result
    return result


def geometry_from_matrix(ijk_to_ras_matrix: np.ndarray):
    """(origin, spacing, direction) in LPS, ITK conventions, from an IJK-to-RAS matrix."""
    lps = RAS_TO_LPS @ np.asarray(ijk_to_ras_matrix, dtype=float)
    axes = lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise InputError("volume has a zero voxel spacing")
    direction = axes / spacing
    return lps[:3, 3].copy(), spacing, direction


def matrix_from_geometry(origin, spacing, direction) -> np.ndarray:
    """IJK-to-RAS matrix from LPS origin, spacing and a 3x3 direction matrix (ITK conventions)."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, dtype=float).reshape(3, 3) * np.asarray(spacing, dtype=float)
    lps[:3, 3] = np.asarray(origin, dtype=float)
    return RAS_TO_LPS @ lps


def array_from_volume(node) -> np.ndarray:
    """A copy of the voxels as a numpy array indexed [k, j, i] (SimpleITK's order)."""
    from vtk.util import numpy_support

    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"volume '{node.GetName()}' has no image data")
    dims = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1:
        raise InputError(f"volume '{node.GetName()}' has {scalars.GetNumberOfComponents()} components; expected a scalar volume")
    return numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1]).copy()


def update_volume_from_array(node, array: np.ndarray, ijk_to_ras_matrix=None) -> None:
    """Replace the node's voxels (array indexed [k, j, i]) and optionally its geometry."""
    import vtk
    from vtk.util import numpy_support

    array = np.ascontiguousarray(array)
    if array.ndim != 3:
        raise InputError(f"expected a 3D array, got shape {array.shape}")
    if array.dtype == np.int64:
        array = array.astype(np.int32)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[::-1])
    vtk_array = numpy_support.numpy_to_vtk(array.ravel(), deep=True, array_type=numpy_support.get_vtk_array_type(array.dtype))
    image.GetPointData().SetScalars(vtk_array)
    if ijk_to_ras_matrix is not None:
        node.SetIJKToRASMatrix(_array_to_vtk_matrix(np.asarray(ijk_to_ras_matrix, dtype=float)))
    node.SetAndObserveImageData(image)


def remove_node(node) -> None:
    """Remove a (temporary) node with the display and storage nodes it brought along:
    ``vtkMRMLScene.RemoveNode`` leaves those behind."""
    scene = node.GetScene() if node is not None else None
    if scene is None:
        return
    extra = []
    if hasattr(node, "GetNumberOfDisplayNodes"):
        extra += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if hasattr(node, "GetNumberOfStorageNodes"):
        extra += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for other in extra:
        if other is not None and other.GetScene() is scene:
            scene.RemoveNode(other)


def add_volume_from_array(scene, array, ijk_to_ras_matrix, name="volume", label=False):
    """A new scalar (or label map) volume node in ``scene`` holding ``array``."""
    class_name = "vtkMRMLLabelMapVolumeNode" if label else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(class_name, name)
    update_volume_from_array(node, array, ijk_to_ras_matrix)
    node.CreateDefaultDisplayNodes()
    return node


def volume_to_sitk(node, world: bool = True):
    """SimpleITK image (LPS geometry) of a scalar volume node."""
    import SimpleITK as sitk

    origin, spacing, direction = geometry_from_matrix(ijk_to_ras(node, world=world))
    image = sitk.GetImageFromArray(array_from_volume(node))
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in direction.ravel()])
    return image


def sitk_to_volume(image, scene=None, node=None, name="volume", label=False):
    """Put a SimpleITK image into ``node`` (or a new node in ``scene``), geometry included."""
    import SimpleITK as sitk

    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("expected a 3D scalar image")
    matrix = matrix_from_geometry(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    array = sitk.GetArrayFromImage(image)
    if node is None:
        return add_volume_from_array(scene, array, matrix, name=name, label=label)
    update_volume_from_array(node, array, matrix)
    return node


def same_geometry(node_a, node_b, tolerance: float = 1e-4) -> bool:
    """True when both volumes have the same voxel grid in world coordinates."""
    a, b = node_a.GetImageData(), node_b.GetImageData()
    if a is None or b is None or a.GetDimensions() != b.GetDimensions():
        return False
    return bool(np.allclose(ijk_to_ras(node_a), ijk_to_ras(node_b), atol=tolerance))


def resample_to_reference(moving_node, reference_node, scene, name=None, interpolator="linear", default_value=None):
    """A new volume node: ``moving_node`` resampled onto ``reference_node``'s grid, in physical space.

    Works in world coordinates (linear parent transforms applied). Voxels outside the moving
    volume get ``default_value`` (the moving volume's minimum by default: air for CT, 0 for PET).
    """
    import SimpleITK as sitk

    moving = volume_to_sitk(moving_node)
    reference = volume_to_sitk(reference_node)
    if default_value is None:
        default_value = float(np.min(sitk.GetArrayViewFromImage(moving)))
    interp = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}[interpolator]
    output_type = moving.GetPixelID() if interpolator == "nearest" else sitk.sitkFloat32
    resampled = sitk.Resample(moving, reference, sitk.Transform(), interp, default_value, output_type)
    return sitk_to_volume(resampled, scene=scene, name=name or f"{moving_node.GetName()}_resampled",
                          label=moving_node.IsA("vtkMRMLLabelMapVolumeNode"))


def write_volume(node, path: str, world: bool = True) -> str:
    """Write a volume node to ``path`` (.nii.gz, .nrrd, ...) through a volume archetype storage node.

    With ``world`` and a linear parent transform, the file holds the transformed geometry.
    """
    import slicer

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    target = node
    temporary = None
    if world and node.GetParentTransformNode() is not None:
        scene = node.GetScene()
        temporary = scene.AddNewNodeByClass(node.GetClassName(), f"{node.GetName()}_world")
        update_volume_from_array(temporary, array_from_volume(node), ijk_to_ras(node, world=True))
        target = temporary
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.SetUseCompression(1)
    try:
        if not storage.WriteData(target):
            raise InputError(f"could not write volume '{node.GetName()}' to {path}")
    finally:
        if temporary is not None:
            remove_node(temporary)
    return path


def read_volume(path: str, scene, name=None, label=False):
    """Read an image file into a new scalar (or label map) volume node in ``scene``."""
    import slicer

    if not os.path.isfile(path):
        raise InputError(f"no such image file: {path}")
    class_name = "vtkMRMLLabelMapVolumeNode" if label else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(class_name, name or volume_name_from_path(path))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.SetCenterImage(False)
    if label:
        storage.SetSingleFile(True)
    ok = storage.ReadData(node)
    if not ok or node.GetImageData() is None:
        scene.RemoveNode(node)
        raise InputError(f"could not read image file: {path}")
    node.CreateDefaultDisplayNodes()
    return node


def volume_name_from_path(path: str) -> str:
    base = os.path.basename(path)
    for ext in (".nii.gz", ".seg.nrrd", ".nrrd", ".nii", ".mha", ".mhd", ".nhdr"):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return os.path.splitext(base)[0]
