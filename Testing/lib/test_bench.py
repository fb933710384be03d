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
