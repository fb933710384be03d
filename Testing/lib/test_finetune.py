"""Fine-tuning: the source bundle is never modified, the parent is recorded, 2 cases validate on
themselves, a new label set re-initializes only the heads, --freeze-encoder keeps the encoder."""
import contextlib
import hashlib
import io
import json
import logging
import shutil

import pytest
import torch

from VeloxSegLib.errors import InputError


def _tree_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def two_cases(tmp_path_factory):
    from VeloxSegLib.data.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("finetune") / "local"
    write_phantom_dataset(root, "petct", 2, seed=11, size=(64, 64, 48))
    return root


@pytest.fixture(scope="module")
def source_bundle(two_cases, tmp_path_factory):
    """An (untrained) bundle planned on the same kind of data: what fine-tuning starts from."""
    from VeloxSegLib.bundle import save_bundle
    from VeloxSegLib.train.planner import plan_dataset
    from VeloxSegLib.train.trainer import RunSetup, TrainConfig, build_bundle_meta

    setup = RunSetup.from_plans(plan_dataset(two_cases), TrainConfig())
    torch.manual_seed(0)
    net = setup.build_model(training=False)
    meta = build_bundle_meta(setup, "petct-source", {"dataset": "test", "epochs": 0, "seed": 0, "metrics": {}})
    return save_bundle(tmp_path_factory.mktemp("src") / "petct-source", meta, net.inference_state_dict())


def _finetune(argv):
    from VeloxSegLib.cli import main

    out = io.StringIO()
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(out):
        rc = main(["finetune"] + argv + ["--batch-size", "1", "--device", "cpu", "--progress", "json"])
    return rc, [json.loads(line) for line in out.getvalue().splitlines()]


def test_finetune_leaves_the_source_untouched_names_its_parent_and_validates_on_training_cases(
        two_cases, source_bundle, tmp_path):
    from VeloxSegLib.bundle import load_bundle

    before = _tree_hashes(source_bundle)
    rc, records = _finetune(["-m", str(source_bundle), str(two_cases), "-o", str(tmp_path / "mine"),
                             "--epochs", "1", "--iterations-per-epoch", "2"])
    assert rc == 0
    assert _tree_hashes(source_bundle) == before
    new = load_bundle(tmp_path / "mine")
    tr = new.meta["training"]
    assert tr["parent"] == "petct-source"
    assert json.loads(tr["notes"])["parent_weights_sha256"] == hashlib.sha256(
        (source_bundle / "model.safetensors").read_bytes()).hexdigest()
    lineage = json.loads(tr["notes"])["lineage"]
    assert [e["name"] for e in lineage] == ["petct-source"] and lineage[0]["dataset"] == "test"
    assert tr["metrics"]["validated_on"] == "training cases"
    assert tr["metrics"]["val_cases"] == tr["metrics"]["train_cases"] == ["petct_0000", "petct_0001"]
    start = next(r for r in records if r["event"] != "prepare")  # (prepare records come first)
    assert start["event"] == "start" and start["validation"] == "training cases"
    assert any(r["event"] == "message" and "training cases" in r["message"] for r in records)
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [0]
    assert new.meta["channels"] == load_bundle(source_bundle).meta["channels"]  # stored statistics kept
    new.build_model()


def test_new_label_set_reinitializes_only_the_heads():
    from VeloxSegLib.model import build_model
    from VeloxSegLib.train.trainer import HEAD_PREFIXES, load_initial_weights

    torch.manual_seed(0)
    source = build_model("veloxseg-b", (1, 1), 2, (64, 64, 64)).state_dict()
    torch.manual_seed(1)
    model = build_model("veloxseg-b", (1, 1), 3, (64, 64, 64))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_initial_weights(model, source, HEAD_PREFIXES)
    state = model.state_dict()
    for key, value in state.items():
        if key.startswith(("head.", "ds_heads.")):
            assert torch.equal(value, fresh[key]), key
        else:
            assert torch.equal(value, source[key]), key
    assert {k.split(".")[0] for k in report["fresh"]} == {"head", "ds_heads"}
    # a refinement head reads and writes the logits: it starts afresh too (as the identity)
    source = build_model("veloxseg-b", (1, 1), 2, (64, 64, 64), refine_channels=4).state_dict()
    model = build_model("veloxseg-b", (1, 1), 3, (64, 64, 64), refine_channels=4)
    report = load_initial_weights(model, source, HEAD_PREFIXES)
    assert {k.split(".")[0] for k in report["fresh"]} == {"head", "ds_heads", "refine"}
    assert model.refine.conv.weight.shape[1] == 2 + 3 and not model.refine.out.weight.any()


