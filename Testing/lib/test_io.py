"""Reading and validating volumes; atomic writing."""
import os

import numpy as np
import pytest
import SimpleITK as sitk

from VeloxSegLib.data.io import check_image, check_output_path, read_image, write_image
from VeloxSegLib.errors import InputError

DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _volume(dtype=np.float32, shape=(12, 14, 16)):
    arr = np.random.default_rng(0).normal(0, 100, size=shape).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 1.2, 2.5))
    img.SetOrigin((-12.5, 30.0, 7.0))
    img.SetDirection(DIRECTION)
    return img


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_formats_keep_geometry_and_pixel_type(tmp_path, ext):
    img = _volume(np.int16)
    path = tmp_path / f"ct{ext}"
    sitk.WriteImage(img, str(path), True)
    out = read_image(path)
    assert out.GetSize() == img.GetSize()
    assert np.allclose(out.GetSpacing(), img.GetSpacing())
    assert np.allclose(out.GetOrigin(), img.GetOrigin(), atol=1e-4)
    assert np.allclose(out.GetDirection(), img.GetDirection(), atol=1e-6)
    assert out.GetPixelID() == sitk.sitkInt16
    assert np.array_equal(sitk.GetArrayViewFromImage(out), sitk.GetArrayViewFromImage(img))


def test_dicom_series_folder_is_read_as_one_volume(tmp_path):
    arr = (np.arange(5 * 8 * 9).reshape(5, 8, 9) % 200).astype(np.int16)
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(arr.shape[0]):
        sl = sitk.GetImageFromArray(arr[k])
        sl.SetSpacing((0.7, 0.7))
        for tag, value in {
            "0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": "1.2.826.0.1.3680043.2.1125.2",
            "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0032": f"-10\\20\\{5 + 2.5 * k}", "0020|0013": str(k + 1),
            "0028|0030": "0.7\\0.7", "0018|0050": "2.5",
            "0008|0018": f"1.2.826.0.1.3680043.2.1125.3.{k + 1}",
        }.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)
    out = read_image(folder)
    assert out.GetSize() == (9, 8, 5)
    assert np.allclose(out.GetSpacing(), (0.7, 0.7, 2.5))
    assert np.allclose(out.GetOrigin(), (-10, 20, 5))
    assert np.array_equal(sitk.GetArrayViewFromImage(out), arr)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(InputError, match="nope.nii.gz.*no such file"):
        read_image(tmp_path / "nope.nii.gz")


def test_empty_and_corrupt_files_are_rejected(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "junk.nii.gz").write_bytes(os.urandom(4000))
    (tmp_path / "text.nrrd").write_text("hello")
    for name in ("empty.nii.gz", "junk.nii.gz", "text.nrrd"):
        with pytest.raises(InputError, match=name):
            read_image(tmp_path / name)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_files_are_rejected(tmp_path, ext):
    full = tmp_path / f"full{ext}"
    sitk.WriteImage(_volume(), str(full), True)
    data = full.read_bytes()
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match=f"cut{ext}.*(truncated|corrupt|readable)"):
        read_image(cut)


def test_2d_image_is_rejected(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 12), np.float32)), str(tmp_path / "slice.nii.gz"))
    with pytest.raises(InputError, match="slice.nii.gz.*2D"):
        read_image(tmp_path / "slice.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 10, 12), np.float32)), str(tmp_path / "one.nii.gz"))
    with pytest.raises(InputError, match="one.nii.gz.*2D"):
        read_image(tmp_path / "one.nii.gz")


def test_4d_image_is_rejected_but_a_single_time_point_is_accepted(tmp_path):
    vol = _volume()
    sitk.WriteImage(sitk.JoinSeries([vol, vol]), str(tmp_path / "dyn.nii.gz"))
    with pytest.raises(InputError, match="dyn.nii.gz.*4D"):
        read_image(tmp_path / "dyn.nii.gz")
    sitk.WriteImage(sitk.JoinSeries([vol]), str(tmp_path / "single.nii.gz"))
    out = read_image(tmp_path / "single.nii.gz")
    assert out.GetDimension() == 3 and out.GetSize() == vol.GetSize()


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_rejected(tmp_path, bad, ext):
    # ITK turns NaN/inf in NIfTI files into 0 without a word: this is checked separately
    arr = np.ones((8, 9, 10), np.float64 if ext == ".nii" else np.float32)
    arr[3, 4, 5] = bad
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / f"bad{ext}"), ext != ".nii")
    with pytest.raises(InputError, match=f"bad{ext}.*(NaN|infinite)"):
        read_image(tmp_path / f"bad{ext}")


def test_vector_image_is_rejected(tmp_path):
    rgb = sitk.GetImageFromArray(np.zeros((5, 6, 7, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputError, match="rgb.nrrd.*components"):
        read_image(tmp_path / "rgb.nrrd")


def test_in_memory_images_are_validated_too():
    arr = np.zeros((4, 5, 6), np.float32)
    arr[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="PET.*NaN"):
        check_image(sitk.GetImageFromArray(arr), "PET")


def test_write_is_atomic_and_refuses_to_overwrite(tmp_path):
    img = _volume(np.uint8)
    out = tmp_path / "seg.nii.gz"
    write_image(img, out)
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]
    before = out.read_bytes()
    with pytest.raises(InputError, match="seg.nii.gz.*exists.*--overwrite"):
        write_image(img, out)
    assert out.read_bytes() == before
    write_image(img, out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]


def test_cancel_during_write_leaves_nothing(tmp_path):
    from VeloxSegLib.errors import Cancelled

    with pytest.raises(Cancelled):
        write_image(_volume(), tmp_path / "seg.nii.gz", cancel=lambda: True)
    assert list(tmp_path.iterdir()) == []


def test_output_checks(tmp_path):
    with pytest.raises(InputError, match="output folder .* does not exist"):
        check_output_path(tmp_path / "missing" / "seg.nii.gz")
    with pytest.raises(InputError, match="unsupported output file ending"):
        check_output_path(tmp_path / "seg.png")
    src = tmp_path / "ct.nii.gz"
    src.write_bytes(b"x")
    with pytest.raises(InputError, match="overwrite an input"):
        check_output_path(src, overwrite=True, inputs=[src])
