"""Bundle metadata for the panel, importing user models, guessing inputs from volume names."""
import json
import os
import zipfile

import pytest
from logic_helpers import bundle_json

from VeloxSegLogic import bundles as B
from VeloxSegLogic.errors import BundleError, InputError


def test_bundle_info_reads_channels_and_labels(metadata_bundle):
    info = B.read_bundle_info(str(metadata_bundle))
    assert info.name == "petct-test" and info.channel_names == ["CT", "PET"]
    assert [lab["name"] for lab in info.labels] == ["background", "lesion", "liver", "kidney"]


def test_import_bundle_from_zip_with_top_folder(tmp_path, metadata_bundle):
    archive = tmp_path / "b.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("bundle.json", "model.safetensors"):
            zf.write(metadata_bundle / name, f"petct-test/{name}")
    info = B.import_bundle(str(archive), str(tmp_path / "models"))
    assert info.path == os.path.abspath(str(tmp_path / "models" / "petct-test"))
    assert sorted(os.listdir(info.path)) == ["bundle.json", "model.safetensors"]
    with pytest.raises(InputError, match="already exists"):
        B.import_bundle(str(archive), str(tmp_path / "models"))


def test_import_refuses_a_folder_without_weights(tmp_path):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "bundle.json").write_text(json.dumps(bundle_json("noweights")))
    with pytest.raises(BundleError, match="model.safetensors"):
        B.import_bundle(str(folder), str(tmp_path / "models"))
    assert not (tmp_path / "models" / "noweights").exists()


def test_zip_with_unsafe_paths_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("bundle.json", json.dumps(bundle_json("evil")))
        zf.writestr("../../escape.txt", "x")
    with pytest.raises(BundleError, match="unsafe"):
        B.import_bundle(str(archive), str(tmp_path / "models"))


@pytest.mark.parametrize("names,expected", [
    (["patient CT", "patient PET"], [0, 1]),
    (["PET_AC", "CT_abdomen"], [1, 0]),
    (["suv map", "ctac"], [1, 0]),
    (["Volume 1", "Volume 2"], [0, 1]),
])
def test_pet_ct_inputs_guessed_from_names(names, expected):
    channels = bundle_json()["channels"]
    assert B.guess_inputs(channels, names) == expected


def test_mri_inputs_guessed_without_t1_taking_t1ce():
    channels = [{"name": n, "modality": "MR"} for n in ("T1", "T1ce", "T2", "FLAIR")]
    names = ["BraTS_001_flair", "BraTS_001_t1ce", "BraTS_001_t2", "BraTS_001_t1"]
    assert B.guess_inputs(channels, names) == [3, 1, 2, 0]


def test_model_names_are_safe_folder_names():
    assert B.check_model_name(" my-model_2.1 ") == "my-model_2.1"
    for bad in ("", "../x", "a/b", "-x", "a" * 100):
        with pytest.raises(InputError):
            B.check_model_name(bad)