def test_freeze_encoder_with_new_labels_trains_heads_and_decoder_only(two_cases, source_bundle, tmp_path):
    from VeloxSegLib.bundle import load_bundle

    ds = tmp_path / "three"
    shutil.copytree(two_cases, ds)
    meta = json.loads((ds / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "lesion": 1, "cyst": 2}
    (ds / "dataset.json").write_text(json.dumps(meta))
    rc, records = _finetune(["-m", str(source_bundle), str(ds), "-o", str(tmp_path / "three-labels"), "--epochs",
                             "1", "--iterations-per-epoch", "1", "--freeze-encoder", "--no-sdkt", "--no-reconstruction"])
    assert rc == 0
    assert not any(r["event"] == "start_validation" for r in records)  # fresh heads: nothing to compare with
    new = load_bundle(tmp_path / "three-labels")
    assert new.num_classes == 3 and [lb["name"] for lb in new.labels] == ["background", "lesion", "cyst"]
    assert new.labels[1].get("color") == load_bundle(source_bundle).labels[1].get("color")
    old, now = load_bundle(source_bundle).state_dict(), new.state_dict()
    encoder = [k for k in old if k.startswith(("patch_embeds.", "attn_stages.", "downs.", "conv_stages."))]
    assert encoder and all(torch.equal(old[k], now[k]) for k in encoder)
    assert now["head.conv.weight"].shape[0] == 3 * 64 and old["head.conv.weight"].shape[0] == 2 * 64
    decoder = [k for k in old if k.startswith("decoder.") and old[k].dtype.is_floating_point]
    assert any(not torch.equal(old[k], now[k]) for k in decoder)
    assert json.loads(new.meta["training"]["notes"])["heads_reinitialized"] is True


def test_a_renamed_label_set_warns_what_it_costs_and_how_to_keep_the_heads(two_cases, source_bundle, tmp_path,
                                                                           caplog):
    from VeloxSegLib.bundle import load_bundle, save_bundle

    src = load_bundle(source_bundle)
    meta = json.loads(json.dumps(src.meta))
    meta["inference"]["pet_refine"] = {"fraction": 0.45}
    parent = save_bundle(tmp_path / "parent", meta, src.state_dict())
    ds = tmp_path / "converted"  # as veloxseg convert names labels without --labels-map
    shutil.copytree(two_cases, ds)
    ds_meta = json.loads((ds / "dataset.json").read_text())
    ds_meta["labels"] = {"background": 0, "label_1": 1}
    (ds / "dataset.json").write_text(json.dumps(ds_meta))
    with caplog.at_level(logging.WARNING, logger="VeloxSegLib"):
        rc, _ = _finetune(["-m", str(parent), str(ds), "-o", str(tmp_path / "renamed"), "--epochs", "1",
                           "--iterations-per-epoch", "1"])
    assert rc == 0
    [msg] = [r.getMessage() for r in caplog.records if "differ from bundle" in r.getMessage()]
    assert msg.startswith("converted: labels ['background', 'label_1'] differ from bundle 'petct-source' "
                          "['background', 'lesion']: its trained segmentation heads start afresh and its PET "
                          "border refinement (inference.pet_refine) is dropped")
    assert "veloxseg convert --labels-map background=0,lesion=1" in msg
    new = load_bundle(tmp_path / "renamed")
    assert json.loads(new.meta["training"]["notes"])["heads_reinitialized"] is True
    assert new.meta["inference"]["pet_refine"] is None
    # named as the bundle does: no warning, the heads and the refinement are kept
    ds_meta["labels"] = {"background": 0, "lesion": 1}
    (ds / "dataset.json").write_text(json.dumps(ds_meta))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="VeloxSegLib"):
        rc, _ = _finetune(["-m", str(parent), str(ds), "-o", str(tmp_path / "kept"), "--epochs", "1",
                           "--iterations-per-epoch", "1"])
    assert rc == 0 and not any("differ from bundle" in r.getMessage() for r in caplog.records)
    assert load_bundle(tmp_path / "kept").meta["inference"]["pet_refine"] is not None
    # another number of labels cannot keep the heads: no advice to rename
    ds_meta["labels"] = {"background": 0, "lesion": 1, "cyst": 2}
    (ds / "dataset.json").write_text(json.dumps(ds_meta))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="VeloxSegLib"):
        rc, _ = _finetune(["-m", str(parent), str(ds), "-o", str(tmp_path / "three"), "--epochs", "1",
                           "--iterations-per-epoch", "1"])
    [msg] = [r.getMessage() for r in caplog.records if "differ from bundle" in r.getMessage()]
    assert rc == 0 and msg.endswith("is dropped") and "--labels-map" not in msg


def test_finetune_refuses_to_write_over_its_source(two_cases, source_bundle):
    from VeloxSegLib.train.finetune import run_finetune

    with pytest.raises(InputError, match="source bundle"):
        run_finetune(source_bundle, two_cases, source_bundle)


def test_finetune_refuses_a_dataset_with_other_channels(source_bundle, tmp_path):
    from VeloxSegLib.data.phantom import write_phantom_dataset
    from VeloxSegLib.train.finetune import run_finetune

    mri = tmp_path / "mri"
    write_phantom_dataset(mri, "mri", 1, seed=0, size=(32, 32, 32))
    with pytest.raises(InputError, match="expects 2"):
        run_finetune(source_bundle, mri, tmp_path / "x")


