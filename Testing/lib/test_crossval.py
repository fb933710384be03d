"""``veloxseg crossval``: out-of-fold predictions of a cross-validation's folds, their scores, the
post-processing choice and the packed ensemble (nnU-Net's find_best_configuration)."""
import copy
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from VeloxSegLib.bundle import embedded_bundles_dir, load_bundle, save_bundle
from VeloxSegLib.cli import main
from VeloxSegLib.errors import Cancelled, ConfigError, InputError
from VeloxSegLib.infer.pipeline import Segmenter
from VeloxSegLib.train.crossval import SUMMARY_NAME, cross_validate
from VeloxSegLib.train.trainer import split_cases

DEMO = embedded_bundles_dir() / "petct-lesion-demo"


def _fold_bundle(folder, name, val_cases, seed, noise=0.05, inference=None, spacing=None, **metrics):
    """The PET/CT demo with its convolution weights jittered (a different network per seed) and a
    training record naming ``val_cases`` as the fold's held-out cases."""
    demo = load_bundle(DEMO)
    meta = copy.deepcopy(demo.meta)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, t in demo.state_dict().items():
        if t.is_floating_point() and t.dim() >= 2:
            t = t + noise * t.std() * torch.randn(t.shape, generator=g, dtype=t.dtype)
        state[key] = t
    meta["name"] = name
    meta["inference"].update(inference or {})
    if spacing is not None:  # another configuration
        meta["spacing"] = list(spacing)
    meta["training"] = {"metrics": {"val_cases": list(val_cases), "validated_on": "held-out", **metrics}}
    return save_bundle(Path(folder) / name, meta, state)


@pytest.fixture(scope="module")
def cv(tmp_path_factory):
    """Five phantoms, five folds (one held-out case each), and one crossval run through the
    command line with --pack."""
    from VeloxSegLib.data.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("cv")
    ds = root / "ds"
    write_phantom_dataset(ds, "petct", 5, seed=11, size=(64, 64, 48))
    cases = sorted(p.name[:-len(".nii.gz")] for p in (ds / "labelsTr").iterdir())
    folds = [_fold_bundle(root, f"fold{k}", split_cases(cases, fold=k)[1], seed=k) for k in range(5)]
    before = {p: p.read_bytes() for f in [ds, *folds] for p in sorted(Path(f).rglob("*")) if p.is_file()}
    torch.set_num_threads(2)
    out, pack = root / "out", root / "packed"
    rc = main(["crossval", str(ds), *map(str, folds), "-o", str(out), "--pack", str(pack), "--threads", "2",
               "--min-component-candidates", "0", "30", "300", "3000", "--progress", "none"])
    assert rc == 0
    return {"root": root, "ds": ds, "cases": cases, "folds": folds, "out": out, "pack": pack, "before": before,
            "summary": json.loads((out / SUMMARY_NAME).read_text())}


