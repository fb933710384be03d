"""Fine-tuning from the scene: case export to nnU-Net format, the job, the live plot."""
import json
import os
import sys

import numpy as np
import pytest
from logic_helpers import HELPERS, bundle_json, ijk_to_ras_matrix, labels_meta

from VeloxSegLogic import finetune as F
from VeloxSegLogic import segmentation as S
from VeloxSegLogic import volumes as V
from VeloxSegLogic.bundles import read_bundle_info
from VeloxSegLogic.errors import InputError

CHANNELS = bundle_json()["channels"]


def _case(scene, prefix, shift=0.0):
    ct_matrix = ijk_to_ras_matrix((1.0, 1.2, 2.5), (shift, 0, 0), (0, 8, 3))
    ct = V.add_volume_from_array(scene, np.random.default_rng(1).normal(size=(8, 12, 10)).astype(np.float32), ct_matrix, f"{prefix} CT")
    pet = V.add_volume_from_array(scene, np.ones((6, 8, 8), np.float32), ijk_to_ras_matrix((2, 2, 3), (shift - 4, -4, -4)), f"{prefix} PET")
    labels = np.zeros((8, 12, 10), np.uint8)
    labels[2:4, 3:6, 3:6] = 1
    labels[5:7, 6:9, 2:4] = 2
    seg = S.create_segmentation_node(scene, f"{prefix} truth", ct)
    S.import_label_array(seg, labels, ct, labels_meta())
    return ct, pet, seg, labels