def test_finetune_inherits_the_parents_loss_and_inference_settings(two_cases, source_bundle, tmp_path):
    from VeloxSegLib.bundle import load_bundle, save_bundle
    from VeloxSegLib.infer.petrefine import PET_REFINE_DEFAULTS
    from VeloxSegLib.train.finetune import _inherit_loss_settings
    from VeloxSegLib.train.trainer import TrainConfig

    src = load_bundle(source_bundle)
    meta = json.loads(json.dumps(src.meta))
    meta["training"]["notes"] = json.dumps({"recipe": {"loss": {"batch_dice": True,
                                                                 "ds_weights": [1, 0.5, 0.25, 0.125]}}})
    meta["inference"] = {"overlap": 0.5, "blending": "gaussian", "tta": True, "tta_axes": ["x"],
                         "min_component_mm3": 20.0, "crop_to_body": False, "pet_refine": {"fraction": 0.45}}
    parent = save_bundle(tmp_path / "parent", meta, src.state_dict())
    rc, _ = _finetune(["-m", str(parent), str(two_cases), "-o", str(tmp_path / "child"),
                       "--epochs", "1", "--iterations-per-epoch", "1"])
    assert rc == 0
    child = load_bundle(tmp_path / "child")
    loss = json.loads(child.meta["training"]["notes"])["recipe"]["loss"]
    assert loss["batch_dice"] is True and loss["ds_weights"] == [1, 0.5, 0.25, 0.125]
    # how to run the model carries over too; the child has also seen the recipe's z flips
    assert child.meta["inference"] == {"overlap": 0.5, "blending": "gaussian", "tta": True, "tta_axes": ["x", "z"],
                                       "min_component_mm3": 20.0, "crop_to_body": False,
                                       "pet_refine": dict(PET_REFINE_DEFAULTS, fraction=0.45, fraction_small=0.45,
                                                          lung_hu=None)}
    # a new label set drops the PET border refinement, which was set for the parent's lesion label
    ds = tmp_path / "three"
    shutil.copytree(two_cases, ds)
    ds_meta = json.loads((ds / "dataset.json").read_text())
    ds_meta["labels"] = {"background": 0, "lesion": 1, "cyst": 2}
    (ds / "dataset.json").write_text(json.dumps(ds_meta))
    rc, _ = _finetune(["-m", str(parent), str(ds), "-o", str(tmp_path / "relabelled"), "--epochs", "1",
                       "--iterations-per-epoch", "1"])
    assert rc == 0 and load_bundle(tmp_path / "relabelled").meta["inference"]["pet_refine"] is None
    # a grandchild records the whole chain, nearest ancestor first
    rc, _ = _finetune(["-m", str(tmp_path / "child"), str(two_cases), "-o", str(tmp_path / "grandchild"),
                       "--epochs", "1", "--iterations-per-epoch", "1"])
    assert rc == 0
    lineage = json.loads(load_bundle(tmp_path / "grandchild").meta["training"]["notes"])["lineage"]
    assert [e["name"] for e in lineage] == [child.name, "petct-source"]
    assert lineage[0]["command"] == child.meta["training"]["command"] and lineage[0]["parent"] == "petct-source"
    # given on the command line, the settings win over the parent's
    config = TrainConfig(batch_dice=False, ds_weights=(1.0,))
    _inherit_loss_settings(config, meta)
    assert config.batch_dice is False and config.ds_weights == (1.0,)
    # a parent trained before these settings existed: per-patch Dice, equal weights
    config = TrainConfig()
    _inherit_loss_settings(config, src.meta)
    assert config.batch_dice is False and config.ds_weights is None


def test_finetune_inherits_the_lesion_dice_weight_unless_given(source_bundle):
    from VeloxSegLib.bundle import load_bundle
    from VeloxSegLib.train.finetune import _inherit_loss_settings
    from VeloxSegLib.train.trainer import TrainConfig

    meta = json.loads(json.dumps(load_bundle(source_bundle).meta))
    config = TrainConfig()
    _inherit_loss_settings(config, meta)  # a parent trained without the term
    assert config.lesion_dice == 0.0
    meta["training"]["notes"] = json.dumps({"recipe": {"loss": {"batch_dice": True, "lambda_lesion_dice": 1.5}}})
    config = TrainConfig()
    _inherit_loss_settings(config, meta)
    assert config.lesion_dice == 1.5
    config = TrainConfig(lesion_dice=0.0)
    _inherit_loss_settings(config, meta)
    assert config.lesion_dice == 0.0


# --------------------------------------------------------------------------- the starting weights


@pytest.fixture(scope="module")
def lesion_everywhere_bundle(source_bundle, tmp_path_factory):
    """The source bundle with its head biased to 'lesion': a parent whose Dice is not zero."""
    from VeloxSegLib.bundle import load_bundle, save_bundle

    src = load_bundle(source_bundle)
    state = src.state_dict()
    bias = state["head.conv.bias"].clone().view(2, -1)
    bias[1] += 20.0
    state["head.conv.bias"] = bias.view(-1)
    return save_bundle(tmp_path_factory.mktemp("biased") / "petct-biased", src.meta, state)


