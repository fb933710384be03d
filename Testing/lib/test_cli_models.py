"""``veloxseg models``: embedded and user bundles, as a table and as JSON; broken bundles listed."""
import json
import os
import subprocess
import sys

import pytest
import torch

from VeloxSegLib import bundle as B
from VeloxSegLib.cli import main


def meta(name, channels=("CT", "PET"), labels=("background", "lesion")):
    return {
        "format_version": 1, "name": name, "description": f"{name} for tests",
        "model": {"name": "veloxseg-b", "in_channels": [1] * len(channels), "num_classes": len(labels),
                  "patch_size": [64, 64, 64]},
        "spacing": [2.0, 2.0, 3.0],
        "channels": [{"name": c, "modality": c, "normalization": {"scheme": "none"}} for c in channels],
        "labels": [{"value": i, "name": n} for i, n in enumerate(labels)],
    }


@pytest.fixture
def model_dirs(tmp_path, monkeypatch):
    embedded, user = tmp_path / "embedded", tmp_path / "user"
    embedded.mkdir()
    user.mkdir()
    monkeypatch.setattr(B, "embedded_bundles_dir", lambda: embedded)
    monkeypatch.setenv("VELOXSEG_MODELS", str(user))
    state = {"w": torch.zeros(3)}
    B.save_bundle(embedded / "petct", meta("petct-lesion"), state)
    B.save_bundle(user / "brain.zip", meta("brain-mri", ("T1", "T1c", "T2", "FLAIR"),
                                           ("background", "edema", "core", "enhancing")), state)
    (user / "broken").mkdir()
    (user / "broken" / "bundle.json").write_text('{"format_version": 1}')
    return embedded, user


def test_table(model_dirs, capsys):
    embedded, user = model_dirs
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "MODEL", "CHANNELS", "LABELS", "PATH", "DESCRIPTION"]
    petct = next(line for line in lines if line.startswith("petct-lesion "))
    assert petct.split()[:5] == ["petct-lesion", "embedded", "veloxseg-b", "CT,PET", "lesion"]
    brain = next(line for line in lines if line.startswith("brain-mri "))
    assert brain.split()[:5] == ["brain-mri", "user", "veloxseg-b", "T1,T1c,T2,FLAIR", "edema,core,enhancing"]
    broken = next(line for line in lines if line.startswith("broken "))
    assert "ERROR:" in broken and "name is missing" in broken
    assert f"User models folder: {user}" in out


def test_json(model_dirs, capsys):
    embedded, user = model_dirs
    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["user_dir"] == str(user) and data["embedded_dir"] == str(embedded)
    by_name = {e["name"]: e for e in data["bundles"]}
    assert by_name["petct-lesion"]["source"] == "embedded"
    assert by_name["brain-mri"]["path"] == str(user / "brain.zip")
    assert by_name["brain-mri"]["labels"] == ["background", "edema", "core", "enhancing"]
    assert "error" in by_name["broken"] and "error" not in by_name["petct-lesion"]


def test_empty_and_subprocess(tmp_path):
    env = dict(os.environ, VELOXSEG_MODELS=str(tmp_path / "none"))
    proc = subprocess.run([sys.executable, "-m", "VeloxSegLib.cli", "models", "--json"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["user_dir"] == str(tmp_path / "none")
    assert all(e["source"] == "embedded" for e in data["bundles"])  # whatever the package ships
    assert all("error" not in e for e in data["bundles"]), "a shipped bundle is broken"


def test_same_name_shows_paths_and_which_is_shadowed(model_dirs, capsys):
    embedded, user = model_dirs
    B.save_bundle(user / "mine", meta("petct-lesion"), {"w": torch.ones(3)})
    assert main(["models", "--json"]) == 0
    rows = [e for e in json.loads(capsys.readouterr().out)["bundles"] if e["name"] == "petct-lesion"]
    assert [(e["source"], e["path"]) for e in rows] == [("embedded", str(embedded / "petct")),
                                                          ("user", str(user / "mine"))]
    assert rows[0]["shadowed_by"] == str(user / "mine") and "shadowed_by" not in rows[1]
    assert B.find_bundle("petct-lesion") == user / "mine"
    assert main(["models"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("petct-lesion ")]
    assert len(lines) == 2
    assert str(embedded / "petct") in lines[0] and f"(shadowed by {user / 'mine'})" in lines[0]
    assert str(user / "mine") in lines[1] and "shadowed" not in lines[1]


def test_models_help_states_the_precedence(capsys):
    with pytest.raises(SystemExit):
        main(["models", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "picks a user bundle before an embedded one" in out and "shadowed by PATH" in out


def test_broken_user_bundle_named_like_an_embedded_one_is_refused(model_dirs, capsys, tmp_path):
    import numpy as np
    import SimpleITK as sitk

    embedded, user = model_dirs
    (user / "petct-lesion").mkdir()
    (user / "petct-lesion" / "bundle.json").write_text("{not json")
    with pytest.raises(B.BundleError) as exc:
        B.find_bundle("petct-lesion")
    assert str(user / "petct-lesion") in str(exc.value) and "not valid JSON" in str(exc.value)
    images = []
    for ch in ("CT", "PET"):
        images.append(tmp_path / f"{ch}.nii.gz")
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.float32)), str(images[-1]))
    out = tmp_path / "seg.nii.gz"
    code = main(["predict", "-m", "petct-lesion", "-i", *map(str, images), "-o", str(out), "--progress", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and not out.exists() and len(err) == 1
    assert str(user / "petct-lesion") in err[0] and "cannot be loaded" in err[0]
    assert main(["models", "--json"]) == 0  # the embedded one is marked as shadowed by the broken one
    rows = [e for e in json.loads(capsys.readouterr().out)["bundles"] if e["source"] == "embedded"]
    assert rows[0]["shadowed_by"] == str(user / "petct-lesion")
