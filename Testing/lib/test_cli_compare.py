"""``veloxseg compare``: bundles evaluated side by side on one held-out dataset, and the table
``make bench`` puts into docs/benchmarks.md."""
import contextlib
import io
import json
import shutil

import pytest

from VeloxSegLib.bench import load_comparisons, render_markdown
from VeloxSegLib.bundle import embedded_bundles_dir
from VeloxSegLib.cli import main
from VeloxSegLib.errors import InputError


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    from VeloxSegLib.data.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("compare") / "heldout"
    write_phantom_dataset(root, "petct", 2, seed=31, size=(64, 64, 48))
    return root


def test_compare_tabulates_each_bundle_with_its_training_record(heldout, tmp_path):
    demo = embedded_bundles_dir() / "petct-lesion-demo"
    copy = tmp_path / "petct-copy"
    shutil.copytree(demo, copy)
    out_json = tmp_path / "cmp.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["compare", str(demo), str(copy), "--heldout", str(heldout), "-o", str(out_json),
                   "--threads", "1", "--title", "same weights twice"])
    assert rc == 0
    data = json.loads(out_json.read_text())
    assert data["cases"] == 2 and data["heldout"] == "heldout" and data["title"] == "same weights twice"
    a, b = data["rows"]
    meta = json.loads((demo / "bundle.json").read_text())
    notes = json.loads(meta["training"]["notes"])
    assert a["model"] == "veloxseg-b" and a["in_channels"] == [1, 1]
    assert a["params_m"] == pytest.approx(_params_reaching_the_output(meta["model"]), abs=1e-6)
    assert a["iterations"] == notes["recipe"]["total_steps"] and a["batch_size"] == notes["recipe"]["batch_size"]
    assert a["train_seconds"] == pytest.approx(meta["training"]["metrics"]["train_seconds"])
    assert set(a["dice"]) == {"lesion"} and 0.0 <= a["dice"]["lesion"] <= 1.0
    assert a["dice"] == b["dice"]  # identical weights, identical segmentations
    assert "versus_first" not in a and b["per_case"] == a["per_case"] and len(a["per_case"]) == 2
    v = b["versus_first"]
    assert (v["n"], v["tied"], v["better"], v["worse"], v["p_value"]) == (2, 2, 0, 0, 1.0)
    assert v["mean_difference"] == v["ci_low"] == v["ci_high"] == 0.0
    table = stdout.getvalue()
    assert f"| petct-lesion-demo | veloxseg-b | {a['params_m']:.3f} |" in table and "Dice lesion" in table


def _params_reaching_the_output(model_meta):
    """Inference parameters counted as the network benchmark does: those the eval output's
    gradient reaches (patch-dependent: the attention bias tables follow the windows)."""
    import torch

    from VeloxSegLib import build_model

    net = build_model(model_meta["name"], tuple(model_meta["in_channels"]), model_meta["num_classes"],
                      tuple(model_meta["patch_size"])).eval()
    net(torch.randn(1, sum(model_meta["in_channels"]), *model_meta["patch_size"])).sum().backward()
    return sum(p.numel() for p in net.parameters() if p.grad is not None) / 1e6