def test_finetune_validates_the_starting_weights_first(two_cases, lesion_everywhere_bundle, tmp_path):
    """The start_validation record comes before training and equals the parent's Dice measured
    independently (veloxseg predict, then Dice counted here)."""
    import numpy as np
    import SimpleITK as sitk

    from VeloxSegLib.bundle import load_bundle
    from VeloxSegLib.cli import main

    preds = tmp_path / "parent-preds"
    assert main(["predict", "-m", str(lesion_everywhere_bundle), "-i", str(two_cases / "imagesTr"), "-o", str(preds),
                 "--device", "cpu", "--progress", "none"]) == 0
    dices = []
    for case in ("petct_0000", "petct_0001"):
        p = sitk.GetArrayFromImage(sitk.ReadImage(str(preds / f"{case}.nii.gz"))) == 1
        r = sitk.GetArrayFromImage(sitk.ReadImage(str(two_cases / "labelsTr" / f"{case}.nii.gz"))) == 1
        dices.append(2.0 * (p & r).sum() / (p.sum() + r.sum()))
    expected = float(np.mean(dices))
    assert 0.0 < expected < 0.5

    rc, records = _finetune(["-m", str(lesion_everywhere_bundle), str(two_cases), "-o", str(tmp_path / "ft"),
                             "--epochs", "1", "--iterations-per-epoch", "1"])
    assert rc == 0
    events = [r["event"] for r in records]
    assert events.index("start_validation") < events.index("step") < events.index("epoch")
    start = next(r for r in records if r["event"] == "start_validation")
    assert start["val_dice"] == pytest.approx(expected, abs=1e-6)
    metrics = load_bundle(tmp_path / "ft").meta["training"]["metrics"]
    assert metrics["start_val_dice"] == pytest.approx(expected, abs=1e-6)


def _scripted_validation(monkeypatch, scores):
    from VeloxSegLib.train import trainer as T

    it = iter(scores)
    calls = []

    def validate(self, net, cancel=None):
        calls.append(1)
        d = next(it)
        return {"dice": d, "per_label": {"lesion": d}}

    monkeypatch.setattr(T.Validator, "__call__", validate)
    return calls


def _same_weights(a, b):
    from VeloxSegLib.bundle import load_bundle

    sa, sb = load_bundle(a).state_dict(), load_bundle(b).state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_no_epoch_better_than_the_start_keeps_the_parents_weights(two_cases, source_bundle, tmp_path, monkeypatch):
    from VeloxSegLib.bundle import load_bundle

    _scripted_validation(monkeypatch, [0.6, 0.4, 0.5])
    rc, records = _finetune(["-m", str(source_bundle), str(two_cases), "-o", str(tmp_path / "worse"),
                             "--epochs", "2", "--iterations-per-epoch", "1"])
    assert rc == 0
    assert [r["val_dice"] for r in records if r["event"] == "epoch"] == [0.4, 0.5]
    assert not any(r.get("best") for r in records if r["event"] == "epoch")
    assert any(r["event"] == "message" and "keeps the starting weights" in r["message"] for r in records)
    m = load_bundle(tmp_path / "worse").meta["training"]["metrics"]
    assert (m["weights"], m["val_dice"], m["start_val_dice"], m["best_epoch"]) == ("start", 0.6, 0.6, None)
    assert _same_weights(source_bundle, tmp_path / "worse")


def test_an_epoch_better_than_the_start_is_kept(two_cases, source_bundle, tmp_path, monkeypatch):
    from VeloxSegLib.bundle import load_bundle

    _scripted_validation(monkeypatch, [0.3, 0.5, 0.4])
    rc, records = _finetune(["-m", str(source_bundle), str(two_cases), "-o", str(tmp_path / "better"),
                             "--epochs", "2", "--iterations-per-epoch", "1"])
    assert rc == 0
    assert [r["best"] for r in records if r["event"] == "epoch"] == [True, False]
    m = load_bundle(tmp_path / "better").meta["training"]["metrics"]
    assert (m["weights"], m["val_dice"], m["start_val_dice"], m["best_epoch"]) == ("best", 0.5, 0.3, 0)
    assert not _same_weights(source_bundle, tmp_path / "better")


def test_a_target_the_parent_already_reaches_trains_nothing(two_cases, source_bundle, tmp_path, monkeypatch):
    from VeloxSegLib.bundle import load_bundle

    calls = _scripted_validation(monkeypatch, [0.8])
    rc, records = _finetune(["-m", str(source_bundle), str(two_cases), "-o", str(tmp_path / "met"),
                             "--epochs", "3", "--iterations-per-epoch", "2", "--target-dice", "0.7"])
    assert rc == 0 and len(calls) == 1
    assert not any(r["event"] in ("step", "epoch") for r in records)
    assert any(r["event"] == "message" and "nothing to train" in r["message"] for r in records)
    m = load_bundle(tmp_path / "met").meta["training"]["metrics"]
    assert m["target_met_at_start"] is True and m["reached_target_at_epoch"] is None
    assert (m["weights"], m["val_dice"], m["train_seconds"], m["steps_run"]) == ("start", 0.8, 0, 0)
    assert _same_weights(source_bundle, tmp_path / "met")


