"""nnU-Net v2 raw datasets on disk (VeloxSegLib.data.nnunet)."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from VeloxSegLib.data import nnunet
from VeloxSegLib.errors import InputError


def write(path, arr, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(np.asarray(arr))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)


def make_dataset(root, cases=("a", "b"), channels=("CT", "PET"), labels=None):
    labels = labels or {"background": 0, "lesion": 1}
    for case in cases:
        for c in range(len(channels)):
            write(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", np.full((6, 7, 8), c, np.float32))
        lab = np.zeros((6, 7, 8), np.uint8)
        lab[2:4, 2:4, 2:4] = 1
        write(root / "labelsTr" / f"{case}.nii.gz", lab)
    data = nnunet.make_dataset_json(list(channels), labels, len(cases))
    nnunet.write_dataset_json(root, data)
    return root


def test_dataset_json_round_trip(tmp_path):
    data = nnunet.make_dataset_json(["CT", "PET"], {"background": 0, "lesion": 1}, 2, name="x", extra_key=[1, 2])
    nnunet.write_dataset_json(tmp_path, data)
    assert json.loads((tmp_path / "dataset.json").read_text()) == data
    assert data == {"channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "lesion": 1},
                    "numTraining": 2, "file_ending": ".nii.gz", "name": "x", "extra_key": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["dataset.json"]  # no temporary file left


def test_load_dataset_lists_cases_and_paths(tmp_path):
    make_dataset(tmp_path, cases=("c2", "c1"))
    ds = nnunet.load_dataset(tmp_path)
    assert ds.cases == ["c1", "c2"] and ds.channel_list == ["CT", "PET"] and ds.num_training == 2
    assert ds.image_paths("c1") == [tmp_path / "imagesTr/c1_0000.nii.gz", tmp_path / "imagesTr/c1_0001.nii.gz"]
    assert ds.label_path("c1") == tmp_path / "labelsTr/c1.nii.gz"
    assert ds.label_values() == [(0, "background"), (1, "lesion")]
    assert nnunet.list_cases(tmp_path) == ["c1", "c2"]


def test_existing_nnunet_region_labels_are_read(tmp_path):
    labels = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3}
    root = make_dataset(tmp_path, cases=("a",), channels=("T1", "T1ce", "T2", "FLAIR"), labels=labels)
    ds = nnunet.validate_dataset(root)
    assert ds.label_values() == [(0, "background"), (1, "label_1"), (2, "label_2"), (3, "enhancing_tumor")]


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("channel_names"), "missing key 'channel_names'"),
    (lambda d: d.update(labels={"background": 0, "lesion": 2}), "consecutive"),
    (lambda d: d.update(labels={"lesion": 1}), "background"),
    (lambda d: d.update(labels={"bg": 0, "lesion": 1}), "must map 'background' to 0.*lacks 'background'"),
    (lambda d: d.update(labels={"background": 1, "lesion": 0}), "must map 'background' to 0.*got 1"),
    (lambda d: d.update(channel_names={"1": "CT"}), "channel_names"),
    (lambda d: d.update(numTraining="2"), "numTraining"),
    (lambda d: d.update(file_ending="nii.gz"), "file_ending"),
])
def test_invalid_dataset_json_is_refused_naming_the_problem(tmp_path, change, message):
    make_dataset(tmp_path)
    data = json.loads((tmp_path / "dataset.json").read_text())
    change(data)
    (tmp_path / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=message):
        nnunet.load_dataset(tmp_path)


def test_missing_dataset_json_is_refused(tmp_path):
    with pytest.raises(InputError, match="dataset.json: missing"):
        nnunet.load_dataset(tmp_path)


def test_case_missing_a_channel_is_named(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "imagesTr/b_0001.nii.gz").unlink()
    with pytest.raises(InputError, match=r"case 'b' lacks channel PET \(b_0001.nii.gz\)"):
        nnunet.load_dataset(tmp_path)


def test_images_without_label_are_named(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "labelsTr/a.nii.gz").unlink()
    data = json.loads((tmp_path / "dataset.json").read_text())
    data["numTraining"] = 1
    (tmp_path / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="case 'a' has images .* but no label"):
        nnunet.load_dataset(tmp_path)


def test_num_training_must_match(tmp_path):
    make_dataset(tmp_path)
    data = json.loads((tmp_path / "dataset.json").read_text())
    data["numTraining"] = 3
    (tmp_path / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="numTraining is 3 but labelsTr holds 2"):
        nnunet.load_dataset(tmp_path)


def test_label_off_the_image_grid_is_named(tmp_path):
    make_dataset(tmp_path)
    write(tmp_path / "labelsTr/b.nii.gz", np.zeros((6, 7, 8), np.uint8), spacing=(1.0, 1.0, 2.0))
    nnunet.load_dataset(tmp_path)  # the layout is fine; the geometry is not
    with pytest.raises(InputError, match=r"case 'b': label does not match the image grid of CT \(spacing"):
        nnunet.validate_dataset(tmp_path)


def test_channels_on_other_grids_must_overlap(tmp_path):
    make_dataset(tmp_path)
    # a PET on its own coarser grid, overlapping the CT: fine by default, refused when strict
    write(tmp_path / "imagesTr/a_0001.nii.gz", np.ones((3, 4, 4), np.float32), spacing=(2.0, 2.0, 2.0),
          origin=(0.5, 0.5, 0.5))
    nnunet.validate_dataset(tmp_path)
    with pytest.raises(InputError, match="case 'a': PET is not on CT's voxel grid"):
        nnunet.validate_dataset(tmp_path, same_grid=True)
    # a PET elsewhere in physical space is refused
    write(tmp_path / "imagesTr/a_0001.nii.gz", np.ones((3, 4, 4), np.float32), origin=(500.0, 0.0, 0.0))
    with pytest.raises(InputError, match="case 'a': PET does not overlap CT in physical space"):
        nnunet.validate_dataset(tmp_path)


def test_unreadable_image_is_named(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "imagesTr/a_0000.nii.gz").write_bytes(b"not an image")
    with pytest.raises(InputError, match="a_0000.nii.gz"):
        nnunet.validate_dataset(tmp_path)


def test_atomic_directory_leaves_nothing_behind_on_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with nnunet.atomic_directory(out) as tmp:
            (tmp / "file").write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_refuses_then_replaces_existing_output(tmp_path):
    out = tmp_path / "out"
    (out / "imagesTr").mkdir(parents=True)
    (out / "dataset.json").write_text("{}")
    with pytest.raises(InputError, match="not empty"):
        with nnunet.atomic_directory(out):
            pass
    with nnunet.atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_directory_refuses_an_output_that_is_contains_or_is_inside_an_input(tmp_path):
    src = tmp_path / "sb" / "raw"
    src.mkdir(parents=True)
    (src / "P001_CT.nii.gz").write_text("input")
    (tmp_path / "link").symlink_to(tmp_path / "sb")
    for output, problem in ((src, "is the input folder"), (tmp_path / "sb", "contains the input folder"),
                            (tmp_path / "link", "contains the input folder"),  # symlinks are resolved
                            (src / "ds", "is inside the input folder"), (tmp_path / "link/raw/ds", "is inside")):
        with pytest.raises(InputError, match=problem):
            with nnunet.atomic_directory(output, overwrite=True, inputs=[src]) as tmp:
                (tmp / "dataset.json").write_text("{}")
    assert (src / "P001_CT.nii.gz").read_text() == "input"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["P001_CT.nii.gz", "link", "raw", "sb"]


def test_overwrite_replaces_only_a_dataset_folder(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "dataset.json").write_text("{}")  # a dataset.json alone does not make a dataset folder
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match=r"mine: exists and is not a dataset folder; not replacing it"):
        with nnunet.atomic_directory(mine, overwrite=True):
            pass
    assert sorted(p.name for p in mine.iterdir()) == ["dataset.json", "notes.txt"]
    (tmp_path / "alias").symlink_to(mine)
    with pytest.raises(InputError, match="alias: exists and is a symbolic link; not replacing it"):
        with nnunet.atomic_directory(tmp_path / "alias", overwrite=True):
            pass
    ds = make_dataset(tmp_path / "ds")
    (ds / "plans.json").write_text("{}")  # what `veloxseg plan` adds
    with nnunet.atomic_directory(ds, overwrite=True) as tmp:
        (tmp / "dataset.json").write_text("{}")
    assert [p.name for p in ds.iterdir()] == ["dataset.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alias", "ds", "mine"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_directory_removes_the_parent_folders_it_created_on_error(tmp_path, error):
    (tmp_path / "a").mkdir()  # exists before the run: stays
    with pytest.raises(error):
        with nnunet.atomic_directory(tmp_path / "a" / "b" / "c" / "out") as tmp:
            assert (tmp_path / "a" / "b" / "c").is_dir()
            (tmp / "file").write_text("partial")
            raise error()
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")] == ["a"]
    with nnunet.atomic_directory(tmp_path / "a" / "b" / "out") as tmp:  # on success they stay
        (tmp / "file").write_text("done")
    assert (tmp_path / "a" / "b" / "out" / "file").read_text() == "done"