def test_compare_agrees_with_predict_then_evaluate(heldout, tmp_path):
    demo = str(embedded_bundles_dir() / "petct-lesion-demo")
    preds = tmp_path / "preds"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["predict", "-m", demo, "-i", str(heldout / "imagesTr"), "-o", str(preds),
                     "--progress", "none", "--threads", "1"]) == 0
        assert main(["evaluate", "--pred", str(preds), "--ref", str(heldout / "labelsTr"), "-m", demo,
                     "--json", str(tmp_path / "eval.json"), "--lesions"]) == 0
        assert main(["compare", demo, "--heldout", str(heldout), "-o", str(tmp_path / "cmp.json"), "--lesions"]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    row = json.loads((tmp_path / "cmp.json").read_text())["rows"][0]
    assert row["dice"]["lesion"] == pytest.approx(evaluated["mean"]["1"]["dice"], abs=1e-9)
    assert row["per_case"] == pytest.approx({c["case"]: c["metrics"]["1"]["dice"] for c in evaluated["cases"]},
                                            abs=1e-12)
    pooled = evaluated["lesion_mean"]["1"]
    assert pooled["lesions"] > 0
    assert row["lesions"]["lesion"] == {k: pooled[k] for k in ("lesions", "found", "missed", "fp_components",
                                                               "lesion_sensitivity", "lesionwise_dice",
                                                               "lesionwise_hd95_mm", "dice_budget")}
    assert row["lesions"]["lesion"]["dice_budget"]["dice"] == pytest.approx(row["dice"]["lesion"], abs=1e-9)


def test_compare_puts_each_bundle_against_the_first_case_by_case(heldout, tmp_path):
    """A copy that removes every component under 10^9 mm^3 segments nothing: it loses every
    case by that case's Dice, and the table says so with its interval and p."""
    import numpy as np

    from VeloxSegLib.metrics import paired_comparison

    demo = embedded_bundles_dir() / "petct-lesion-demo"
    blind = tmp_path / "blind"
    shutil.copytree(demo, blind)
    meta = json.loads((blind / "bundle.json").read_text())
    meta["inference"]["min_component_mm3"] = 1e9
    (blind / "bundle.json").write_text(json.dumps(meta))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["compare", str(demo), str(blind), "--heldout", str(heldout), "-o", str(tmp_path / "c.json"),
                     "--threads", "1", "--lesions"]) == 0
    first, second = json.loads((tmp_path / "c.json").read_text())["rows"]
    les = second["lesions"]["lesion"]  # it finds nothing: every lesion missed, no false positives
    assert les["found"] == 0 and les["missed"] == les["lesions"] == first["lesions"]["lesion"]["lesions"] > 0
    assert (les["fp_components"], les["lesionwise_dice"], les["lesionwise_hd95_mm"]) == (0, 0.0, 374.0)
    assert all(d > 0 for d in first["per_case"].values()) and set(second["per_case"].values()) == {0.0}
    v = second["versus_first"]
    cases = sorted(first["per_case"])
    assert v["mean_difference"] == pytest.approx(-np.mean([first["per_case"][c] for c in cases]))
    assert (v["better"], v["worse"], v["tied"]) == (0, 2, 0) and v["ci_high"] < 0
    assert v == pytest.approx(paired_comparison([first["per_case"][c] for c in cases], [0.0, 0.0]))
    table = stdout.getvalue()
    assert "vs petct-lesion-demo: mean difference (95% CI)" in table
    assert f"| {v['mean_difference']:+.3f} ({v['ci_low']:+.3f} to {v['ci_high']:+.3f}) | 0 / 2 | 0.500 |" in table
    assert "| lesions found lesion | FP components lesion | lesion-wise Dice lesion |" in table
    assert f"| 0 / {les['lesions']} | 0 | 0.000 | {v['mean_difference']:+.3f}" in table