def test_finetune_at_another_patch_size_relays_only_the_position_bias_tables(two_cases, source_bundle, tmp_path):
    from VeloxSegLib.bundle import load_bundle

    src = load_bundle(source_bundle)
    old_patch = tuple(src.meta["model"]["patch_size"])  # z, y, x
    xyz = (64, 64, 32)
    assert tuple(reversed(xyz)) != old_patch
    before = _tree_hashes(source_bundle)
    rc, records = _finetune(["-m", str(source_bundle), str(two_cases), "-o", str(tmp_path / "other-patch"),
                             "--patch-size", *map(str, xyz), "--epochs", "1", "--iterations-per-epoch", "1"])
    assert rc == 0
    assert _tree_hashes(source_bundle) == before
    new = load_bundle(tmp_path / "other-patch")
    assert tuple(new.meta["model"]["patch_size"]) == (32, 64, 64)  # stored z, y, x like every bundle
    notes = json.loads(new.meta["training"]["notes"])
    assert notes["parent_patch_size"] == list(old_patch)
    old_state, new_shapes = src.state_dict(), {k: v.shape for k, v in new.build_model().state_dict().items()}
    changed = {k for k in old_state if k in new_shapes and new_shapes[k] != old_state[k].shape}
    assert changed and set(notes["bias_tables_resized"]) == changed
    assert all(k.endswith("relative_position_bias_table") for k in changed)
    assert any(r["event"] == "start_validation" for r in records)  # the re-laid start is the figure to beat
    net = new.build_model().eval()
    with torch.no_grad():
        assert net(torch.randn(1, 2, 32, 64, 64)).shape == (1, 2, 32, 64, 64)


def test_adapting_to_a_patch_size_keeps_every_other_tensor(source_bundle):
    from VeloxSegLib.bundle import load_bundle
    from VeloxSegLib.model import build_model
    from VeloxSegLib.model.pwa import relative_position_index
    from VeloxSegLib.train.finetune import adapt_to_patch_size

    src = load_bundle(source_bundle)
    old = src.state_dict()
    new, resized = adapt_to_patch_size(old, src.meta["model"], src.num_classes, (96, 64, 64))
    assert resized and set(new) == set(old)
    assert all(torch.equal(new[k], old[k]) for k in old if k not in resized)
    module = resized[0].rsplit(".", 1)[0]
    n_old = dict(src.build_model().named_modules())[module].tokens_per_axis
    n_new = dict(build_model(src.meta["model"]["name"], (1, 1), src.num_classes, (96, 64, 64)).named_modules())[
        module].tokens_per_axis
    assert n_new != n_old
    # the bias between two tokens of the old window is the bias between them in the new one
    heads = old[resized[0]].shape[1]
    L_old, L_new = len(relative_position_index(n_old)), len(relative_position_index(n_new))
    b_old = old[resized[0]][relative_position_index(n_old).reshape(-1)].reshape(L_old, L_old, heads)
    b_new = new[resized[0]][relative_position_index(n_new).reshape(-1)].reshape(L_new, L_new, heads)
    pos_new = {tuple(c): i for i, c in enumerate(torch.cartesian_prod(*[torch.arange(k) for k in n_new]).tolist())}
    coords_old = torch.cartesian_prod(*[torch.arange(k) for k in n_old]).tolist()
    keep = [pos_new[tuple(c)] for c in coords_old]
    assert torch.equal(b_new[keep][:, keep], b_old)


def test_finetune_refuses_a_patch_size_the_windows_cannot_tile_and_writes_nothing(two_cases, source_bundle,
                                                                                 tmp_path):
    from VeloxSegLib.errors import ConfigError
    from VeloxSegLib.train.finetune import run_finetune

    before = _tree_hashes(source_bundle)
    with pytest.raises(ConfigError, match=r"patch size 40 40 40 \(x y z\).*multiple of 32"):
        run_finetune(source_bundle, two_cases, tmp_path / "x", patch_size=(40, 40, 40))
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.training").exists()
    assert _tree_hashes(source_bundle) == before


# --------------------------------------------------------------------------- dropout


def _dropout_rates(model):
    return sorted({float(m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)})


def test_dropout_option_reaches_every_block_is_recorded_and_inherited(two_cases, source_bundle, tmp_path):
    from VeloxSegLib.bundle import load_bundle
    from VeloxSegLib.train.trainer import DROPOUT_KEYS, RunSetup

    src = load_bundle(source_bundle)
    assert _dropout_rates(src.build_model()) == [0.1]  # the network's own rate
    rc, _ = _finetune(["-m", str(source_bundle), str(two_cases), "-o", str(tmp_path / "nodrop"),
                       "--epochs", "1", "--iterations-per-epoch", "1", "--dropout", "0"])
    assert rc == 0
    child = load_bundle(tmp_path / "nodrop")
    assert child.meta["model"]["overrides"] == {k: 0.0 for k in DROPOUT_KEYS}
    assert _dropout_rates(child.build_model()) == [0.0]
    # the training network is built from the same setup: every dropout at the new rate, so two
    # forward passes in training mode agree (with the network's 0.1 they differ)
    setup = RunSetup(model_name="veloxseg-b", in_channels=(1, 1), num_classes=2, patch_size=(64, 32, 32),
                     spacing=(1.0, 1.0, 1.0), channels=[], labels=[])
    x = torch.randn(1, 2, 64, 32, 32)
    for rate, same in ((0.0, True), (0.1, False)):
        torch.manual_seed(0)
        net = setup.with_dropout(rate).build_model(training=True).train()
        with torch.no_grad():
            a, b = net.forward_train(x).logits[0], net.forward_train(x).logits[0]
        assert torch.equal(a, b) is same
    # a grandchild fine-tuned without --dropout keeps its parent's rate
    rc, _ = _finetune(["-m", str(tmp_path / "nodrop"), str(two_cases), "-o", str(tmp_path / "grandchild"),
                       "--epochs", "1", "--iterations-per-epoch", "1"])
    assert rc == 0
    assert load_bundle(tmp_path / "grandchild").meta["model"]["overrides"] == {k: 0.0 for k in DROPOUT_KEYS}


