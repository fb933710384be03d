"""`veloxseg convert`: nnU-Net raw datasets from folders with per-channel glob patterns."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from VeloxSegLib.cli import main
from VeloxSegLib.data.alignment import Grid
from VeloxSegLib.data.convert import convert_dataset, parse_labels_map
from VeloxSegLib.data.nnunet import validate_dataset
from VeloxSegLib.errors import ConfigError, InputError

SHAPE = (6, 7, 8)  # z, y, x


def write(path, arr, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(np.asarray(arr))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)


def label_array(value=1):
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:4, 2:5, 3:6] = value
    return lab


@pytest.fixture
def raw(tmp_path):
    """A flat AutoPET-style folder: P00k_CT, P00k_SUV, P00k_SEG."""
    src = tmp_path / "raw"
    for k in range(1, 4):
        write(src / f"P00{k}_CT.nii.gz", np.full(SHAPE, -100 * k, np.int16))
        write(src / f"P00{k}_SUV.nii.gz", np.full(SHAPE, 0.5 * k, np.float32))
        write(src / f"P00{k}_SEG.nii.gz", label_array())
    return src


def run(raw, out, *extra):
    return main(["convert", "--images-dir", str(raw), "--channel", "CT=*_CT.nii.gz", "--channel", "PET=*_SUV.nii.gz",
                 "--labels", "*_SEG.nii.gz", "--labels-map", "background=0,lesion=1", "-o", str(out), *extra])


def assert_nothing_written(parent, expected):
    assert sorted(p.name for p in parent.iterdir()) == sorted(expected)


def test_converts_a_folder_into_an_nnunet_dataset(raw, tmp_path):
    out = tmp_path / "Dataset001_PETCT"
    assert run(raw, out) == 0
    ds = validate_dataset(out, same_grid=True)
    assert ds.cases == ["P001", "P002", "P003"] and ds.channel_list == ["CT", "PET"]
    assert ds.labels == {"background": 0, "lesion": 1}
    ct = sitk.ReadImage(str(out / "imagesTr/P002_0000.nii.gz"))
    assert ct.GetPixelID() == sitk.sitkInt16 and (sitk.GetArrayFromImage(ct) == -200).all()
    assert np.allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTr/P003_0001.nii.gz"))), 1.5)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr/P001.nii.gz"))), label_array())
    record = json.loads((out / "dataset.json").read_text())["veloxseg_convert"]
    assert record["channels"] == {"CT": "*_CT.nii.gz", "PET": "*_SUV.nii.gz"}
    assert record["sources"]["P001"]["PET"].endswith("P001_SUV.nii.gz")
    assert_nothing_written(tmp_path, ["raw", "Dataset001_PETCT"])


def test_label_off_the_image_grid_is_refused_naming_the_case(raw, tmp_path, capsys):
    write(raw / "P002_SEG.nii.gz", label_array(), spacing=(1.0, 1.0, 3.0))
    out = tmp_path / "out"
    assert run(raw, out) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "case 'P002'" in err and "label does not match the image grid" in err
    assert "P001" not in err and "P003" not in err
    assert_nothing_written(tmp_path, ["raw"])


def test_case_missing_a_channel_is_refused_naming_it(raw, tmp_path, capsys):
    (raw / "P003_SUV.nii.gz").unlink()
    out = tmp_path / "out"
    assert run(raw, out) == 2
    err = capsys.readouterr().err.strip()
    assert "case 'P003' has no PET (*_SUV.nii.gz) image" in err and "\n" not in err
    assert_nothing_written(tmp_path, ["raw"])


def test_case_missing_its_label_is_refused(raw, tmp_path):
    (raw / "P001_SEG.nii.gz").unlink()
    with pytest.raises(InputError, match=r"case 'P001' has no label"):
        convert_dataset(raw, [("CT", "*_CT.nii.gz"), ("PET", "*_SUV.nii.gz")], "*_SEG.nii.gz", tmp_path / "out")
    assert_nothing_written(tmp_path, ["raw"])


def test_all_refused_cases_are_listed(raw, tmp_path):
    (raw / "P001_SUV.nii.gz").unlink()
    (raw / "P003_SUV.nii.gz").unlink()
    with pytest.raises(InputError, match=r"case 'P001' .*; case 'P003'"):
        convert_dataset(raw, [("CT", "*_CT.nii.gz"), ("PET", "*_SUV.nii.gz")], "*_SEG.nii.gz", tmp_path / "out")


def test_channel_on_another_grid_needs_align_and_is_resampled_with_it(raw, tmp_path, capsys):
    # PET on a coarser grid covering the same space
    write(raw / "P001_SUV.nii.gz", np.full((3, 4, 4), 2.0, np.float32), spacing=(2.0, 2.0, 2.0), origin=(0.5, 0.5, 0.5))
    out = tmp_path / "out"
    assert run(raw, out) == 2
    err = capsys.readouterr().err
    assert "case 'P001': PET is not on CT's voxel grid" in err and "--align" in err
    assert_nothing_written(tmp_path, ["raw"])
    assert run(raw, out, "--align") == 0
    pet = sitk.ReadImage(str(out / "imagesTr/P001_0001.nii.gz"))
    ct = sitk.ReadImage(str(out / "imagesTr/P001_0000.nii.gz"))
    assert Grid.of(pet).same_as(Grid.of(ct))
    assert np.allclose(sitk.GetArrayFromImage(pet)[1:4, 1:4, 1:4], 2.0)
    assert json.loads((out / "dataset.json").read_text())["veloxseg_convert"]["aligned_to"] == "CT"


def test_channel_elsewhere_in_space_is_refused_even_with_align(raw, tmp_path):
    write(raw / "P002_SUV.nii.gz", np.ones(SHAPE, np.float32), origin=(0.0, 0.0, 900.0))
    with pytest.raises(InputError, match="case 'P002': PET does not overlap CT"):
        convert_dataset(raw, [("CT", "*_CT.nii.gz"), ("PET", "*_SUV.nii.gz")], "*_SEG.nii.gz", tmp_path / "out",
                        align=True)
    assert_nothing_written(tmp_path, ["raw"])


def test_label_values_outside_the_map_are_refused(raw, tmp_path, capsys):
    write(raw / "P003_SEG.nii.gz", label_array(4))
    assert run(raw, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "case 'P003': label values [4] are not in --labels-map" in err
    assert_nothing_written(tmp_path, ["raw"])


def test_brats_layout_with_case_regex_and_remap(tmp_path):
    src = tmp_path / "BraTS2021_Training_Data"
    for case in ("BraTS2021_00000", "BraTS2021_00002"):
        for k, mod in enumerate(("t1", "t1ce", "t2", "flair")):
            write(src / case / f"{case}_{mod}.nii.gz", np.full(SHAPE, k + 1, np.float32))
        seg = np.zeros(SHAPE, np.uint8)
        seg[1, 1, 1], seg[2, 2, 2], seg[3, 3, 3] = 1, 2, 4
        write(src / case / f"{case}_seg.nii.gz", seg)
    out = tmp_path / "Dataset002_BraTS"
    argv = ["convert", "--images-dir", str(src)]
    for name, mod in (("T1", "t1"), ("T1ce", "t1ce"), ("T2", "t2"), ("FLAIR", "flair")):
        argv += ["--channel", f"{name}=*/*_{mod}.nii.gz"]
    argv += ["--labels", "*/*_seg.nii.gz", "--case-regex", r"BraTS2021_\d+",
             "--labels-map", "background=0,necrotic_core=1,edema=2,enhancing_tumor=3", "--remap", "4=3", "-o", str(out)]
    assert main(argv) == 0
    ds = validate_dataset(out, same_grid=True)
    assert ds.cases == ["BraTS2021_00000", "BraTS2021_00002"]
    assert ds.channel_list == ["T1", "T1ce", "T2", "FLAIR"]
    assert np.allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(ds.image_path("BraTS2021_00002", 1)))), 2.0)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(ds.label_path("BraTS2021_00000"))))
    assert sorted(np.unique(seg)) == [0, 1, 2, 3] and seg[3, 3, 3] == 3


def test_nested_autopet_layout_gets_case_ids_from_the_wildcards(tmp_path):
    src = tmp_path / "FDG-PET-CT-Lesions"
    for patient, study in (("PETCT_0af7ffe12a", "08-12-2005-NA-PET-CT Ganzkoerper-10445"),
                           ("PETCT_1285b86bea", "02-24-2006-NA-PET-CT Ganzkoerper-51034")):
        d = src / patient / study
        write(d / "CTres.nii.gz", np.zeros(SHAPE, np.int16))
        write(d / "SUV.nii.gz", np.zeros(SHAPE, np.float32))
        write(d / "SEG.nii.gz", label_array())
    data = convert_dataset(src, [("CT", "*/*/CTres.nii.gz"), ("PET", "*/*/SUV.nii.gz")], "*/*/SEG.nii.gz",
                           tmp_path / "out")
    assert data["labels"] == {"background": 0, "label_1": 1}
    assert validate_dataset(tmp_path / "out").cases == [
        "PETCT_0af7ffe12a_08-12-2005-NA-PET-CT_Ganzkoerper-10445",
        "PETCT_1285b86bea_02-24-2006-NA-PET-CT_Ganzkoerper-51034"]


def test_existing_output_is_refused_unless_overwrite(raw, tmp_path):
    out = tmp_path / "out"
    assert run(raw, out) == 0
    before = sorted(p.name for p in (out / "imagesTr").iterdir())
    assert run(raw, out) == 2
    assert run(raw, out, "--overwrite") == 0
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == before
    assert_nothing_written(tmp_path, ["raw", "out"])


def test_bad_arguments_are_configuration_errors(raw, tmp_path):
    with pytest.raises(ConfigError, match="consecutive"):
        parse_labels_map("background=0,lesion=2")
    assert main(["convert", "--images-dir", str(raw), "--channel", "CT", "--labels", "*_SEG.nii.gz",
                 "-o", str(tmp_path / "x")]) == 4
    with pytest.raises(InputError, match="no files match"):
        convert_dataset(raw, [("CT", "*_MR.nii.gz")], "*_XX.nii.gz", tmp_path / "out")
    assert_nothing_written(tmp_path, ["raw"])


def truncate(path):
    """Cut a .nii.gz's voxel data short (a valid gzip stream, so the header still reads)."""
    import gzip

    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[: len(data) - 100]))


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_never_replaces_a_folder_holding_the_inputs(raw, tmp_path, capsys):
    sb = tmp_path / "sb"
    sb.mkdir()
    raw.rename(sb / "raw")
    (sb / "precious.txt").write_text("x")
    (tmp_path / "link").symlink_to(sb)
    before = snapshot(sb)
    for out, problem in ((sb, "contains the input folder"), (tmp_path / "link", "contains the input folder"),
                         (sb / "raw", "is the input folder"), (sb / "raw" / "ds", "is inside the input folder")):
        assert run(sb / "raw", out, "--align", "--overwrite") == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"{out}: {problem} '{sb / 'raw'}'" in err
    # the labels folder counts as an input too
    assert main(["convert", "--images-dir", str(tmp_path / "link" / "raw"), "--channel", "CT=*_CT.nii.gz",
                 "--labels", "*_SEG.nii.gz", "--labels-dir", str(sb), "-o", str(sb / "raw2"), "--overwrite"]) == 2
    assert "is inside the input folder" in capsys.readouterr().err
    assert snapshot(sb) == before
    assert_nothing_written(tmp_path, ["sb", "link"])