def _labels(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _inputs(ds, case):
    return [str(ds / "imagesTr" / f"{case}_000{c}.nii.gz") for c in range(2)]


def _dice(p, r):
    p, r = p > 0, r > 0
    den = p.sum() + r.sum()
    return 1.0 if den == 0 else 2.0 * (p & r).sum() / den


def test_each_case_is_predicted_by_the_fold_that_held_it_out(cv):
    ds, folds, s = cv["ds"], cv["folds"], cv["summary"]
    assert s["validated_cases"] == 5 and s["cases_not_validated"] == []
    owners = {c["case"]: c["fold"] for c in s["per_case"]}
    differs = 0
    for case in cv["cases"]:
        k = owners[case]
        assert case in split_cases(cv["cases"], fold=k)[1]
        got = _labels(cv["out"] / "predictions" / f"{case}.nii.gz")
        own = sitk.GetArrayFromImage(Segmenter(str(folds[k]), device="cpu").predict(_inputs(ds, case)).labels)
        assert np.array_equal(got, own)
        other = sitk.GetArrayFromImage(
            Segmenter(str(folds[(k + 1) % 5]), device="cpu").predict(_inputs(ds, case)).labels)
        differs += not np.array_equal(got, other)
    assert differs >= 3  # the folds are different networks: which one predicts a case matters


def test_scores_are_the_dice_of_the_written_predictions_per_case_fold_and_overall(cv):
    s, ds = cv["summary"], cv["ds"]
    per_case = {}
    for case in cv["cases"]:
        pred = _labels(cv["out"] / "predictions" / f"{case}.nii.gz")
        per_case[case] = _dice(pred, _labels(ds / "labelsTr" / f"{case}.nii.gz"))
    assert {c["case"]: c["metrics"]["lesion"]["dice"] for c in s["per_case"]} == pytest.approx(per_case, abs=1e-9)
    assert s["mean"]["lesion"]["dice"] == pytest.approx(np.mean(list(per_case.values())), abs=1e-9)
    assert 0.3 < s["mean"]["lesion"]["dice"] < 1.0  # the demo's networks, jittered: real segmentations
    for f in s["folds"]:
        assert f["mean"]["lesion"]["dice"] == pytest.approx(np.mean([per_case[c] for c in f["cases"]]), abs=1e-9)


def _rows(pp):
    return {(r["pet_refine"], r["min_component_mm3"]): r for r in pp["candidates"]}


def test_the_sweep_scores_what_predicting_with_each_setting_gives(cv):
    """Every (PET refinement, smallest component) pair scores what predicting with it gives."""
    s, ds, folds = cv["summary"], cv["ds"], cv["folds"]
    rows = _rows(s["postprocessing"])
    assert sorted(rows) == [(r, v) for r in (False, True) for v in (0.0, 30.0, 300.0, 3000.0)]
    owners = {c["case"]: c["fold"] for c in s["per_case"]}
    segs = [Segmenter(str(f), device="cpu") for f in folds]
    for refine, volume in ((True, 300.0), (False, 3000.0), (False, 0.0)):
        dice = []
        for case in cv["cases"]:
            pred = segs[owners[case]].predict(_inputs(ds, case), min_component_mm3=volume, pet_refine=refine).labels
            dice.append(_dice(sitk.GetArrayFromImage(pred), _labels(ds / "labelsTr" / f"{case}.nii.gz")))
        assert rows[refine, volume]["dice"]["lesion"] == pytest.approx(np.mean(dice), abs=1e-9)
    # each dimension moves something
    assert rows[True, 3000.0]["dice"]["lesion"] != rows[True, 0.0]["dice"]["lesion"]
    assert rows[False, 0.0]["dice"]["lesion"] != rows[True, 0.0]["dice"]["lesion"]
    # the folds' own settings (the demo's: refinement on, 0 mm^3) score what the written predictions score
    assert s["postprocessing"]["current"] == {"pet_refine": True, "min_component_mm3": 0.0}
    assert rows[True, 0.0]["dice"]["lesion"] == pytest.approx(s["mean"]["lesion"]["dice"], abs=1e-9)


def test_the_choice_is_the_best_setting_when_it_gains_more_than_the_noise(cv):
    pp = cv["summary"]["postprocessing"]
    rows = {k: r["foreground_dice"] for k, r in _rows(pp).items()}
    own = (True, 0.0)
    best = max(rows, key=lambda k: (rows[k], k == own, k[0] == own[0], -k[1]))
    expected = best if rows[best] - rows[own] > 0.001 else own
    assert (pp["best"]["pet_refine"], pp["best"]["min_component_mm3"]) == expected
    assert pp["gain"] == pytest.approx(rows[expected] - rows[own], abs=1e-12)


def test_another_setting_replaces_the_folds_own_only_when_it_gains_more_than_min_gain(cv, tmp_path):
    cases = cv["cases"]
    wipe = {"min_component_mm3": 1e7, "pet_refine": None}  # removes every lesion; no PET refinement
    folds = [_fold_bundle(tmp_path, f"w{k}", split_cases(cases, fold=k)[1], seed=k, inference=wipe) for k in range(2)]
    s = cross_validate(cv["ds"], folds, tmp_path / "a", candidates_mm3=[0.0, 3000.0])
    pp = s["postprocessing"]
    rows = {k: r["foreground_dice"] for k, r in _rows(pp).items()}
    assert sorted(rows) == [(r, v) for r in (False, True) for v in (0.0, 3000.0, 1e7)]
    assert pp["current"] == {"pet_refine": False, "min_component_mm3": 1e7}
    assert rows[False, 1e7] == pytest.approx(s["mean"]["lesion"]["dice"]) and rows[False, 1e7] < rows[False, 0.0] - 0.2
    best = max(rows, key=rows.get)
    assert (pp["best"]["pet_refine"], pp["best"]["min_component_mm3"]) == best
    assert pp["gain"] == pytest.approx(rows[best] - rows[False, 1e7])
    # how sure the gain is, case by case: the best candidate predicted, against the folds' own scores
    from VeloxSegLib.metrics import paired_comparison
    from VeloxSegLib.train.crossval import render_markdown

    segs = [Segmenter(str(f), device="cpu") for f in folds]
    top = [_dice(sitk.GetArrayFromImage(segs[c["fold"]].predict(
        _inputs(cv["ds"], c["case"]), min_component_mm3=best[1], pet_refine=best[0]).labels),
        _labels(cv["ds"] / "labelsTr" / f"{c['case']}.nii.gz")) for c in s["per_case"]]
    assert pp["top_candidate"] == pp["best"]
    assert pp["top_versus_current"] == pytest.approx(
        paired_comparison([c["metrics"]["lesion"]["dice"] for c in s["per_case"]], top))
    assert pp["top_versus_current"]["better"] == 2 and "against the folds' own, case by case: +" in render_markdown(s)
    # what --pack would record: the refinement's settings when it is chosen on, null when off
    assert pp["inference"]["min_component_mm3"] == best[1]
    assert (pp["inference"]["pet_refine"] is not None) == best[0]
    kept = cross_validate(cv["ds"], folds, tmp_path / "b", candidates_mm3=[0.0, 3000.0], min_gain=pp["gain"] + 1e-9)
    assert kept["postprocessing"]["best"] == pp["current"] and kept["postprocessing"]["gain"] == 0.0
    assert kept["postprocessing"]["top_versus_current"] == pp["top_versus_current"]  # reported though not taken
    # the predictions written are the folds' own (here: empty)
    assert all(not _labels(p).any() for p in (tmp_path / "a" / "predictions").iterdir())
    held = split_cases(cases, fold=0)[1] + split_cases(cases, fold=1)[1]
    assert s["cases_not_validated"] == [c for c in cases if c not in held]  # two folds: three cases in neither
    assert len(list((tmp_path / "a" / "predictions").iterdir())) == 2


def test_the_packed_ensemble_holds_the_folds_and_the_chosen_setting(cv):
    packed = load_bundle(cv["pack"])
    pp = cv["summary"]["postprocessing"]
    assert packed.members == 5
    assert packed.meta["inference"]["min_component_mm3"] == pp["best"]["min_component_mm3"]
    assert (packed.meta["inference"]["pet_refine"] is not None) == pp["best"]["pet_refine"]
    case = cv["cases"][0]
    a = Segmenter(str(cv["pack"]), device="cpu").predict(_inputs(cv["ds"], case)).labels
    b = Segmenter([str(f) for f in cv["folds"]], device="cpu").predict(
        _inputs(cv["ds"], case), min_component_mm3=pp["best"]["min_component_mm3"],
        pet_refine=pp["best"]["pet_refine"]).labels
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


def test_the_dataset_and_the_folds_are_only_read(cv):
    after = {p: p.read_bytes() for f in [cv["ds"], *cv["folds"]] for p in sorted(Path(f).rglob("*")) if p.is_file()}
    assert after == cv["before"]
    assert sorted(p.name for p in cv["root"].iterdir() if p.name.startswith(".")) == []  # no temporary left


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


@pytest.mark.parametrize("problem", ["overlap", "twice", "val_dataset", "own_cases", "no_record", "unknown_case",
                                     "ensemble"])
def test_bundles_that_are_not_folds_of_one_cross_validation_are_refused_writing_nothing(cv, tmp_path, problem,
                                                                                      capsys):
    folds, cases = list(map(str, cv["folds"][:2])), cv["cases"]
    message = {"overlap": "both validate on case", "twice": "is given twice",
               "val_dataset": "validated on another dataset", "own_cases": "validated on its own training cases",
               "no_record": "names no validation cases", "unknown_case": "are not in the dataset",
               "ensemble": "is an ensemble of 2 networks"}[problem]
    if problem == "overlap":
        folds.append(str(_fold_bundle(tmp_path, "odd", [cases[0], cases[4]], seed=9)))
    elif problem == "twice":
        folds.append(folds[0])
    elif problem == "val_dataset":
        folds.append(str(_fold_bundle(tmp_path, "odd", [cases[4]], seed=9, val_dataset="other")))
    elif problem == "own_cases":
        folds.append(str(_fold_bundle(tmp_path, "odd", [cases[4]], seed=9, validated_on="training cases")))
    elif problem == "no_record":
        folds.append(str(_fold_bundle(tmp_path, "odd", [], seed=9)))
    elif problem == "unknown_case":
        folds.append(str(_fold_bundle(tmp_path, "odd", ["nosuchcase"], seed=9)))
    else:
        assert main(["ensemble", folds[0], folds[1], "-o", str(tmp_path / "ens")]) == 0
        folds.append(str(tmp_path / "ens"))
    before = _listing(tmp_path)
    capsys.readouterr()
    rc = main(["crossval", str(cv["ds"]), *folds, "-o", str(tmp_path / "out"), "--pack", str(tmp_path / "pk"),
               "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == (InputError.exit_code if problem == "unknown_case" else ConfigError.exit_code)
    assert message in err and "veloxseg crossval: error:" in err
    assert _listing(tmp_path) == before


def test_an_existing_output_is_kept_unless_overwrite_and_only_a_crossval_folder_is_replaced(cv, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["crossval", str(cv["ds"]), str(cv["folds"][0]), "-o", str(out), "--progress", "none"]
    assert main(args) == InputError.exit_code
    assert main(args + ["--overwrite"]) == InputError.exit_code  # not a cross-validation's folder
    assert (out / "notes.txt").read_text() == "mine"
    # inside the dataset: refused, nothing written there
    assert main(["crossval", str(cv["ds"]), str(cv["folds"][0]), "-o", str(cv["ds"] / "cv"),
                 "--progress", "none"]) == InputError.exit_code
    assert not (cv["ds"] / "cv").exists()
    # an earlier run's folder is replaced whole
    again = tmp_path / "again"
    assert main(["crossval", str(cv["ds"]), str(cv["folds"][0]), "-o", str(again), "--progress", "none"]) == 0
    assert main(["crossval", str(cv["ds"]), str(cv["folds"][1]), "-o", str(again), "--progress", "none"]) == 2
    assert main(["crossval", str(cv["ds"]), str(cv["folds"][1]), "-o", str(again), "--progress", "none",
                 "--overwrite"]) == 0
    s = json.loads((again / SUMMARY_NAME).read_text())
    assert [f["cases"] for f in s["folds"]] == [split_cases(cv["cases"], fold=1)[1]]
    assert _listing(again / "predictions") == [f"{c}.nii.gz" for c in split_cases(cv["cases"], fold=1)[1]]


def test_a_bad_pack_output_is_refused_before_any_case_runs(cv, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x.txt").write_text("x")
    rc = main(["crossval", str(cv["ds"]), *map(str, cv["folds"][:2]), "-o", str(tmp_path / "out"),
               "--pack", str(taken), "--progress", "json"])
    assert rc == InputError.exit_code
    assert capsys.readouterr().out == ""  # not one case was run
    assert not (tmp_path / "out").exists()


def test_cancelling_leaves_nothing_behind(cv, tmp_path):
    event = threading.Event()
    seen = []

    def progress(e):
        seen.append(e)
        event.set()  # cancel after the first case

    with pytest.raises(Cancelled):
        cross_validate(cv["ds"], cv["folds"], tmp_path / "out", progress=progress, cancel=event)
    assert len(seen) == 1 and list(tmp_path.iterdir()) == []


def test_progress_json_reports_every_case_then_the_result(cv, tmp_path, capsys):
    capsys.readouterr()
    rc = main(["crossval", str(cv["ds"]), *map(str, cv["folds"][:2]), "-o", str(tmp_path / "out"),
               "--progress", "json", "--min-component-candidates", "0"])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["stage"], e["done"], e["total"]) for e in lines[:-1]] == [("crossval", 1, 2), ("crossval", 2, 2)]
    s = json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())
    assert lines[-1]["stage"] == "done" and lines[-1]["mean"]["lesion"] == s["mean"]["lesion"]["dice"]


def test_folds_trained_by_the_command_score_what_they_validated_at(tmp_path, capsys):
    """The documented workflow: `train --fold K`, then crossval. Each fold's out-of-fold Dice is the
    validation Dice its own run recorded (the same cases through the same pipeline)."""
    from VeloxSegLib.data.phantom import write_phantom_dataset

    ds = tmp_path / "ds"
    write_phantom_dataset(ds, "petct", 5, seed=4, size=(64, 64, 48))
    torch.set_num_threads(1)
    folds = []
    for k in (0, 3):
        out = tmp_path / f"fold{k}"
        assert main(["train", str(ds), "-o", str(out), "--fold", str(k), "--epochs", "1", "--iterations-per-epoch",
                     "1", "--batch-size", "1", "--patch-size", "32", "32", "64", "--device", "cpu", "--seed", str(k),
                     "--preprocessed", str(tmp_path / "pre"), "--progress", "none"]) == 0
        folds.append(out)
    capsys.readouterr()
    assert main(["crossval", str(ds), *map(str, folds), "-o", str(tmp_path / "cv"), "--progress", "none"]) == 0
    table = capsys.readouterr().out
    s = json.loads((tmp_path / "cv" / SUMMARY_NAME).read_text())
    assert [f["fold"] for f in s["folds"]] == [0, 3]  # the training record names its fold
    for f in s["folds"]:
        assert f["mean"]["lesion"]["dice"] == pytest.approx(f["recorded_val_dice"], abs=1e-6)
    assert s["validated_cases"] == 2 and len(s["cases_not_validated"]) == 3
    assert "| **all folds** | 2 |" in table and "3 case(s) are in no given fold's validation set" in table


def test_regions_are_scored_and_drive_the_choice(tmp_path):
    """BraTS-style regions (unions of labels) on the MRI demo's four-channel, three-label setting."""
    from VeloxSegLib.data.phantom import write_phantom_dataset

    ds = tmp_path / "mri"
    write_phantom_dataset(ds, "mri", 5, seed=77, size=(64, 64, 48))
    cases = sorted(p.name[:-len(".nii.gz")] for p in (ds / "labelsTr").iterdir())
    demo = load_bundle(embedded_bundles_dir() / "brain-tumor-mri-demo")
    folds = []
    for k in range(2):
        meta = copy.deepcopy(demo.meta)
        meta["training"] = {"metrics": {"val_cases": split_cases(cases, fold=k)[1], "validated_on": "held-out"}}
        folds.append(save_bundle(tmp_path / f"m{k}", meta, demo.state_dict()))
    regions = {"ET": [3], "TC": [1, 3], "WT": [1, 2, 3]}
    s = cross_validate(ds, folds, tmp_path / "cv", regions=regions, candidates_mm3=[0.0, 1e7])
    assert s["scored"] == ["ET", "TC", "WT"] and list(s["mean"]) == [
        "necrotic_core", "edema", "enhancing_tumor", "ET", "TC", "WT"]
    for c in s["per_case"]:
        pred = _labels(tmp_path / "cv" / "predictions" / f"{c['case']}.nii.gz")
        ref = _labels(ds / "labelsTr" / f"{c['case']}.nii.gz")
        for name, values in regions.items():
            assert c["metrics"][name]["dice"] == pytest.approx(_dice(np.isin(pred, values), np.isin(ref, values)))
        assert c["metrics"]["edema"]["dice"] == pytest.approx(_dice(pred == 2, ref == 2))
    rows = _rows(s["postprocessing"])  # MRI: no PET, so no refinement choice
    assert sorted(rows) == [(None, 0.0), (None, 1e7)]
    assert rows[None, 0.0]["foreground_dice"] == pytest.approx(np.mean([s["mean"][k]["dice"] for k in regions]))
    assert rows[None, 1e7]["foreground_dice"] == 0.0  # every tumour removed
    with pytest.raises(InputError, match="region"):
        cross_validate(ds, folds, tmp_path / "bad", regions={"X": [7]})
    assert not (tmp_path / "bad").exists()


def test_the_table_names_the_lowest_scoring_cases_first(cv):
    from VeloxSegLib.train.crossval import render_markdown

    s = cv["summary"]
    text = render_markdown(s)
    ranked = sorted(s["per_case"], key=lambda c: c["metrics"]["lesion"]["dice"])
    line = next(t for t in text.splitlines() if t.startswith("Lowest-scoring cases"))
    names = [c["case"] for c in ranked]
    positions = [line.index(n) for n in names]
    assert positions == sorted(positions)  # lowest first, every case (5 <= 5) listed
    worst = ranked[0]
    assert f"{worst['case']} ({s['folds'][worst['fold']]['bundle']}): {worst['metrics']['lesion']['dice']:.3f}" in line


def test_a_label_map_the_folds_cannot_score_stops_the_run_naming_it_and_writes_nothing(cv, tmp_path, capsys):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(cv["ds"], ds)
    case = split_cases(cv["cases"], fold=1)[1][0]  # held out by the second fold: the first fold's cases run first
    path = ds / "labelsTr" / f"{case}.nii.gz"
    lab = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(lab)
    arr[0, 0, 0] = 2
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(lab)
    sitk.WriteImage(bad, str(path), True)
    capsys.readouterr()
    rc = main(["crossval", str(ds), *map(str, cv["folds"][:2]), "-o", str(tmp_path / "out"), "--progress", "json"])
    out, err = capsys.readouterr()
    assert rc == InputError.exit_code
    assert f"'{path}': holds label(s) [2] that the folds do not predict" in err
    assert len(out.splitlines()) >= 1  # the first fold's case(s) had run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_compare_crossval_puts_two_cross_validations_side_by_side_case_by_case(cv, tmp_path, capsys):
    """Two cross-validations of the same folds' cases (the fixture's, and folds jittered four times
    as hard): `compare --crossval` reads both summaries, and its case-by-case comparison is the
    one computed here from the written predictions and the labels."""
    from VeloxSegLib.metrics import paired_comparison

    folds = [_fold_bundle(tmp_path, f"rough{k}", split_cases(cv["cases"], fold=k)[1], seed=40 + k, noise=0.2)
             for k in range(5)]
    other = tmp_path / "cv-rough"
    torch.set_num_threads(2)
    assert main(["crossval", str(cv["ds"]), *map(str, folds), "-o", str(other), "--threads", "2",
                 "--progress", "none"]) == 0
    capsys.readouterr()
    out = tmp_path / "cmp.json"
    assert main(["compare", "--crossval", str(cv["out"]), str(other), "-o", str(out)]) == 0
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    first, second = data["rows"]
    assert (data["cases"], data["scored"], first["folds"], second["folds"]) == (5, ["lesion"], 5, 5)
    scores = {}
    for row, folder in ((first, cv["out"]), (second, other)):
        scores[folder] = {c: _dice(_labels(folder / "predictions" / f"{c}.nii.gz"),
                                   _labels(cv["ds"] / "labelsTr" / f"{c}.nii.gz")) for c in cv["cases"]}
        assert row["per_case"] == pytest.approx(scores[folder], abs=1e-9)
        assert row["dice"]["lesion"] == pytest.approx(np.mean(list(scores[folder].values())), abs=1e-9)
    expected = paired_comparison([scores[cv["out"]][c] for c in cv["cases"]], [scores[other][c] for c in cv["cases"]])
    assert second["versus_first"] == pytest.approx(expected) and "versus_first" not in first
    assert expected["mean_difference"] != 0  # the rougher folds segment differently
    assert f"| cv-rough | 5 | 5 | {second['dice']['lesion']:.3f} | {expected['mean_difference']:+.3f} (" in table


def test_compare_crossval_refuses_what_cannot_be_compared(cv, tmp_path, capsys):
    summary = json.loads((cv["out"] / SUMMARY_NAME).read_text())
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    (fewer / SUMMARY_NAME).write_text(json.dumps({**summary, "per_case": summary["per_case"][1:]}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / SUMMARY_NAME).write_text(json.dumps({**summary, "dataset": "/another/dataset"}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / SUMMARY_NAME).write_text("{")
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, message in ((fewer, "predicted different cases"), (elsewhere, "different datasets"),
                            (broken, "not a cross-validation summary"), (empty, "no crossval.json")):
        out = tmp_path / f"{folder.name}.json"
        assert main(["compare", "--crossval", str(cv["out"]), str(folder), "-o", str(out)]) == 2
        assert message in capsys.readouterr().err and not out.exists()
    assert main(["compare", "--crossval", str(cv["out"]), "--heldout", str(cv["ds"]), "-o",
                 str(tmp_path / "x.json")]) == 2
    assert "takes no --heldout" in capsys.readouterr().err
    assert main(["compare", str(DEMO), "-o", str(tmp_path / "y.json")]) == 2
    assert "give --heldout DATASET" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()


def test_ensemble_averages_the_bundles_that_hold_out_the_same_cases(cv, tmp_path, capsys):
    """--ensemble: fold K of two configurations (the fixture's folds and rougher ones on the same
    splits) predicts fold K's cases together, exactly as `predict -m` with the two does."""
    from VeloxSegLib.metrics import paired_comparison

    cases, ds = cv["cases"], cv["ds"]
    rough = [_fold_bundle(tmp_path, f"r{k}", split_cases(cases, fold=k)[1], seed=60 + k, noise=0.2) for k in range(5)]
    both = [str(b) for pair in zip(cv["folds"], rough) for b in pair]
    out = tmp_path / "cv-ens"
    torch.set_num_threads(2)
    assert main(["crossval", str(ds), *both, "-o", str(out), "--ensemble", "--threads", "2", "--progress", "none",
                 "--pack", str(tmp_path / "ens-pack")]) == 0
    s = json.loads((out / SUMMARY_NAME).read_text())
    assert len(s["folds"]) == 5 and all(len(f["members"]) == 2 for f in s["folds"])
    assert s["folds"][0]["bundle"] == "fold0 + r0" and s["folds"][0]["recorded_val_dice"] is None
    owners = {c["case"]: c["fold"] for c in s["per_case"]}
    for case in cases:
        k = owners[case]
        expected = Segmenter([str(cv["folds"][k]), str(rough[k])], device="cpu").predict(_inputs(ds, case)).labels
        written = _labels(out / "predictions" / f"{case}.nii.gz")
        assert np.array_equal(written, sitk.GetArrayFromImage(expected))
    assert any(not np.array_equal(_labels(out / "predictions" / f"{c}.nii.gz"),
                                  _labels(cv["out"] / "predictions" / f"{c}.nii.gz")) for c in cases)
    assert load_bundle(tmp_path / "ens-pack").members == 10
    # the ensemble's cross-validation against the single configuration's, case by case
    capsys.readouterr()
    assert main(["compare", "--crossval", str(cv["out"]), str(out), "-o", str(tmp_path / "c.json")]) == 0
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    truth = {c: _labels(ds / "labelsTr" / f"{c}.nii.gz") for c in cases}
    mine = [_dice(_labels(out / "predictions" / f"{c}.nii.gz"), truth[c]) for c in cases]
    base = [_dice(_labels(cv["out"] / "predictions" / f"{c}.nii.gz"), truth[c]) for c in cases]
    assert rows[1]["versus_first"] == pytest.approx(paired_comparison(base, mine))


def test_ensemble_of_configurations_averages_each_folds_probabilities(cv, tmp_path, capsys):
    """--ensemble with a second configuration (the folds at 3 x 3 x 3.5 mm): fold K's cases are
    predicted as `predict -m` predicts with both; --pack is refused before any case is predicted."""
    cases, ds = cv["cases"], cv["ds"]
    coarse = [_fold_bundle(tmp_path, f"c{k}", split_cases(cases, fold=k)[1], seed=70 + k, spacing=(3.0, 3.0, 3.5))
              for k in range(5)]
    both = [str(b) for pair in zip(cv["folds"], coarse) for b in pair]
    capsys.readouterr()
    rc = main(["crossval", str(ds), *both, "-o", str(tmp_path / "refused"), "--ensemble", "--progress", "none",
               "--pack", str(tmp_path / "pack")])
    err = capsys.readouterr().err
    assert rc == ConfigError.exit_code and "--pack: the bundles are 2 configurations" in err
    assert not (tmp_path / "refused").exists() and not (tmp_path / "pack").exists()
    out = tmp_path / "cv-conf"
    torch.set_num_threads(2)
    assert main(["crossval", str(ds), *both, "-o", str(out), "--ensemble", "--threads", "2", "--progress", "none"]) == 0
    said = capsys.readouterr().out  # the way to use them: -m with all of them, not a packed bundle
    assert "configurations together (a bundle holds one): veloxseg predict -m" in said and "veloxseg ensemble" not in said
    s = json.loads((out / SUMMARY_NAME).read_text())
    assert len(s["folds"]) == 5 and s["folds"][0]["bundle"] == "fold0 + c0"
    owners = {c["case"]: c["fold"] for c in s["per_case"]}
    for case in cases:
        k = owners[case]
        seg = Segmenter([str(cv["folds"][k]), str(coarse[k])], device="cpu")
        assert seg.configurations == 2
        expected = sitk.GetArrayFromImage(seg.predict(_inputs(ds, case)).labels)
        assert np.array_equal(_labels(out / "predictions" / f"{case}.nii.gz"), expected)
    assert any(not np.array_equal(_labels(out / "predictions" / f"{c}.nii.gz"),
                                  _labels(cv["out"] / "predictions" / f"{c}.nii.gz")) for c in cases)
    # without --ensemble, folds of two configurations are refused as folds of one model
    rc = main(["crossval", str(ds), str(cv["folds"][0]), str(coarse[1]), "-o", str(tmp_path / "o2"),
               "--progress", "none"])
    assert rc == ConfigError.exit_code and "spacings differ" in capsys.readouterr().err


def test_ensemble_refuses_folds_that_overlap_without_matching(cv, tmp_path, capsys):
    cases = cv["cases"]
    odd = _fold_bundle(tmp_path, "odd", [cases[0], cases[1]], seed=9)  # not any fold's cases
    capsys.readouterr()
    rc = main(["crossval", str(cv["ds"]), *map(str, cv["folds"]), str(odd), "-o", str(tmp_path / "o"),
               "--ensemble", "--progress", "none"])
    assert rc == ConfigError.exit_code and "hold out overlapping but different cases" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    rc = main(["crossval", str(cv["ds"]), str(cv["folds"][0]), str(cv["folds"][0]), "-o", str(tmp_path / "o"),
               "--ensemble", "--progress", "none"])
    assert rc == ConfigError.exit_code and "is given twice" in capsys.readouterr().err
    twin = _fold_bundle(tmp_path, "twin1", split_cases(cases, fold=1)[1], seed=19)  # fold 1 of a second recipe only
    rc = main(["crossval", str(cv["ds"]), *map(str, cv["folds"]), str(twin), "-o", str(tmp_path / "o"),
               "--ensemble", "--progress", "none"])
    assert rc == ConfigError.exit_code and "has 1 bundle(s) holding out its cases, other folds 2" in \
        capsys.readouterr().err
    assert not (tmp_path / "o").exists()