def test_dropout_option_refuses_bad_rates_and_other_networks(two_cases, source_bundle, tmp_path, capsys):
    from VeloxSegLib.errors import ConfigError
    from VeloxSegLib.train.trainer import RunSetup

    before = _tree_hashes(source_bundle)
    for rate in ("1", "-0.1"):
        rc, _ = _finetune(["-m", str(source_bundle), str(two_cases), "-o", str(tmp_path / "x"),
                           "--epochs", "1", "--iterations-per-epoch", "1", "--dropout", rate])
        assert rc != 0
        assert "--dropout must be in [0, 1)" in capsys.readouterr().err
        assert not (tmp_path / "x").exists() and not (tmp_path / "x.training").exists()
    assert _tree_hashes(source_bundle) == before
    setup = RunSetup(model_name="lightmedseg", in_channels=(1, 1), num_classes=2, patch_size=(32, 32, 32),
                     spacing=(1.0, 1.0, 1.0), channels=[], labels=[])
    with pytest.raises(ConfigError, match="applies to the VeloxSeg networks, not to 'lightmedseg'"):
        setup.with_dropout(0.0)


# --------------------------------------------------------------------------- refinement head


def test_refine_head_option_adds_a_head_that_starts_as_the_parent_and_is_recorded(two_cases, source_bundle,
                                                                                   tmp_path):
    """``--refine-head C`` adds the full-resolution head to the parent's network. With the parent's
    weights held for the one step (``--fresh-warmup 1``), only the new head (and the training-only
    modules) learn, so the child with the head's output layer zeroed is the parent's function
    exactly; the head is recorded in ``model.overrides``, inherited, and ``--refine-head 0``
    takes it away again."""
    from safetensors.torch import load_file

    from VeloxSegLib.bundle import load_bundle

    before = _tree_hashes(source_bundle)
    rc, _ = _finetune(["-m", str(source_bundle), str(two_cases), "-o", str(tmp_path / "refined"),
                       "--epochs", "1", "--iterations-per-epoch", "1", "--fresh-warmup", "1", "--lr", "1e-2",
                       "--final-weights", "last", "--refine-head", "4"])
    assert rc == 0
    assert _tree_hashes(source_bundle) == before
    child = load_bundle(tmp_path / "refined")
    assert child.meta["model"]["overrides"] == {"refine_channels": 4}
    weights = load_file(str(tmp_path / "refined" / "model.safetensors"))
    assert weights["refine.conv.weight"].shape == (4, 2 + 2, 3, 3, 3)
    assert weights["refine.out.weight"].abs().sum() > 0  # the head learned in its step
    parent, net = load_bundle(source_bundle).build_model(), child.build_model()
    assert net.refine is not None and parent.refine is None
    x = torch.randn(1, 2, *child.patch_size)
    with torch.no_grad():
        assert not torch.equal(net(x), parent(x))
        torch.nn.init.zeros_(net.refine.out.weight)
        torch.nn.init.zeros_(net.refine.out.bias)
        assert torch.equal(net(x), parent(x))
    # a grandchild keeps the head without the option, and loses it with --refine-head 0
    for name, extra, overrides in (("keeps", [], {"refine_channels": 4}), ("drops", ["--refine-head", "0"], {})):
        rc, _ = _finetune(["-m", str(tmp_path / "refined"), str(two_cases), "-o", str(tmp_path / name),
                           "--epochs", "1", "--iterations-per-epoch", "1"] + extra)
        assert rc == 0
        assert load_bundle(tmp_path / name).meta["model"]["overrides"] == overrides
        keys = load_file(str(tmp_path / name / "model.safetensors"))
        assert any(k.startswith("refine.") for k in keys) is bool(overrides)


def test_refine_head_option_refuses_bad_widths_and_other_networks(two_cases, source_bundle, tmp_path, capsys):
    from VeloxSegLib.errors import ConfigError
    from VeloxSegLib.train.trainer import RunSetup

    rc, _ = _finetune(["-m", str(source_bundle), str(two_cases), "-o", str(tmp_path / "x"),
                       "--epochs", "1", "--iterations-per-epoch", "1", "--refine-head", "-2"])
    assert rc != 0
    assert "--refine-head must be a whole number of channels >= 0, got -2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.training").exists()
    setup = RunSetup(model_name="lightmedseg", in_channels=(1, 1), num_classes=2, patch_size=(32, 32, 32),
                     spacing=(1.0, 1.0, 1.0), channels=[], labels=[])
    with pytest.raises(ConfigError, match="applies to the VeloxSeg networks, not to 'lightmedseg'"):
        setup.with_refine_head(8)