def test_exported_dataset_has_nnunet_layout_and_dataset_json(scene, tmp_path):
    import SimpleITK as sitk

    ct1, pet1, seg1, labels1 = _case(scene, "p1")
    ct2, pet2, seg2, _ = _case(scene, "p2", shift=30.0)
    cases = [F.FineTuneCase([ct1, pet1], seg1, "p1"), F.FineTuneCase([ct2, pet2], seg2, "p2")]
    folder = F.export_nnunet_dataset(cases, CHANNELS, labels_meta(), str(tmp_path / "ds"))
    dataset = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT", "1": "PET"}
    assert dataset["labels"] == {"background": 0, "lesion": 1, "liver": 2, "kidney": 3}
    assert dataset["numTraining"] == 2 and dataset["file_ending"] == ".nii.gz"
    names = [c.case_name(i) for i, c in enumerate(cases)]
    assert sorted(os.listdir(os.path.join(folder, "imagesTr"))) == sorted(f"{n}_{c:04d}.nii.gz" for n in names for c in range(2))
    assert sorted(os.listdir(os.path.join(folder, "labelsTr"))) == sorted(f"{n}.nii.gz" for n in names)
    label = sitk.ReadImage(os.path.join(folder, "labelsTr", f"{names[0]}.nii.gz"))
    pet = sitk.ReadImage(os.path.join(folder, "imagesTr", f"{names[0]}_0001.nii.gz"))
    ct = sitk.ReadImage(os.path.join(folder, "imagesTr", f"{names[0]}_0000.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(label), labels1)
    for image in (label, pet):
        assert image.GetSize() == ct.GetSize()
        assert np.allclose(image.GetOrigin(), ct.GetOrigin(), atol=1e-4)
        assert np.allclose(image.GetDirection(), ct.GetDirection(), atol=1e-5)


def test_export_refuses_a_case_without_a_matching_segment(scene, tmp_path):
    ct, pet, _, _ = _case(scene, "p1")
    other = S.create_segmentation_node(scene, "unrelated", ct)
    other.GetSegmentation().AddEmptySegment("tumour_core", "tumour core")
    with pytest.raises(InputError, match="no segment named"):
        F.export_nnunet_dataset([F.FineTuneCase([ct, pet], other)], CHANNELS, labels_meta(), str(tmp_path / "ds"))


def test_a_refused_case_leaves_no_exported_images_in_the_temporary_folder(scene, tmp_path, monkeypatch):
    import tempfile

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where mkdtemp makes the export folder
    ct1, pet1, seg1, _ = _case(scene, "p1")
    ct2, pet2, _, _ = _case(scene, "p2", shift=30.0)
    other = S.create_segmentation_node(scene, "unrelated", ct2)
    other.GetSegmentation().AddEmptySegment("tumour_core", "tumour core")
    cases = [F.FineTuneCase([ct1, pet1], seg1, "p1"), F.FineTuneCase([ct2, pet2], other, "p2")]
    with pytest.raises(InputError, match="no segment named"):
        F.export_nnunet_dataset(cases, CHANNELS, labels_meta())
    assert os.listdir(temp) == []  # case p1 had been written before p2 was refused


def test_cases_are_collected_from_the_scene_by_name(scene):
    ct1, pet1, seg1, _ = _case(scene, "alpha")
    ct2, pet2, seg2, _ = _case(scene, "beta", shift=30.0)
    cases = F.collect_cases(scene, CHANNELS)
    found = {c.segmentation_node.GetName(): [v.GetName() for v in c.volume_nodes] for c in cases}
    assert found == {"alpha truth": ["alpha CT", "alpha PET"], "beta truth": ["beta CT", "beta PET"]}


def _stand_in(args):
    """Run the test stand-in with the arguments the job built for ``python -m VeloxSegLib.cli finetune``."""
    assert args[1:4] == ["-m", "VeloxSegLib.cli", "finetune"] and args[args.index("--progress") + 1] == "json"
    return [sys.executable, os.path.join(HELPERS, "fake_finetune.py")] + args[4:]


def test_finetune_job_reports_epochs_plots_them_and_registers_the_bundle(scene, tmp_path, metadata_bundle):
    ct, pet, seg, _ = _case(scene, "p1")
    plot = F.FineTunePlot(scene)
    epochs = []
    job = F.FineTuneJob(str(metadata_bundle), [F.FineTuneCase([ct, pet], seg)], CHANNELS, labels_meta(), "my-model",
                        epochs=3, lr=1e-3, models_dir=str(tmp_path / "models"),
                        on_epoch=lambda r: (epochs.append(r), plot.add(r)))
    job.start(command=_stand_in)
    info = job.wait(timeout=120)
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert info.name == "my-model" and info.path == os.path.abspath(str(tmp_path / "models" / "my-model"))
    rows = plot.rows()
    assert [r[0] for r in rows] == [0.0, 1.0, 2.0]
    assert rows[0][1] == pytest.approx(1.0) and rows[2][2] == pytest.approx(0.7)
    assert read_bundle_info(str(metadata_bundle)).name == "petct-test"  # the source bundle is untouched
    assert not os.path.exists(job.temp_dir)  # the exported cases and the checkpoints are cleaned up
    # checkpoints went under the exported dataset, not beside the new bundle in the models folder
    assert os.listdir(tmp_path / "models") == ["my-model"]


def _hanging_job(scene, tmp_path, metadata_bundle, name, on_done=None):
    """A fine-tune job whose stand-in hangs after its first epoch; returned once that epoch arrived."""
    import time

    ct, pet, seg, _ = _case(scene, "p1")
    job = F.FineTuneJob(str(metadata_bundle), [F.FineTuneCase([ct, pet], seg)], CHANNELS, labels_meta(), name,
                        epochs=3, models_dir=str(tmp_path / "models"), on_done=on_done)
    seen = []
    job.on_epoch = seen.append
    job.start(command=lambda args: _stand_in(args) + ["--hang"])
    deadline = time.monotonic() + 60
    while not seen and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    assert seen, "the stand-in printed no epoch"
    return job


def test_stopping_finetune_removes_the_partial_bundle(scene, tmp_path, metadata_bundle):
    job = _hanging_job(scene, tmp_path, metadata_bundle, "half")
    job.stop()
    with pytest.raises(Exception, match="stopped"):
        job.wait(timeout=60)
    assert not os.path.exists(job.output_bundle)


def test_shutdown_stops_finetuning_and_removes_what_it_wrote(scene, tmp_path, metadata_bundle):
    """Scene close or application exit: nothing polls afterwards, so shutdown must finish the job itself."""
    done = []
    job = _hanging_job(scene, tmp_path, metadata_bundle, "left", on_done=lambda *a: done.append(a))
    assert os.path.isdir(job.dataset_dir) and os.path.isdir(job.output_bundle)
    job.shutdown(timeout=30)
    assert not job.running and job.error == "stopped" and done == []
    assert not os.path.exists(job.output_bundle) and not os.path.exists(job.temp_dir)


def test_new_model_name_must_be_a_safe_folder_name(tmp_path, metadata_bundle):
    with pytest.raises(InputError):
        F.FineTuneJob(str(metadata_bundle), [], CHANNELS, labels_meta(), "../evil", models_dir=str(tmp_path))


def test_exported_dataset_is_accepted_by_veloxseg_plan(scene, tmp_path):
    import subprocess

    from logic_helpers import ROOT

    try:
        from VeloxSegLib.commands import plan  # noqa: F401
    except ImportError:
        pytest.skip("veloxseg plan is not available yet")
    cases = []
    for i in range(3):
        ct, pet, seg, _ = _case(scene, f"c{i}", shift=40.0 * i)
        cases.append(F.FineTuneCase([ct, pet], seg, f"c{i}"))
    folder = F.export_nnunet_dataset(cases, CHANNELS, labels_meta(), str(tmp_path / "ds"))
    result = subprocess.run([sys.executable, "-m", "VeloxSegLib.cli", "plan", folder, "-o", str(tmp_path / "plans.json")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "plans.json").read_text())


def test_real_finetune_command_runs_one_short_epoch_into_a_new_bundle(scene, tmp_path):
    """The library's own ``veloxseg finetune`` on cases exported from the scene (random-weights bundle)."""
    from logic_helpers import random_bundle

    source = random_bundle(str(tmp_path / "source"))
    try:
        from VeloxSegLib.commands import finetune  # noqa: F401
    except ImportError:
        pytest.skip("veloxseg finetune is not available yet")
    cases = []
    for i in range(2):
        ct, pet, seg, _ = _case(scene, f"c{i}", shift=40.0 * i)
        cases.append(F.FineTuneCase([ct, pet], seg, f"c{i}"))
    labels = [{"value": 0, "name": "background"}, labels_meta()[1]]
    epochs, fractions, logs, prepared = [], [], [], []

    def on_progress(f, r):
        if r.get("event") == "prepare":
            prepared.append((f, r["stage"], r["done"], r["total"]))
        else:
            fractions.append(f)

    job = F.FineTuneJob(str(source), cases, CHANNELS, labels, "tuned", epochs=1, lr=1e-4, device="cpu",
                        models_dir=str(tmp_path / "models"), on_epoch=epochs.append,
                        on_progress=on_progress, on_log=logs.append)
    job.start(command=lambda args: args + ["--iterations-per-epoch", "2"])
    info = job.wait(timeout=600)
    assert [r["epoch"] for r in epochs] == [0] and "total" in epochs[0]["loss"]
    # the parent's weights are validated before training, and the panel log says so in words
    assert isinstance(job.start_dice, float)
    assert any(line.startswith("Starting weights: validation Dice") for line in logs)
    assert info.name == "tuned" and os.path.isfile(os.path.join(info.path, "model.safetensors"))
    assert fractions and fractions[-1] <= 1.0
    # preprocessing the exported cases is reported case by case, without moving the training bar
    assert prepared and prepared[-1][1:] == ("preprocess", prepared[-1][3], prepared[-1][3])
    assert all(f == 0.0 for f, *_ in prepared) and not any("event=prepare" in line for line in logs)
    # no checkpoint folder is left in the models folder to block a later run of the same name
    assert os.listdir(tmp_path / "models") == ["tuned"] and not os.path.exists(job.temp_dir)