def test_overwrite_replaces_a_dataset_folder_but_not_another_folder(raw, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run(raw, out, "--overwrite") == 2
    assert f"{out}: exists and is not a dataset folder; not replacing it" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    assert run(raw, out) == 0  # an empty folder is fine
    (out / "plans.json").write_text("{}")  # `veloxseg plan` writes here
    assert run(raw, out, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]
    assert_nothing_written(tmp_path, ["raw", "out"])


def test_a_failed_run_removes_the_parent_folders_it_created(raw, tmp_path, capsys):
    truncate(raw / "P002_CT.nii.gz")
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "nd2" / "ds", tmp_path / "kept" / "a" / "b" / "ds"):
        assert run(raw, out) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "P002_CT.nii.gz" in err and "truncated" in err
    assert_nothing_written(tmp_path, ["raw", "kept"])
    assert list((tmp_path / "kept").iterdir()) == []


def test_nan_voxels_are_refused_with_advice_for_converting(raw, tmp_path, capsys):
    write(raw / "P003_SUV.nii.gz", np.full(SHAPE, np.nan, np.float32))
    assert run(raw, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert "P003_SUV.nii.gz" in err and "NaN" in err and err.endswith("fix or mask them first")
    assert "segmenting" not in err
    assert_nothing_written(tmp_path, ["raw"])


def test_labels_map_must_map_background_to_zero(raw, tmp_path, capsys):
    for spec in ("bg=1,x=0", "bg=0,lesion=1"):
        argv = ["convert", "--images-dir", str(raw), "--channel", "CT=*_CT.nii.gz", "--labels", "*_SEG.nii.gz",
                "--labels-map", spec, "-o", str(tmp_path / "out")]
        assert main(argv) == 4
        assert "--labels-map: value 0 must be named 'background'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="value 0 must be named 'background'"):
        convert_dataset(raw, [("CT", "*_CT.nii.gz")], "*_SEG.nii.gz", tmp_path / "out", labels_map={"bg": 0, "x": 1})
    assert_nothing_written(tmp_path, ["raw"])
