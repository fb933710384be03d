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
        return {"best_s": t, "median_s": t * 1.1, "peak_rss_mb": 100.0 + rnd}

    monkeypatch.setattr(bench, "run_worker", worker)
    rows = bench.patch_benchmark(["monai-unet", "veloxseg-b"], reps=6, progress=lambda m: None, rounds=3)
    unet, velox = rows
    # the models alternate: every round runs both before the next round starts
    assert [c[0] for c in calls[:5]] == ["monai-unet", "monai-unet", "veloxseg-b", "veloxseg-b", "veloxseg-b"]
    assert len(calls) == 3 * (2 + 3)
    assert unet["pps_1t"] == pytest.approx(1 / 0.4) and velox["pps_1t"] == pytest.approx(1 / 0.07)
    assert velox["ratio_1t"] == pytest.approx(0.4 / 0.07) and velox["ratio_2t"] == pytest.approx(0.4 / 0.07)
    assert velox["pps_1t_plain"] == pytest.approx(1 / 0.105)
    assert velox["peak_rss_mb"] == 103.0 and "pps_1t_plain" not in unet