def test_component_sampling_option_reaches_the_sampler_and_is_recorded(two_cases, source_bundle, tmp_path,
                                                                        monkeypatch):
    from VeloxSegLib.bundle import load_bundle
    from VeloxSegLib.train import trainer
    from VeloxSegLib.train.sampler import PatchSampler

    fractions = []

    class Spy(PatchSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            fractions.append(self.component_fraction)

    monkeypatch.setattr(trainer, "PatchSampler", Spy)
    for name, extra in (("lesions", ["--component-sampling", "1"]), ("voxels", [])):
        rc, _ = _finetune(["-m", str(source_bundle), str(two_cases), "-o", str(tmp_path / name),
                           "--epochs", "1", "--iterations-per-epoch", "1"] + extra)
        assert rc == 0
    assert fractions == [1.0, 0.0]
    recipe = json.loads(load_bundle(tmp_path / "lesions").meta["training"]["notes"])["recipe"]
    assert "1 of fg patches centred on a uniformly chosen connected component" in recipe["sampling"]
    assert recipe["component_sampling"] == 1.0
    recipe = json.loads(load_bundle(tmp_path / "voxels").meta["training"]["notes"])["recipe"]
    assert recipe["sampling"] == "1:1 fg/bg" and recipe["component_sampling"] == 0.0
    # a child samples its patches as its parent was trained, unless the command line says otherwise
    fractions.clear()
    for name, parent, extra in (("child", "lesions", []), ("child0", "lesions", ["--component-sampling", "0"]),
                                ("child_of_voxels", "voxels", [])):
        rc, _ = _finetune(["-m", str(tmp_path / parent), str(two_cases), "-o", str(tmp_path / name),
                           "--epochs", "1", "--iterations-per-epoch", "1"] + extra)
        assert rc == 0
    assert fractions == [1.0, 0.0, 0.0]
    assert json.loads(load_bundle(tmp_path / "child").meta["training"]["notes"])["recipe"]["component_sampling"] == 1.0


def test_finetune_reads_the_component_sampling_of_bundles_recorded_before_the_field():
    from VeloxSegLib.bundle import load_bundle, training_notes
    from VeloxSegLib.train.finetune import _inherit_loss_settings
    from VeloxSegLib.train.trainer import TrainConfig

    # the shipped PET/CT demo was trained with --component-sampling 1; its record has the text only
    demo = load_bundle("petct-lesion-demo")
    recipe = training_notes(demo.meta)["recipe"]
    assert "component_sampling" not in recipe and recipe["sampling"].startswith("1:1 fg/bg; 1 of fg patches")
    config = TrainConfig()
    _inherit_loss_settings(config, demo.meta)
    assert config.component_sampling == 1.0
    meta = {"training": {"notes": json.dumps({"recipe": {"sampling": "1:1 fg/bg; 0.25 of fg patches centred on "
                                                                     "a uniformly chosen connected component"}})}}
    config = TrainConfig()
    _inherit_loss_settings(config, meta)
    assert config.component_sampling == 0.25
    for recipe in ({"sampling": "1:1 fg/bg"}, {}, {"sampling": "1:1 fg/bg; 7 of fg patches centred on x"},
                   {"component_sampling": "1"}):
        config = TrainConfig()
        _inherit_loss_settings(config, {"training": {"notes": json.dumps({"recipe": recipe})}})
        assert config.component_sampling == 0.0


def test_fresh_warmup_option_holds_the_bundles_weights_for_its_steps(two_cases, source_bundle, tmp_path):
    from VeloxSegLib.bundle import load_bundle

    messages = {}
    for name, extra in (("held", ["--fresh-warmup", "2"]), ("plain", [])):
        rc, records = _finetune(["-m", str(source_bundle), str(two_cases), "-o", str(tmp_path / name), "--epochs", "1",
                           "--iterations-per-epoch", "2", "--final-weights", "last"] + extra)
        assert rc == 0
        messages[name] = [r["message"] for r in records if r["event"] == "message"]
    assert any("first 2 step(s) train only the modules that start afresh (ds_heads, teachers)" in m
               for m in messages["held"])
    assert not any("start afresh" in m for m in messages["plain"])
    assert _same_weights(source_bundle, tmp_path / "held")
    assert not _same_weights(source_bundle, tmp_path / "plain")
    assert json.loads(load_bundle(tmp_path / "held").meta["training"]["notes"])["recipe"]["fresh_warmup_steps"] == 2
    assert "fresh_warmup_steps" not in json.loads(load_bundle(tmp_path / "plain").meta["training"]["notes"])["recipe"]


# --------------------------------------------------------------------------- another spacing


def test_finetune_at_another_spacing_records_it_and_predicts_at_it(two_cases, source_bundle, tmp_path):
    from VeloxSegLib.bundle import load_bundle
    from VeloxSegLib.infer.pipeline import InferencePlan

    src = load_bundle(source_bundle)
    parent_spacing = [float(v) for v in src.meta["spacing"]]
    target = [round(2 * v, 3) for v in parent_spacing]  # twice as coarse: the cases shrink to half
    before = _tree_hashes(source_bundle)
    rc, _ = _finetune(["-m", str(source_bundle), str(two_cases), "-o", str(tmp_path / "coarse"),
                       "--epochs", "1", "--iterations-per-epoch", "1", "--spacing", *map(str, target)])
    assert rc == 0
    assert _tree_hashes(source_bundle) == before
    child = load_bundle(tmp_path / "coarse")
    assert child.meta["spacing"] == target
    assert json.loads(child.meta["training"]["notes"])["parent_spacing"] == parent_spacing
    assert InferencePlan.from_meta(child.meta).spacing == tuple(target)  # predict resamples to it
    assert set(child.state_dict()) == set(src.state_dict())  # the same network, every tensor kept


def test_finetune_refuses_a_bad_spacing_and_writes_nothing(two_cases, source_bundle, tmp_path, capsys):
    before = _tree_hashes(source_bundle)
    rc, _ = _finetune(["-m", str(source_bundle), str(two_cases), "-o", str(tmp_path / "x"),
                       "--epochs", "1", "--iterations-per-epoch", "1", "--spacing", "2", "0", "2"])
    assert rc != 0
    assert "--spacing must be three positive sizes in mm" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.training").exists()
    assert _tree_hashes(source_bundle) == before


# --------------------------------------------------------------------------- fine-tuning benchmark


def test_finetune_benchmark_runs_the_command_and_reports_its_record(source_bundle, tmp_path):
    """`veloxseg bench`'s fine-tuning section: the real command in its own process per draw; the
    table's figures come from the new bundle's record and from that process."""
    from VeloxSegLib.bench import render_markdown
    from VeloxSegLib.train.finetune import finetune_benchmark

    before = _tree_hashes(source_bundle)
    out = finetune_benchmark(str(source_bundle), draws=(5,), threads=1, train_cases=2, val_cases=2,
                             size=(64, 64, 48), extra=["--epochs", "2", "--iterations-per-epoch", "1",
                                                       "--batch-size", "1"], target=0.99, workdir=tmp_path)
    assert _tree_hashes(source_bundle) == before
    assert list(tmp_path.iterdir()) == []  # the phantoms and the new bundle lived in a temporary folder
    (row,) = out["rows"]
    assert row["draw"] == 5 and row["reached"] is False and row["steps"] == 2  # an untrained net stays far below 0.99
    assert 0.0 <= row["start_dice"] <= 1.0 and 0.0 <= row["dice"] <= 1.0
    assert row["wall_s"] > 0 and row["peak_rss_mb"] > 50  # the child's own high-water mark, in MB
    assert f"| 5 | {row['start_dice']:.3f} | {row['dice']:.3f} | no | 2 |" in out["markdown"]
    page = render_markdown({"machine": {"cpu": "x", "cores": 2, "memory_gib": 1, "os": "y", "python": "3",
                                        "torch": "t", "date": "d"}, "patch": [], "finetune": out})
    assert "## Fine-tuning on 5 cases to Dice 0.7 on 3 held-out ones" in page and out["markdown"] in page


def test_finetune_table_says_when_each_draw_reached_the_target():
    from VeloxSegLib.train.finetune import finetune_table

    base = {"start_dice": 0.5, "dice": 0.5, "steps": 0, "wall_s": 6.04, "peak_rss_mb": 900.0, "reached_at_epoch": None}
    rows = [dict(base, draw=1, reached=True, met_at_start=True, start_dice=0.81, dice=0.81),
            dict(base, draw=2, reached=True, met_at_start=False, reached_at_epoch=0, dice=0.72, steps=25),
            dict(base, draw=3, reached=False, met_at_start=False, steps=500, peak_rss_mb=None)]
    text = finetune_table(rows)
    assert "| 1 | 0.810 | 0.810 | yes, at the start (nothing trained) | 0 | 6.0 | 900.0 |" in text
    assert "| 2 | 0.500 | 0.720 | yes, after epoch 1 | 25 | 6.0 | 900.0 |" in text
    assert "| 3 | 0.500 | 0.500 | no | 500 | 6.0 | - |" in text
    assert "--target-dice 0.7 --threads 2" in text and "| reached 0.70 |" in text


def test_finetune_folds_validate_on_their_fold_and_pack_into_an_ensemble(source_bundle, tmp_path):
    """Cross-validation on local cases: each fold's fine-tune validates on its own fifth, and the
    fold bundles pack into one ensemble."""
    from VeloxSegLib.bundle import load_bundle
    from VeloxSegLib.cli import main
    from VeloxSegLib.data.phantom import write_phantom_dataset
    from VeloxSegLib.train.trainer import split_cases

    local = tmp_path / "five"
    write_phantom_dataset(local, "petct", 5, seed=12, size=(64, 64, 48))
    cases = sorted(p.name[:-len(".nii.gz")] for p in (local / "labelsTr").iterdir())
    folds = []
    for k in (1, 3):
        out = tmp_path / f"ft{k}"
        rc, _ = _finetune(["-m", str(source_bundle), str(local), "-o", str(out), "--fold", str(k), "--epochs", "1",
                           "--iterations-per-epoch", "1", "--preprocessed", str(tmp_path / "pre")])
        assert rc == 0
        metrics = load_bundle(out).meta["training"]["metrics"]
        train, val, _, _ = split_cases(cases, fold=k)
        assert metrics["val_cases"] == val and metrics["train_cases"] == train and len(val) == 1
        folds.append(out)
    assert load_bundle(folds[0]).meta["training"]["metrics"]["val_cases"] != \
        load_bundle(folds[1]).meta["training"]["metrics"]["val_cases"]
    assert main(["ensemble", *map(str, folds), "-o", str(tmp_path / "cv")]) == 0
    assert load_bundle(tmp_path / "cv").members == 2
    with pytest.raises(SystemExit):  # --fold and --split exclude each other, as for train
        _finetune(["-m", str(source_bundle), str(local), "-o", str(tmp_path / "x"), "--fold", "0", "--split",
                   "0.8,0.2,0"])
