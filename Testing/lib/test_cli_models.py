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
    assert lines[0].split() == ["NAME", "SOURCE", "MODEL", "CHANNELS", "LABELS", "DESCRIPTION"]
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
