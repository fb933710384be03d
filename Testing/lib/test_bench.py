"""The network benchmark's aggregation: timed repetitions spread over rounds, best time counts."""
import pytest

from VeloxSegLib import bench


def test_rounds_let_every_model_use_its_quiet_spell(monkeypatch):
    calls = []

    def worker(args):
        if args[0] == "count":
            return {"params_m": 1.0, "gmac": 1.0}
        name, threads = args[1], int(args[2])
        calls.append((name, threads, "plain" in args))
        rnd = sum(1 for c in calls if c == calls[-1])  # 1-based round of this (model, threads, path)
        base = {"monai-unet": 0.4, "veloxseg-b": 0.07}[name] / threads
        slow = 2.0 if (name == "veloxseg-b" and rnd == 1) or (name == "monai-unet" and rnd == 3) else 1.0
        t = base * slow * (1.5 if "plain" in args else 1.0)
        spread = 1.3 if name == "veloxseg-b" else 1.1  # within a round, VeloxSeg's median is further off its best
        return {"best_s": t, "median_s": t * spread, "peak_rss_mb": 100.0 + rnd}

    monkeypatch.setattr(bench, "run_worker", worker)
    rows = bench.patch_benchmark(["monai-unet", "veloxseg-b"], reps=6, progress=lambda m: None, rounds=3,
                                 bf16=False)
    unet, velox = rows
    # the models alternate: every round runs both before the next round starts
    assert [c[0] for c in calls[:5]] == ["monai-unet", "monai-unet", "veloxseg-b", "veloxseg-b", "veloxseg-b"]
    assert len(calls) == 3 * (2 + 3)
    assert unet["pps_1t"] == pytest.approx(1 / 0.4) and velox["pps_1t"] == pytest.approx(1 / 0.07)
    assert velox["ratio_1t"] == pytest.approx(0.4 / 0.07) and velox["ratio_2t"] == pytest.approx(0.4 / 0.07)
    assert velox["pps_1t_plain"] == pytest.approx(1 / 0.105)
    assert velox["peak_rss_mb"] == 103.0 and "pps_1t_plain" not in unet
    # the median-based ratio takes the middle round's median of each (no slow round for either)
    assert velox["ratio_1t_median"] == pytest.approx((0.4 * 1.1) / (0.07 * 1.3))
    assert velox["timed_reps"] == unet["timed_reps"] == 6
    md = bench.render_markdown({"machine": {k: "x" for k in ("cpu", "cores", "memory_gib", "os", "python", "torch",
                                                             "date")}, "patch": rows})
    row = next(line for line in md.splitlines() if line.startswith("| veloxseg-b |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4:6] == [f"{0.4 / 0.07:.2f}", f"{(0.4 * 1.1) / (0.07 * 1.3):.2f}"] and cells[-1] == "6"


def test_bf16_runs_are_reported_against_the_peer_in_both_precisions(monkeypatch):
    calls = []

    def worker(args):
        if args[0] == "count":
            return {"params_m": 1.0, "gmac": 1.0}
        calls.append(tuple(args[1:3]) + tuple(args[4:]))
        base = {"monai-unet": 0.4, "veloxseg-b": 0.07, "lightmedseg": 0.2}[args[1]] / int(args[2])
        t = base * {"bf16": 0.5, "plain": 1.5}.get(args[4] if len(args) > 4 else "", 1.0)
        return {"best_s": t, "median_s": t, "peak_rss_mb": 100.0}

    monkeypatch.setattr(bench, "run_worker", worker)
    rows = bench.patch_benchmark(["monai-unet", "veloxseg-b", "lightmedseg"], reps=2, progress=lambda m: None,
                                 rounds=1, bf16=True)
    assert ("monai-unet", "1", "bf16") in calls and ("veloxseg-b", "1", "bf16") in calls
    assert not any(c[0] == "lightmedseg" and "bf16" in c for c in calls)  # only BF16_MODELS
    unet, velox, lms = rows
    assert velox["pps_1t_bf16"] == pytest.approx(1 / 0.035) and "pps_1t_bf16" not in lms
    md = bench.render_markdown({"machine": {k: "x" for k in ("cpu", "cores", "memory_gib", "os", "python", "torch",
                                                             "date")}, "patch": rows})
    section = md.split("## Opt-in bfloat16")[1]
    row = next(line for line in section.splitlines() if line.startswith("| veloxseg-b |"))
    # fp32 p/s, bf16 p/s, bf16 speed-up, x UNet fp32, x UNet bf16
    assert row == f"| veloxseg-b | {1 / 0.07:.2f} | {1 / 0.035:.2f} | 2.00 | {0.4 / 0.035:.2f} | {0.2 / 0.035:.2f} |"


# -- the authors' implementation as a same-run reference (``veloxseg bench --reference DIR``) -----------

FAKE_MODEL = '''
import torch
from torch import nn
from .components.blocks import pointwise


class VeloxSeg(nn.Module):
    def __init__(self, in_ch, n_classes, input_size, **unused):
        super().__init__()
        self.conv = pointwise(sum(in_ch), n_classes)
        self.unused = nn.Linear(3, 3)  # gets no gradient from the output: not an inference parameter

    def forward(self, x):
        return self.conv(x)
'''


def _fake_checkout(root, config=None):
    """A folder laid out like github.com/JinPLu/VeloxSeg (model package with relative imports and
    the AutoPET-II config), whose network is one 1x1 convolution: parameters and MACs are known."""
    import json

    (root / "model" / "components").mkdir(parents=True)
    (root / "model" / "__init__.py").write_text("")
    (root / "model" / "components" / "__init__.py").write_text("")
    (root / "model" / "components" / "blocks.py").write_text(
        "from torch import nn\n\ndef pointwise(cin, cout):\n    return nn.Conv3d(cin, cout, 1)\n")
    (root / "model" / "VeloxSeg.py").write_text(FAKE_MODEL)
    (root / "config").mkdir()
    cfg = {"UNet": {}, "VeloxSeg": {"input_size": [96, 96, 96], "in_ch": [1, 1], "n_classes": 2}}
    (root / "config" / "models_config_autopetii.json").write_text(json.dumps(cfg if config is None else config))
    return root


@pytest.fixture
def clean_model_modules():
    import sys

    yield
    for name in [n for n in sys.modules if n == "model" or n.startswith("model.")]:
        del sys.modules[name]


def test_reference_is_built_by_the_checkouts_own_code_and_config(tmp_path, clean_model_modules):
    import sys

    root = _fake_checkout(tmp_path / "VeloxSeg")
    figures = bench.count(bench.REFERENCE, reference=str(root))
    # one 1x1 conv 2 -> 2 with bias: 6 inference parameters; 2 * 2 MACs per voxel of the 96^3 patch
    assert figures["params_m"] == pytest.approx(6 / 1e6)
    assert figures["gmac"] == pytest.approx(2 * 2 * 96 ** 3 / 1e9)
    assert str(root) not in sys.path  # the checkout is on the path only while its code is imported
    speed = bench.worker_speed(bench.REFERENCE, threads=1, reps=2, reference=str(root))
    assert speed["best_s"] > 0 and speed["threads"] == 1


def test_reference_errors_name_the_folder_and_what_is_missing(tmp_path, clean_model_modules):
    from VeloxSegLib.errors import ConfigError

    with pytest.raises(ConfigError, match="no such folder"):
        bench.check_reference(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"not a checkout of github.com/JinPLu/VeloxSeg \(model/VeloxSeg.py"):
        bench.check_reference(tmp_path / "empty")
    root = _fake_checkout(tmp_path / "noentry", config={"UNet": {}})
    with pytest.raises(ConfigError, match="no usable \"VeloxSeg\" entry"):
        bench.build_reference(root)
    with pytest.raises(ConfigError, match="needs --reference DIR"):
        bench.make_model(bench.REFERENCE)


def test_reference_runs_in_the_same_rounds_and_every_model_gets_its_ratio(monkeypatch, tmp_path):
    calls = []
    times = {"monai-unet": 0.40, "veloxseg-b": 0.10, bench.REFERENCE: 0.25, "lightmedseg": 1.0}

    def worker(args):
        calls.append(args)
        if args[0] == "count":
            return {"params_m": 1.0, "gmac": 1.0}
        t = times[args[1]] / int(args[2]) * (1.4 if args[4] == "plain" else 1.0)
        return {"best_s": t, "median_s": t * (1.2 if args[1] == "veloxseg-b" else 1.0), "peak_rss_mb": 100.0}

    monkeypatch.setattr(bench, "run_worker", worker)
    rows = bench.patch_benchmark(["monai-unet", "veloxseg-b", "lightmedseg"], reps=3, progress=lambda m: None,
                                 rounds=3, bf16=False, reference="/checkout")
    # timed right after veloxseg-b (the machine drifts over a round), listed there too
    assert [r["model"] for r in rows] == ["monai-unet", "veloxseg-b", bench.REFERENCE, "lightmedseg"]
    # only the reference's workers get the checkout, and it runs inside every round
    assert all(c[-1] == "/checkout" for c in calls if c[1] == bench.REFERENCE)
    assert not any("/checkout" in c for c in calls if c[1] != bench.REFERENCE)
    speed_models = [c[1] for c in calls if c[0] == "speed"]
    assert speed_models[:6] == ["monai-unet"] * 2 + ["veloxseg-b"] * 3 + [bench.REFERENCE]
    assert speed_models.count(bench.REFERENCE) == 3 * 2
    unet, velox, ref, _ = rows
    assert velox["ratio_ref_1t"] == pytest.approx(0.25 / 0.10) and velox["ratio_ref_2t"] == pytest.approx(2.5)
    assert velox["ratio_ref_1t_median"] == pytest.approx(0.25 / 0.12)
    assert unet["ratio_ref_1t"] == pytest.approx(0.25 / 0.40) and ref["ratio_ref_1t"] == pytest.approx(1.0)
    assert ref["ratio_1t"] == pytest.approx(0.40 / 0.25)  # the authors' code against UNet, same run
    md = bench.render_markdown({"machine": {k: "x" for k in ("cpu", "cores", "memory_gib", "os", "python", "torch",
                                                             "date")}, "patch": rows,
                                "reference": {"commit": "a668623" + "0" * 33}})
    section = md.split("## Against the authors' implementation")[1]
    assert "commit a6686230000" in section
    row = next(line for line in section.splitlines() if line.startswith("| veloxseg-b |"))
    assert row == f"| veloxseg-b | 10.00 | 2.50 | {0.25 / 0.12:.2f} | 20.00 | 2.50 |"
    plain = bench.render_markdown({"machine": {k: "x" for k in ("cpu", "cores", "memory_gib", "os", "python",
                                                                "torch", "date")}, "patch": rows[:2]})
    assert "authors" not in plain  # without --reference the section is absent


def test_paired_timing_alternates_the_networks_in_one_process(monkeypatch):
    import torch

    order = []

    class Probe(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name
            self.conv = torch.nn.Conv3d(2, 2, 1)

        def forward(self, x):
            order.append(self.name)
            return self.conv(x)

    monkeypatch.setattr(bench, "PATCH", (8, 8, 8))
    monkeypatch.setattr(bench, "make_model", lambda name, fast=True, reference=None: Probe(name))
    times = bench.worker_paired(["veloxseg-b", "monai-unet"], threads=1, rounds=3)
    assert set(times) == {"veloxseg-b", "monai-unet"} and all(len(v) == 3 for v in times.values())
    assert all(t > 0 for v in times.values() for t in v)
    # one warm-up pass each, then per round 2 passes of each model in turn
    assert order == ["veloxseg-b", "monai-unet"] + ["veloxseg-b"] * 2 + ["monai-unet"] * 2 + \
        ["veloxseg-b"] * 2 + ["monai-unet"] * 2 + ["veloxseg-b"] * 2 + ["monai-unet"] * 2


def test_paired_ratios_are_per_round_and_reach_the_markdown(monkeypatch):
    # the machine slows down 2x in round 2 for everyone: per-round ratios do not move, best-time ratios do not either
    times = {"veloxseg-b": [0.20, 0.40, 0.25], "monai-unet": [0.80, 1.60, 0.90], bench.REFERENCE: [0.40, 0.80, 0.55]}
    calls = []
    monkeypatch.setattr(bench, "run_worker", lambda args: calls.append(args) or {n: times[n] for n in args[4:]})
    result = bench.paired_benchmark("/checkout", progress=lambda m: None, rounds=3)
    assert calls == [["paired", "1", "3", "/checkout", "veloxseg-b", "monai-unet", bench.REFERENCE]]
    by_pair = {(r["model"], r["against"]): r for r in result["ratios"]}
    unet = by_pair[("veloxseg-b", "monai-unet")]
    assert unet["median"] == pytest.approx(4.0) and unet["min"] == pytest.approx(3.6) and unet["max"] == pytest.approx(4.0)
    assert unet["best"] == pytest.approx(0.80 / 0.20) and unet["rounds"] == 3
    ref = by_pair[("veloxseg-b", bench.REFERENCE)]
    assert ref["median"] == pytest.approx(2.0) and ref["min"] == pytest.approx(2.0) and ref["max"] == pytest.approx(2.2)
    assert by_pair[(bench.REFERENCE, "monai-unet")]["median"] == pytest.approx(0.80 / 0.40)
    md = bench.render_markdown({"machine": {k: "x" for k in ("cpu", "cores", "memory_gib", "os", "python", "torch",
                                                             "date")}, "patch": [], "paired": result})
    section = md.split("## Paired timing (one process, alternating)")[1]
    assert f"| veloxseg-b | {bench.REFERENCE} | 2.00 | 2.00 | 2.20 | 2.00 |" in section
    without = bench.paired_benchmark(None, progress=lambda m: None, rounds=3)
    assert calls[-1] == ["paired", "1", "3", "-", "veloxseg-b", "monai-unet"]
    assert [(r["model"], r["against"]) for r in without["ratios"]] == [("veloxseg-b", "monai-unet")]
