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


def test_import_bundle_from_zip_with_top_folder(tmp_path):
    from logic_helpers import random_bundle

    bundle = random_bundle(str(tmp_path / "source"))
    name = B.read_bundle_info(str(bundle)).name
    archive = tmp_path / "b.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for member in ("bundle.json", "model.safetensors"):
            zf.write(os.path.join(str(bundle), member), f"{name}/{member}")
    info = B.import_bundle(str(archive), str(tmp_path / "models"))
    assert info.path == os.path.abspath(str(tmp_path / "models" / name))
    assert sorted(os.listdir(info.path)) == ["bundle.json", "model.safetensors"]
    with pytest.raises(InputError, match="already exists"):
        B.import_bundle(str(archive), str(tmp_path / "models"))
    assert os.listdir(tmp_path / "models") == [name]  # no staging folder left


def test_import_refuses_what_the_model_list_would_show_as_broken(tmp_path, metadata_bundle):
    """The library's own checks run at import: an invalid setting or a weights file that is not
    safetensors is refused, not copied into a folder where the panel would never list it."""
    from logic_helpers import random_bundle

    bundle = random_bundle(str(tmp_path / "source"))
    meta = json.loads(open(os.path.join(str(bundle), "bundle.json")).read())
    meta.setdefault("inference", {})["overlap"] = 5
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "bundle.json").write_text(json.dumps(meta))
    (bad / "model.safetensors").write_bytes(open(os.path.join(str(bundle), "model.safetensors"), "rb").read())
    with pytest.raises(BundleError, match="overlap"):
        B.import_bundle(str(bad), str(tmp_path / "models"))
    with pytest.raises(BundleError):  # placeholder weights: not a safetensors file
        B.import_bundle(str(metadata_bundle), str(tmp_path / "models"))
    assert not (tmp_path / "models").exists() or os.listdir(tmp_path / "models") == []


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


def test_model_names_are_safe_folder_names_the_library_lists():
    assert B.check_model_name(" my-model_2.1 ") == "my-model_2.1"
    assert B.check_model_name("veloxseg-b+ft") == "veloxseg-b+ft"  # the library's names allow '+'
    assert B.check_model_name("a" * 128) == "a" * 128
    for bad in ("", "../x", "a/b", "-x", "a" * 129, "mine.training", ".hidden"):
        with pytest.raises(InputError):
            B.check_model_name(bad)


def test_ensemble_partners_are_the_other_models_with_the_same_inputs_and_labels(tmp_path):
    from logic_helpers import labels_meta

    def info(name, **kwargs):
        folder = tmp_path / name
        folder.mkdir()
        meta = bundle_json(name=name, **{k: v for k, v in kwargs.items() if k in ("channels", "labels")})
        meta["spacing"] = kwargs.get("spacing", meta["spacing"])
        (folder / "bundle.json").write_text(json.dumps(meta), encoding="utf-8")
        return B.read_bundle_info(str(folder))

    fine = info("fine")
    coarse = info("coarse", spacing=[5.0, 5.0, 7.5])  # another configuration: may join
    twin = info("fine-copy")
    ct_only = info("ct-only", channels=("CT",))
    swapped = info("swapped", channels=("PET", "CT"))
    other_labels = info("other-labels", labels=labels_meta()[:2])
    infos = [fine, ct_only, coarse, swapped, other_labels, twin]
    assert [b.name for b in B.ensemble_partners(infos, fine)] == ["coarse", "fine-copy"]
    assert "takes PET, CT" in B.ensemble_mismatch(fine, swapped)
    assert "gives other labels" in B.ensemble_mismatch(fine, other_labels)
    assert B.ensemble_mismatch(fine, coarse) is None
    # the same bundle listed under another spelling of its path is not its own partner
    assert B.ensemble_partners([B.read_bundle_info(str(tmp_path / "." / "fine"))], fine) == []
