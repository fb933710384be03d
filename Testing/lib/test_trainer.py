"""Training runs: bundle output, JSON progress, logs, checkpoints, exact resume, SIGINT, splits."""
import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from VeloxSegLib.errors import Cancelled, ConfigError, InputError
from VeloxSegLib.train.checkpoint import read_checkpoint
from VeloxSegLib.train.progress import make_reporter, plot_curves
from VeloxSegLib.train.trainer import StopRequest, TrainConfig, run_training, split_cases

EPOCH_FIELDS = {"epoch", "loss", "lr", "val_dice", "seconds"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from VeloxSegLib.data.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("trainer") / "ds"
    write_phantom_dataset(root, "petct", 3, seed=1, size=(64, 64, 48))
    return root


@pytest.fixture(scope="module")
def cli_run(dataset, tmp_path_factory):
    """``veloxseg train`` on 3 phantom cases, 2 epochs of 2 steps, JSON progress."""
    from VeloxSegLib.cli import main

    out = tmp_path_factory.mktemp("trained") / "petct-tiny"
    stdout = io.StringIO()
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(stdout):
        rc = main(["train", str(dataset), "-o", str(out), "--epochs", "2", "--iterations-per-epoch", "2",
                   "--batch-size", "1", "--val-every", "1", "--device", "cpu", "--seed", "3", "--progress", "json"])
    return rc, stdout.getvalue(), out


def test_train_command_writes_a_bundle_that_load_bundle_accepts(cli_run):
    from VeloxSegLib.bundle import load_bundle

    rc, _, out = cli_run
    assert rc == 0
    assert sorted(os.listdir(out)) == ["bundle.json", "model.safetensors"]
    bundle = load_bundle(out)
    net = bundle.build_model()
    assert net.patch_size == tuple(bundle.meta["model"]["patch_size"])
    tr = bundle.meta["training"]
    assert tr["epochs"] == 2 and tr["seed"] == 3 and tr["parent"] is None
    assert "veloxseg train" in tr["command"] and "ds" in tr["dataset"] and "phantoms" in tr["dataset"]
    assert tr["metrics"]["validated_on"] == "held-out" and len(tr["metrics"]["val_cases"]) == 1
    assert 0.0 <= tr["metrics"]["val_dice"] <= 1.0
    assert bundle.meta["channels"][0]["normalization"]["scheme"] == "ct"
    # the bundle says which flips test-time augmentation may average: the recipe mirrors z only
    assert json.loads((out / "bundle.json").read_text())["inference"]["tta_axes"] == ["z"]


def test_json_progress_lines_parse_and_carry_the_fields(cli_run):
    _, stdout, _ = cli_run
    records = [json.loads(line) for line in stdout.splitlines()]  # nothing but JSON on stdout
    epochs = [r for r in records if r["event"] == "epoch"]
    steps = [r for r in records if r["event"] == "step"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    for r in epochs:
        assert EPOCH_FIELDS <= set(r)
        assert {"seg", "rc", "sdkt", "total"} <= set(r["loss"])
        assert r["val_dice"] is not None and r["lr"] > 0
    assert len(steps) == 4 and all("epoch" not in r for r in steps)  # records with 'epoch' are epochs
    assert all({"step", "steps", "loss", "lr", "fraction"} <= set(r) for r in steps)
    # planning and preprocessing are reported case by case before the run starts
    prepare = [r for r in records if r["event"] == "prepare"]
    first = records.index(next(r for r in records if r["event"] != "prepare"))
    assert records[first]["event"] == "start" and records[-1]["event"] == "done"
    assert prepare == records[:first]
    for stage in ("plan", "preprocess"):
        done = [r["done"] for r in prepare if r["stage"] == stage]
        total = {r["total"] for r in prepare if r["stage"] == stage}
        assert total == {len(done)} and done == list(range(1, len(done) + 1)), stage
    assert [r["total"] for r in prepare if r["stage"] == "plan"][0] == 3  # every case is measured


def test_training_log_csv_and_curve_plot_are_written(cli_run):
    _, _, out = cli_run
    work = out.with_name(out.name + ".training")
    rows = list(csv.DictReader(open(work / "training_log.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"] and all(r["val_dice"] for r in rows)
    pytest.importorskip("matplotlib")
    assert (work / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lesion_dice_run_logs_the_term_and_records_its_weight(dataset, cli_run, tmp_path):
    from VeloxSegLib.bundle import load_bundle
    from VeloxSegLib.cli import main

    out = tmp_path / "petct-lesion"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["train", str(dataset), "-o", str(out), "--epochs", "1", "--iterations-per-epoch", "2",
                   "--batch-size", "1", "--val-every", "1", "--device", "cpu", "--seed", "3", "--progress", "json",
                   "--lesion-dice", "0.5"])
    assert rc == 0
    epoch = [json.loads(line) for line in stdout.getvalue().splitlines() if '"event": "epoch"' in line][0]
    # the sampler alternates foreground and background patches: the first of each epoch has a lesion
    assert 0.0 < epoch["loss"]["lesion"] <= 1.0
    rows = list(csv.DictReader(open(out.with_name(out.name + ".training") / "training_log.csv")))
    assert float(rows[0]["loss_lesion"]) == pytest.approx(epoch["loss"]["lesion"], rel=1e-4)
    loss = json.loads(load_bundle(out).meta["training"]["notes"])["recipe"]["loss"]
    assert loss["lambda_lesion_dice"] == 0.5
    # a run without the term has neither the column nor the record
    _, _, plain = cli_run
    header = (plain.with_name(plain.name + ".training") / "training_log.csv").read_text().splitlines()[0]
    assert "loss_lesion" not in header
    assert "lambda_lesion_dice" not in json.loads(load_bundle(plain).meta["training"]["notes"])["recipe"]["loss"]


def test_curve_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    history = [{"epoch": 0, "loss": {"total": 1.0}, "val_dice": 0.5}]
    assert plot_curves(tmp_path / "c.png", history) is None
    assert not (tmp_path / "c.png").exists()


def test_checkpoints_are_safetensors_with_a_json_state(cli_run):
    _, _, out = cli_run
    ckpts = out.with_name(out.name + ".training") / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["best.json", "best.safetensors", "last.json", "last.safetensors"]
    ckpt = read_checkpoint(ckpts / "last.safetensors")
    assert ckpt.state["loop"]["epoch"] == 2 and ckpt.state["schedule"]["last_step"] == 4
    assert any(k.startswith("model.teachers.") for k in ckpt.tensors)  # the full training model
    assert any(k.startswith("optim.") for k in ckpt.tensors)
    assert json.loads((ckpts / "last.json").read_text())["loop"]["epoch"] == 2


def _config(**kw):
    base = dict(epochs=2, iterations_per_epoch=2, batch_size=1, val_every=5, device="cpu", seed=7,
                final_weights="last")
    base.update(kw)
    return TrainConfig(**base)


def test_resumed_run_matches_the_uninterrupted_run(dataset, tmp_path):
    torch.set_num_threads(1)
    full = run_training(dataset, tmp_path / "full", _config())

    stop = StopRequest()

    def on_record(r):
        if r.get("event") == "step" and r["step"] == 3:  # mid second epoch
            stop.event.set()

    with pytest.raises(Cancelled, match="--resume"):
        run_training(dataset, tmp_path / "cut", _config(), stop=stop, progress=make_reporter("none", on_record))
    assert not (tmp_path / "cut").exists()
    resumed = run_training(dataset, tmp_path / "cut", _config(), resume=True)

    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for r_full, r_resumed in zip(full.history, resumed.history, strict=True):
        assert r_full["loss"] == pytest.approx(r_resumed["loss"], rel=1e-12)  # epoch means, mid-epoch cut included


def test_resume_refuses_settings_that_differ_from_the_checkpoint(dataset, tmp_path):
    """A resumed run continues the checkpoint's schedule, loss and random streams: another rate,
    seed, loss term or batch size would train something the record does not describe."""
    torch.set_num_threads(1)
    stop = StopRequest()

    def on_record(r):
        if r.get("event") == "step" and r["step"] == 1:
            stop.event.set()

    with pytest.raises(Cancelled):
        run_training(dataset, tmp_path / "cut", _config(), stop=stop, progress=make_reporter("none", on_record))
    for change, pattern in ((dict(lr=1e-3), "--lr 0.00025, this run has 0.001"),
                            (dict(seed=8), "--seed 7, this run has 8"),
                            (dict(use_sdkt=False, use_reconstruction=False), r"the SDKT loss \(--no-sdkt\) on, this run has off"),
                            (dict(lesion_dice=1.0), "--lesion-dice default, this run has 1.0"),
                            (dict(modality_dropout=0.2), "--modality-dropout 0.0, this run has 0.2"),
                            (dict(batch_size=2), "batch size 1, this run has 2")):
        with pytest.raises(ConfigError, match=pattern):
            run_training(dataset, tmp_path / "cut", _config(**change), resume=True)
    assert not (tmp_path / "cut").exists()
    resumed = run_training(dataset, tmp_path / "cut", _config(), resume=True)  # the same settings still resume
    assert resumed.bundle is not None and (tmp_path / "cut").is_dir()


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_work_folder(dataset, tmp_path):
    """Divergence at the first steps: nothing resumable exists, so nothing of the run stays (a
    failure after a checkpoint keeps the work folder: test_resumed_run_matches_the_uninterrupted_run)."""
    torch.set_num_threads(1)
    work = tmp_path / "runs" / "w"
    with pytest.raises(ConfigError, match="diverged"):
        run_training(dataset, tmp_path / "out", _config(lr=1e12), work_dir=work)
    assert not (tmp_path / "runs").exists()  # w and the runs folder it made for it
    assert not (tmp_path / "out").exists()


def test_loader_threads_train_the_same_weights_through_an_interruption(dataset, tmp_path):
    """Threads that prepare patches ahead change nothing: a threaded run, cut mid-epoch while
    batches are in flight and resumed, ends with the weights of the plain uninterrupted run."""
    torch.set_num_threads(1)
    full = run_training(dataset, tmp_path / "full", _config(loader_threads=0))
    stop = StopRequest()

    def on_record(r):
        if r.get("event") == "step" and r["step"] == 3:
            stop.event.set()

    with pytest.raises(Cancelled, match="--resume"):
        run_training(dataset, tmp_path / "cut", _config(loader_threads=2), stop=stop,
                     progress=make_reporter("none", on_record))
    resumed = run_training(dataset, tmp_path / "cut", _config(loader_threads=3), resume=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loader_threads_default_to_none_on_the_cpu_and_some_beside_a_gpu():
    from VeloxSegLib.train.trainer import resolve_loader_threads

    assert resolve_loader_threads(None, torch.device("cpu")) == 0
    assert 1 <= resolve_loader_threads(None, torch.device("cuda")) <= 8
    assert resolve_loader_threads(5, torch.device("cpu")) == 5
    with pytest.raises(ConfigError, match="--loader-threads"):
        TrainConfig(loader_threads=-1).check()


def test_sigint_saves_a_resumable_checkpoint_and_leaves_no_bundle(dataset, tmp_path):
    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "VeloxSegLib.cli", "train", str(dataset), "-o", str(out), "--epochs", "2",
           "--iterations-per-epoch", "50", "--batch-size", "1", "--device", "cpu", "--threads", "1",
           "--progress", "json"]
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    timer = threading.Timer(240, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            if json.loads(line)["event"] == "step":
                proc.send_signal(signal.SIGINT)
                break
        _, err = proc.communicate(timeout=120)
    finally:
        timer.cancel()
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT" in err and "--resume" in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b")]  # no temporary bundle either
    ckpt = read_checkpoint(tmp_path / "b.training" / "checkpoints" / "last.safetensors")
    assert ckpt.state["loop"]["epoch"] == 0 and 1 <= ckpt.state["loop"]["iteration"] < 50
    assert ckpt.state["schedule"]["last_step"] == ckpt.state["loop"]["iteration"]


def test_existing_output_or_checkpoint_is_refused_before_training(dataset, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(InputError, match="already exists"):
        run_training(dataset, tmp_path / "taken", _config())
    (tmp_path / "fresh.training" / "checkpoints").mkdir(parents=True)
    (tmp_path / "fresh.training" / "checkpoints" / "last.safetensors").write_bytes(b"x")
    with pytest.raises(InputError, match="--resume"):
        run_training(dataset, tmp_path / "fresh", _config())
    with pytest.raises(InputError, match="no checkpoint"):
        run_training(dataset, tmp_path / "other", _config(), resume=True)


def test_splits_follow_the_case_count_and_options():
    assert split_cases(["a", "b"])[3] == "training cases"
    train, val, _, how = split_cases(["a", "b"])
    assert train == val == ["a", "b"]
    train, val, test, how = split_cases(["a", "b", "c"])
    assert how == "held-out" and len(val) == 1 and len(train) == 2 and not set(train) & set(val)
    cases = [f"c{i}" for i in range(10)]
    folds = [split_cases(cases, fold=k)[1] for k in range(5)]
    assert sorted(sum(folds, [])) == sorted(cases)  # every case validates in exactly one fold
    train, val, test, _ = split_cases(cases, split=(0.6, 0.2, 0.2))
    assert (len(train), len(val), len(test)) == (6, 2, 2)
    assert split_cases(cases, split=(0.6, 0.2, 0.2)) == split_cases(list(reversed(cases)), split=(0.6, 0.2, 0.2))
    with pytest.raises(ConfigError):
        split_cases(["a", "b", "c"], fold=0)


def test_benchmark_training_step_reports_time_and_memory():
    from VeloxSegLib.train.trainer import benchmark_training_step

    r = benchmark_training_step("lightmedseg", batch=1, patch=32, threads=1, iters=1, warmup=0)
    assert r["s_per_iter_median"] > 0 and r["peak_rss_mb"] > 0 and r["patch"] == [32, 32, 32]


def test_target_dice_stops_the_run_early_and_is_recorded(dataset, tmp_path, monkeypatch):
    from VeloxSegLib.train import trainer as T

    scores = iter([0.5, 0.95, 0.99])
    monkeypatch.setattr(T.Validator, "__call__", lambda self, net, cancel=None: {
        "dice": next(scores), "per_label": {}})
    torch.set_num_threads(1)
    result = run_training(dataset, tmp_path / "early", _config(epochs=5, iterations_per_epoch=1, target_dice=0.9))
    assert [r["val_dice"] for r in result.history] == [0.5, 0.95]  # validated every epoch, stopped at 0.95
    from VeloxSegLib.bundle import load_bundle

    m = load_bundle(tmp_path / "early").meta["training"]["metrics"]
    assert m["reached_target_at_epoch"] == 1 and m["val_dice"] == 0.95 and m["train_seconds"] > 0
    assert m["steps_run"] == 2  # 2 epochs of 1 step, not the 5 planned
    from VeloxSegLib.bundle import training_notes
    from VeloxSegLib.commands.compare import _training_record

    bundle = load_bundle(tmp_path / "early")
    assert training_notes(bundle.meta)["recipe"]["total_steps"] == 5
    assert _training_record(bundle)["iterations"] == 2  # compare reports the steps taken


def test_stop_during_validation_checkpoints_the_finished_epoch(dataset, tmp_path, monkeypatch):
    from VeloxSegLib.train import trainer as T

    calls = []

    def fake_validate(self, net, cancel=None):
        calls.append(cancel)
        if len(calls) == 1:
            cancel.set()  # as if SIGINT arrived while the first validation ran
            raise Cancelled("cancelled")
        return {"dice": 0.5, "per_label": {}}

    monkeypatch.setattr(T.Validator, "__call__", fake_validate)
    torch.set_num_threads(1)
    with pytest.raises(Cancelled, match="iteration 1"):
        run_training(dataset, tmp_path / "v", _config(epochs=1, iterations_per_epoch=1))
    ckpt = read_checkpoint(tmp_path / "v.training" / "checkpoints" / "last.safetensors")
    assert ckpt.state["loop"]["epoch"] == 0 and ckpt.state["loop"]["iteration"] == 1
    result = run_training(dataset, tmp_path / "v", _config(epochs=1, iterations_per_epoch=1), resume=True)
    assert [r["val_dice"] for r in result.history] == [0.5] and len(calls) == 2


def test_monai_unet_peer_trains_with_batch_dice_into_a_bundle_predict_can_use(dataset, tmp_path):
    """The same-budget comparison path: ``--model monai-unet`` (benchmark peer) with batch Dice."""
    import numpy as np
    import SimpleITK as sitk

    from VeloxSegLib.bundle import load_bundle
    from VeloxSegLib.cli import main
    from VeloxSegLib.model.peers import PeerNet

    out = tmp_path / "unet"
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["train", str(dataset), "-o", str(out), "--model", "monai-unet", "--epochs", "1",
                   "--iterations-per-epoch", "2", "--batch-size", "2", "--batch-dice", "--device", "cpu",
                   "--progress", "none"])
    assert rc == 0
    bundle = load_bundle(out)
    assert bundle.meta["model"]["name"] == "monai-unet"
    assert json.loads(bundle.meta["training"]["notes"])["recipe"]["loss"]["batch_dice"] is True
    net = bundle.build_model()
    assert isinstance(net, PeerNet) and not net.training
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    images = sorted((dataset / "imagesTr").glob("*_0000.nii.gz"))[:1]
    case = images[0].name[:-len("_0000.nii.gz")]
    rc = main(["predict", "-m", str(out), "-i", str(images[0]), str(images[0]).replace("_0000", "_0001"),
               "-o", str(pred_dir / f"{case}.nii.gz"), "--progress", "none"])
    assert rc == 0
    seg = sitk.ReadImage(str(pred_dir / f"{case}.nii.gz"))
    ref = sitk.ReadImage(str(images[0]))
    assert seg.GetSize() == ref.GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1}


# --------------------------------------------------------------------------- fine-tuning's fresh warm-up


@pytest.fixture(scope="module")
def start_weights(dataset, tmp_path_factory):
    """Bundle-style weights (no teachers, no deep-supervision heads) of a one-step run."""
    torch.set_num_threads(1)
    res = run_training(dataset, tmp_path_factory.mktemp("start") / "w", _config(epochs=1, iterations_per_epoch=1))
    return {k: v.clone() for k, v in res.model.inference_state_dict().items()}


def test_fresh_warmup_holds_the_inherited_weights_while_the_fresh_modules_learn(dataset, start_weights, tmp_path):
    torch.set_num_threads(1)
    res = run_training(dataset, tmp_path / "held", _config(epochs=1, iterations_per_epoch=2, fresh_warmup=2),
                       init_weights=start_weights)
    own = res.model.state_dict()
    for k, v in start_weights.items():
        assert torch.equal(own[k], v), k  # not one step, not one weight decay
    ckpt = read_checkpoint(res.work_dir / "checkpoints" / "last.safetensors")
    opt = ckpt.optimizer_state()
    groups = {g["name"]: g for g in opt["param_groups"]}
    assert groups["inherited"]["start_step"] == 2 and "start_step" not in groups["fresh"]
    assert not any(i in opt["state"] for i in groups["inherited"]["params"])  # AdamW never touched them
    assert all(float(opt["state"][i]["step"]) == 2 for i in groups["fresh"]["params"])
    names = [n for n, _ in res.model.named_parameters()]
    fresh_names = {names[i].split(".")[0] for i in groups["fresh"]["params"]}
    assert fresh_names == {"teachers", "ds_heads"}
    recipe = json.loads(res.meta["training"]["notes"])["recipe"]
    assert recipe["fresh_warmup_steps"] == 2

    # one step later the inherited weights join in
    joined = run_training(dataset, tmp_path / "joined", _config(epochs=1, iterations_per_epoch=3, fresh_warmup=2),
                          init_weights=start_weights)
    now = joined.model.state_dict()
    changed = [k for k, v in start_weights.items() if v.is_floating_point() and not torch.equal(now[k], v)]
    assert len(changed) > len(start_weights) // 2


def test_fresh_warmup_skips_the_held_weights_gradients_with_the_same_updates(dataset, start_weights, tmp_path,
                                                                             monkeypatch):
    """While the inherited weights wait, their gradients are not computed at all (the backward
    pass only reaches the fresh modules); the run is the same as one that computes and drops them.

    Compared under plain SGD, to float32 rounding: a backward pass that skips the held weights
    may run other CPU kernels for the rest (oneDNN on an AVX-512 AMD EPYC does), and AdamW's first
    step turns their last-bit differences into whole steps of +-lr for gradients that are rounding
    noise (biases before a normalization)."""
    from VeloxSegLib.train.trainer import TrainLoop

    torch.set_num_threads(1)
    monkeypatch.setattr(torch.optim, "AdamW", lambda groups, lr, weight_decay: torch.optim.SGD(groups, lr=lr))
    config = _config(epochs=1, iterations_per_epoch=3, fresh_warmup=2, lr=0.05)
    seen = []
    original = TrainLoop._skip_waiting_gradients

    def spy(self):
        original(self)
        seen.append({g.get("name"): all(p.requires_grad for p in g["params"]) for g in self.optimizer.param_groups})

    monkeypatch.setattr(TrainLoop, "_skip_waiting_gradients", spy)
    skipped = run_training(dataset, tmp_path / "skipped", config, init_weights=start_weights)
    assert seen == [{"inherited": False, "fresh": True}] * 2 + [{"inherited": True, "fresh": True}]
    monkeypatch.setattr(TrainLoop, "_skip_waiting_gradients", lambda self: None)
    dropped = run_training(dataset, tmp_path / "dropped", config, init_weights=start_weights)
    a, b = skipped.model.state_dict(), dropped.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k


def test_fresh_warmup_resumes_exactly_across_the_moment_the_weights_join(dataset, start_weights, tmp_path):
    torch.set_num_threads(1)
    cfg = dict(fresh_warmup=3)
    full = run_training(dataset, tmp_path / "full", _config(**cfg), init_weights=start_weights)
    stop = StopRequest()

    def on_record(r):
        if r.get("event") == "step" and r["step"] == 2:  # before the inherited weights join at step 3
            stop.event.set()

    with pytest.raises(Cancelled, match="--resume"):
        run_training(dataset, tmp_path / "cut", _config(**cfg), init_weights=start_weights, stop=stop,
                     progress=make_reporter("none", on_record))
    resumed = run_training(dataset, tmp_path / "cut", _config(**cfg), init_weights=start_weights, resume=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan")])
def test_modality_dropout_outside_0_1_is_refused(p):
    with pytest.raises(ConfigError, match="--modality-dropout"):
        TrainConfig(modality_dropout=p).check()


def test_modality_dropout_reaches_the_sampler_and_the_record(dataset, tmp_path, monkeypatch):
    from VeloxSegLib.bundle import load_bundle
    from VeloxSegLib.train import trainer as T

    seen = []
    real = T.PatchSampler

    def spy(cases, patch, batch, rng, augmenter, **kw):
        seen.append(augmenter)
        return real(cases, patch, batch, rng, augmenter, **kw)

    monkeypatch.setattr(T, "PatchSampler", spy)
    torch.set_num_threads(1)
    res = run_training(dataset, tmp_path / "md", _config(epochs=1, modality_dropout=0.5))
    assert seen[-1].modality_dropout == 0.5 and seen[-1].channels == 2  # CT + PET: either can be dropped
    recipe = json.loads(load_bundle(res.bundle).meta["training"]["notes"])["recipe"]
    assert recipe["modality_dropout"] == 0.5 and "modality dropout p0.5" in recipe["augmentation"]
    run_training(dataset, tmp_path / "plain", _config(epochs=1))
    assert seen[-1] is T.RECIPE_AUGMENTER


def test_fresh_warmup_refuses_negative_steps():
    with pytest.raises(ConfigError, match="--fresh-warmup"):
        TrainConfig(fresh_warmup=-1).check()


def test_validating_on_the_training_cases_is_said_once_with_the_reason(dataset, tmp_path):
    import io

    from VeloxSegLib.train.progress import MultiProgress, TqdmProgress

    torch.set_num_threads(1)
    stream = io.StringIO()
    run_training(dataset, tmp_path / "out", _config(epochs=1, iterations_per_epoch=1, split=(1.0, 0.0, 0.0)),
                 progress=MultiProgress([TqdmProgress(stream=stream, disable=False)]))
    text = stream.getvalue()
    assert text.count("training cases") == 1, text  # once, not again in other words
    assert "--split gives validation no case" in text and "no case can be held out" not in text


def test_the_bar_shows_planning_and_preprocessing_before_training():
    from VeloxSegLib.train.progress import TqdmProgress

    out = io.StringIO()
    bar = TqdmProgress(stream=out, disable=False)
    for i in (1, 2, 3):
        bar.emit({"event": "prepare", "stage": "plan", "done": i, "total": 3, "seconds": 0.1})
    for i in (1, 2):
        bar.emit({"event": "prepare", "stage": "preprocess", "done": i, "total": 2, "seconds": 0.1})
    bar.emit({"event": "start", "epochs": 1, "iterations_per_epoch": 4})
    bar.close()
    text = out.getvalue()
    assert "planning: 100%" in text and "3/3" in text
    assert "preprocessing: 100%" in text and "2/2" in text
    assert text.index("planning") < text.index("preprocessing") < text.index("training:")


def test_training_record_names_the_phantoms_lesion_range(dataset, tmp_path):
    """The record's dataset text repeats how phantoms were made, a `--lesion-diameter` range
    included, so the command that made the training data can be run again."""
    from VeloxSegLib.data.nnunet import load_dataset
    from VeloxSegLib.data.phantom import write_phantom_dataset
    from VeloxSegLib.train.trainer import _dataset_text

    small = tmp_path / "small"
    write_phantom_dataset(small, "petct", 1, seed=3, size=(32, 32, 24), lesion_diameter_mm=(6, 12.5))
    text = _dataset_text(load_dataset(small), 1, 1, "training cases")
    assert "veloxseg phantom --seed 3 --size 32 32 24 --lesion-diameter 6 12.5, version 1" in text
    assert "validated on the training cases" in text
    text = _dataset_text(load_dataset(dataset), 2, 1, "held-out")
    assert "--seed 1 --size 64 64 48, version 1" in text and "lesion-diameter" not in text
    meta = json.loads((small / "dataset.json").read_text())
    meta["veloxseg_phantom"]["lesion_diameter_mm"] = ["6", "12.5"]  # hand-edited: not repeated, no crash
    (small / "dataset.json").write_text(json.dumps(meta))
    text = _dataset_text(load_dataset(small), 1, 1, "training cases")
    assert "--size 32 32 24, version 1" in text and "lesion-diameter" not in text