def test_compare_adds_bundles_to_a_saved_comparison(heldout, tmp_path, capsys):
    """--add-to: a bundle trained later joins a saved comparison, paired with its first row, which
    is not run again; the result is what comparing them together gives."""
    import numpy as np

    from VeloxSegLib.metrics import paired_comparison

    demo = embedded_bundles_dir() / "petct-lesion-demo"
    blind = tmp_path / "blind"
    shutil.copytree(demo, blind)
    meta = json.loads((blind / "bundle.json").read_text())
    meta["inference"]["min_component_mm3"] = 1e9  # segments nothing
    (blind / "bundle.json").write_text(json.dumps(meta))
    saved, merged = tmp_path / "saved.json", tmp_path / "merged.json"
    assert main(["compare", str(demo), "--heldout", str(heldout), "-o", str(saved), "--threads", "1",
                 "--lesions", "--title", "first run"]) == 0
    before = saved.read_bytes()
    assert main(["compare", str(blind), "--heldout", str(heldout), "--add-to", str(saved), "-o", str(merged),
                 "--threads", "1"]) == 0
    assert saved.read_bytes() == before  # the saved comparison is left as it is
    old = json.loads(before)
    data = json.loads(merged.read_text())
    assert data["title"] == "first run" and data["rows"][0] == old["rows"][0]
    row = data["rows"][1]
    assert row["bundle"] == "petct-lesion-demo" and set(row["per_case"].values()) == {0.0}
    first = old["rows"][0]["per_case"]
    cases = sorted(first)
    assert row["versus_first"] == pytest.approx(paired_comparison([first[c] for c in cases], [0.0] * len(cases)))
    assert row["versus_first"]["mean_difference"] == pytest.approx(-np.mean(list(first.values())))
    assert row["lesions"]["lesion"]["found"] == 0  # the saved rows count lesions, so the new one does too
    assert "0 / 2" in capsys.readouterr().out
    # refused before anything runs or is written
    other = tmp_path / "other-heldout"
    shutil.copytree(heldout, other)
    for argv, message in (
            ([str(blind), "--heldout", str(heldout), "--add-to", str(saved)], "needs -o"),
            ([str(blind), "--heldout", str(heldout), "--add-to", str(saved), "-o", str(saved), "--overwrite"],
             "would overwrite an input"),
            ([str(blind), "--heldout", str(other), "--add-to", str(saved), "-o", str(tmp_path / "x.json")],
             "a comparison on 'heldout'"),
            ([str(blind), "--heldout", str(heldout), "--add-to", str(tmp_path / "missing.json"),
              "-o", str(tmp_path / "x.json")], "cannot read it"),
            (["--crossval", str(tmp_path), "--add-to", str(saved)], "does not take --crossval")):
        assert main(["compare", *argv]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x.json").exists() and saved.read_bytes() == before
    no_cases = dict(old, rows=[{k: v for k, v in old["rows"][0].items() if k != "per_case"}])
    (tmp_path / "old.json").write_text(json.dumps(no_cases))
    with pytest.raises(InputError, match="per-case scores"):
        from VeloxSegLib.commands.compare import read_saved
        read_saved(tmp_path / "old.json")


def test_compare_refuses_a_folder_without_labels(tmp_path, capsys):
    (tmp_path / "ds" / "imagesTr").mkdir(parents=True)
    rc = main(["compare", "petct-lesion-demo", "--heldout", str(tmp_path / "ds"), "-o", str(tmp_path / "c.json")])
    assert rc != 0
    assert "labelsTr" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


def test_bench_page_includes_saved_comparisons(tmp_path):
    data = {"heldout": "heldout_mri", "cases": 10, "title": "MRI phantoms, 1800 iterations each",
            "rows": [{"bundle": "a", "model": "veloxseg-b", "params_m": 1.5, "iterations": 1800, "batch_size": 2,
                      "patch_size": [64, 64, 64], "train_seconds": 700.0, "dice": {"ET": 0.9}, "val_dice": 0.92,
                      "predict_seconds_per_case": 1.5}]}
    (tmp_path / "training-comparison-mri.json").write_text(json.dumps(data))
    loaded = load_comparisons(tmp_path)
    assert loaded == [data]
    result = {"machine": {"cpu": "x", "cores": 2, "memory_gib": 1, "os": "y", "python": "3", "torch": "t",
                          "date": "d"}, "patch": [], "comparisons": loaded}
    page = render_markdown(result)
    assert "## Same-budget training comparison on heldout_mri" in page
    assert "| a | veloxseg-b | 1.500 | 1800 x 2 | 64x64x64 | 700 | 0.900 | 0.920 | 1.5 |" in page
    (tmp_path / "training-comparison-bad.json").write_text("{")
    with pytest.raises(InputError, match="training-comparison-bad.json"):
        load_comparisons(tmp_path)


def test_bench_render_only_rebuilds_the_page_from_saved_figures(tmp_path, capsys):
    """``veloxseg bench --render-only``: a new comparison reaches the page without measuring."""
    figures = {"machine": {"cpu": "x", "cores": 2, "memory_gib": 1, "os": "y", "python": "3", "torch": "t",
                           "date": "d"}, "patch": [], "comparisons": []}
    (tmp_path / "benchmarks.json").write_text(json.dumps(figures))
    page = tmp_path / "benchmarks.md"
    assert main(["bench", "--render-only", "--output", str(page)]) == 0
    assert "Same-budget training comparison" not in page.read_text()
    data = {"heldout": "heldout_x", "cases": 3, "rows": [
        {"bundle": "a", "model": "veloxseg-b", "params_m": 1.5, "iterations": 10, "batch_size": 2,
         "patch_size": [64, 64, 64], "train_seconds": 7.0, "dice": {"lesion": 0.5}, "val_dice": 0.4,
         "predict_seconds_per_case": 1.0}]}
    (tmp_path / "training-comparison-x.json").write_text(json.dumps(data))
    assert main(["bench", "--render-only", "--output", str(page)]) == 0
    text = page.read_text()
    assert "## Same-budget training comparison on heldout_x" in text
    assert "| a | veloxseg-b | 1.500 | 10 x 2 | 64x64x64 | 7 | 0.500 | 0.400 | 1.0 |" in text
    assert json.loads((tmp_path / "benchmarks.json").read_text())["comparisons"] == [data]
    assert not list(tmp_path.glob("*.tmp"))
    capsys.readouterr()
    other = tmp_path / "elsewhere" / "b.md"
    assert main(["bench", "--render-only", "--output", str(other)]) != 0
    assert "no saved benchmark figures" in capsys.readouterr().err and not other.parent.exists()


def test_lesion_columns_cover_the_scored_labels_or_regions_only():
    from VeloxSegLib.commands.compare import render_markdown as comparison_table

    les = {"lesions": 4, "found": 3, "missed": 1, "fp_components": 2, "lesion_sensitivity": 0.75,
           "lesionwise_dice": 0.5}
    row = {"bundle": "a", "model": "veloxseg-b", "params_m": 1.0, "iterations": 10, "batch_size": 2,
           "patch_size": [64, 64, 64], "dice": {"edema": 0.9, "WT": 0.8}, "lesions": {"edema": les, "WT": les}}
    table = comparison_table({"heldout": "h", "cases": 1, "scored": ["WT"], "rows": [row]})
    assert "| lesions found WT | FP components WT | lesion-wise Dice WT |" in table
    assert "lesions found edema" not in table
    assert "| 3 / 4 | 2 | 0.500 |" in table
