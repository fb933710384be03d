"""Benchmarks behind ``veloxseg bench`` / ``make bench`` (never timed unit tests).

Each measurement runs in a fresh worker process (``python -m VeloxSegLib.bench --worker ...``) so
thread settings and peak resident memory are clean; speed is reported next to MONAI peers measured
in the same run, as ratios (the machines are noisy).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

from .model.peers import PEERS, build_peer

if TYPE_CHECKING:  # torch is imported where it is used
    import torch

PATCH = (96, 96, 96)
IN_CHANNELS = 2

# name -> description; VeloxSeg presets use PET/CT cross-modal attention (in_channels (1, 1)).
MODELS = {
    "veloxseg-s": "VeloxSeg S (kernels {3})",
    "veloxseg-b": "VeloxSeg B (paper default)",
    "veloxseg-b+": "VeloxSeg B+ (widths 32)",
    "veloxseg-l": "VeloxSeg L (depth 2)",
    "lightmedseg": "LightMedSeg (our in-house peer)",
    **PEERS,  # the MONAI peers, as model/peers.py builds them
}
PEER = "monai-unet"
#: The authors' published implementation, timed when ``veloxseg bench --reference DIR`` points at a
#: checkout of https://github.com/JinPLu/VeloxSeg (never shipped or downloaded by us; see
#: :func:`build_reference`). Issue #2's goal is stated against it.
REFERENCE = "authors-veloxseg-b"
REFERENCE_CONFIG = ("config", "models_config_autopetii.json")
#: Models also timed in the opt-in CPU bfloat16 precision (1 thread), the peer included.
BF16_MODELS = ("veloxseg-b", "veloxseg-s", PEER)


def check_reference(checkout) -> Path:
    """The resolved folder of a checkout of the authors' repository, or a ConfigError that names
    the file it lacks (checked before any benchmark starts)."""
    from .errors import ConfigError

    root = Path(checkout).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError(f"--reference '{checkout}': no such folder (expected a checkout of "
                          f"github.com/JinPLu/VeloxSeg)")
    for needed in (Path("model", "VeloxSeg.py"), Path(*REFERENCE_CONFIG)):
        if not (root / needed).is_file():
            raise ConfigError(f"--reference '{checkout}': not a checkout of github.com/JinPLu/VeloxSeg "
                              f"({needed} is missing)")
    return root


def reference_revision(checkout) -> str:
    """The checkout's git commit (``git rev-parse HEAD``), or "unknown" without git."""
    try:
        proc = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "unknown"


def build_reference(checkout) -> "torch.nn.Module":
    """The authors' VeloxSeg-B for AutoPET-II (PET/CT, 2 classes, 96^3), built by that checkout's
    own code (``model/VeloxSeg.py``) with its own configuration (``config/models_config_autopetii.json``,
    entry "VeloxSeg"). This imports and runs the repository's Python code, so point it only at a
    checkout you trust. It needs what that code imports (torch, einops and MONAI, all in our
    ``bench`` extra). A folder that is not such a checkout is a ConfigError naming what is missing."""
    import importlib

    from .errors import ConfigError

    root = check_reference(checkout)
    config_path = root.joinpath(*REFERENCE_CONFIG)
    try:
        config = json.loads(config_path.read_text())["VeloxSeg"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"'{config_path}': no usable \"VeloxSeg\" entry ({exc!r})") from None
    loaded = sys.modules.get("model")
    if loaded is not None and not str(getattr(loaded, "__file__", "") or "").startswith(str(root)):
        raise ConfigError(f"--reference '{checkout}': another module named 'model' is already imported "
                          f"({getattr(loaded, '__file__', loaded)})")
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module("model.VeloxSeg")
    except ImportError as exc:
        raise ConfigError(f"--reference '{checkout}': its model code does not import here ({exc}); "
                          f"it needs torch, einops and monai (pip install -e '.[bench]')") from None
    finally:
        sys.path.remove(str(root))
    return module.VeloxSeg(**config)


def make_model(name: str, fast: bool = True, reference: Optional[str] = None):
    import torch  # noqa: F401

    if name == REFERENCE:
        if not reference:
            from .errors import ConfigError

            raise ConfigError(f"'{REFERENCE}' needs --reference DIR (a checkout of github.com/JinPLu/VeloxSeg)")
        return build_reference(reference)
    if name.startswith("monai-"):
        return build_peer(name, in_channels=(IN_CHANNELS,), num_classes=2, patch_size=PATCH)
    from .model import build_model, set_fast_path

    in_ch = (1, 1)
    kwargs = {"with_teachers": False} if name.startswith("veloxseg") else {}
    model = build_model(name, in_channels=in_ch, num_classes=2, patch_size=PATCH, **kwargs)
    return set_fast_path(model, fast)


def count(name: str, reference: Optional[str] = None) -> Dict[str, float]:
    """Inference parameters (receiving a gradient from the eval output) and GMAC (FLOPs / 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = make_model(name, fast=False, reference=reference).eval()
    x = torch.randn(1, IN_CHANNELS, *PATCH)
    model(x).sum().backward()
    params = sum(p.numel() for p in model.parameters() if p.grad is not None)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return {"params_m": params / 1e6, "gmac": counter.get_total_flops() / 2e9}


def worker_speed(name: str, threads: int, reps: int, fast: bool = True, bf16: bool = False,
                 reference: Optional[str] = None) -> Dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = make_model(name, fast=fast, reference=reference).eval()
    x = torch.randn(1, IN_CHANNELS, *PATCH)
    if bf16:  # the opt-in CPU bfloat16 path (``veloxseg predict --precision bf16``)
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    base_rss = _rss_mb()
    times = []
    with torch.inference_mode():
        model(x)  # warm-up (allocator, oneDNN primitives)
        peak = _peak_rss_mb()
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"best_s": times[0], "median_s": times[len(times) // 2], "peak_rss_mb": peak,
            "base_rss_mb": base_rss, "threads": threads}


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return float("nan")


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024


def run_worker(args: List[str], timeout: float = 1800) -> dict:
    cmd = [sys.executable, "-m", "VeloxSegLib.bench", "--worker", *args]
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> Dict[str, str]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        mem = float("nan")
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory_gib": f"{mem:.0f}",
            "python": platform.python_version(), "torch": torch.__version__,
            "os": f"{platform.system()} {platform.release()}",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def patch_benchmark(models: List[str], reps: int, progress=print, rounds: int = 3,
                    bf16: Optional[bool] = None, reference: Optional[str] = None) -> List[dict]:
    """Parameters, MACs and patches/s of every model. The timed repetitions are spread over
    ``rounds`` rounds in which every model runs in turn, and the best time over all rounds
    counts: slow spells of a shared machine then fall on all models alike instead of on the one
    that happened to run during them (ratios against the peer are what the table is for).
    ``bf16`` (default: when the CPU runs bfloat16 natively) adds 1-thread bf16 runs of
    :data:`BF16_MODELS`. ``reference``: a checkout of the authors' repository; their network
    (:data:`REFERENCE`) then runs in the same rounds, and every model gets ratios against it too."""
    if reference and REFERENCE not in models:
        # timed right after our veloxseg-b in every round: the machine's speed drifts over the
        # minutes a round takes, and the two are the pair whose ratio matters
        at = models.index("veloxseg-b") + 1 if "veloxseg-b" in models else len(models)
        models = list(models[:at]) + [REFERENCE] + list(models[at:])
    if bf16 is None:
        from .infer.device import cpu_has_native_bf16

        bf16 = cpu_has_native_bf16()
    rows = {}
    for name in models:
        progress(f"[bench] {name}: counting")
        ref_arg = [reference] if name == REFERENCE else []
        rows[name] = {"model": name, "description": MODELS.get(name, name),
                      **run_worker(["count", name] + ref_arg)}
    best: Dict[tuple, float] = {}
    medians: Dict[tuple, list] = {}
    for rnd in range(rounds):
        for name in models:
            slow = name in ("monai-swinunetr", "monai-segresnet")
            n = max(1, -(-(max(2, reps // 4) if slow else reps) // rounds))
            rows[name]["timed_reps"] = n * rounds
            runs = [(t, "fast") for t in (1, 2)] + ([(1, "plain")] if name.startswith("veloxseg") else [])
            if bf16 and name in BF16_MODELS:
                runs.append((1, "bf16"))
            for threads, path in runs:
                extra = {"plain": " (plain path)", "bf16": " (bf16)"}.get(path, "")
                progress(f"[bench] round {rnd + 1}/{rounds} {name}: {threads} thread(s){extra}")
                r = run_worker(["speed", name, str(threads), str(n), path]
                               + ([reference] if name == REFERENCE else []))
                key = (name, threads, path)
                best[key] = min(best.get(key, float("inf")), r["best_s"])
                medians.setdefault(key, []).append(r["median_s"])
                rows[name]["peak_rss_mb"] = max(rows[name].get("peak_rss_mb", 0.0), r["peak_rss_mb"])
    for (name, threads, path), t in best.items():
        if path in ("plain", "bf16"):
            rows[name][f"pps_1t_{path}"] = 1.0 / t
        else:
            rows[name][f"pps_{threads}t"] = 1.0 / t
            ms = sorted(medians[(name, threads, path)])
            rows[name][f"median_s_{threads}t"] = ms[len(ms) // 2]
    out = [rows[name] for name in models]
    peer, ref = rows.get(PEER), rows.get(REFERENCE)
    for r in out:
        if peer:
            r["ratio_1t"] = r["pps_1t"] / peer["pps_1t"]
            r["ratio_2t"] = r["pps_2t"] / peer["pps_2t"]
            r["ratio_1t_median"] = peer["median_s_1t"] / r["median_s_1t"]
        if ref:
            r["ratio_ref_1t"] = r["pps_1t"] / ref["pps_1t"]
            r["ratio_ref_2t"] = r["pps_2t"] / ref["pps_2t"]
            r["ratio_ref_1t_median"] = ref["median_s_1t"] / r["median_s_1t"]
    return out


def worker_paired(names: List[str], threads: int, rounds: int, reference: Optional[str] = None,
                  passes: int = 2) -> Dict[str, List[float]]:
    """Every model of ``names`` in one process, alternating: each round runs ``passes`` forward
    passes of each model in turn and keeps each model's fastest. Returns the per-round seconds of
    every model. Models measured seconds apart share more of the machine's speed of the moment,
    which a shared machine changes by tens of percent over minutes (see :func:`paired_summary`)."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    models = {name: make_model(name, reference=reference).eval() for name in names}
    x = torch.randn(1, IN_CHANNELS, *PATCH)
    times: Dict[str, List[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for model in models.values():
            model(x)  # warm-up
        for _ in range(rounds):
            for name, model in models.items():
                best = float("inf")
                for _ in range(passes):
                    t0 = time.perf_counter()
                    model(x)
                    best = min(best, time.perf_counter() - t0)
                times[name].append(best)
    return times


def paired_summary(times: Dict[str, List[float]]) -> List[dict]:
    """Speed ratios of veloxseg-b against each other model (and of the authors' code against the
    peer) from :func:`worker_paired`'s rounds: the median, lowest and highest of the per-round
    ratios, and the ratio of the best times."""
    import statistics

    pairs = [("veloxseg-b", other) for other in times if other != "veloxseg-b"]
    if REFERENCE in times and PEER in times:
        pairs.append((REFERENCE, PEER))
    out = []
    for fast, slow in pairs:
        if fast not in times:
            continue
        ratios = [b / a for a, b in zip(times[fast], times[slow])]
        out.append({"model": fast, "against": slow, "rounds": len(ratios), "median": statistics.median(ratios),
                    "min": min(ratios), "max": max(ratios), "best": min(times[slow]) / min(times[fast])})
    return out


def paired_benchmark(reference: Optional[str], progress=print, rounds: int = 15, threads: int = 1) -> dict:
    """veloxseg-b, MONAI UNet and (with ``reference``) the authors' code alternating in one
    worker process at ``threads`` thread(s), for ratios of passes made seconds apart."""
    names = ["veloxseg-b", PEER] + ([REFERENCE] if reference else [])
    progress(f"[bench] paired timing: {', '.join(names)}, {rounds} rounds, {threads} thread(s)")
    times = run_worker(["paired", str(threads), str(rounds), reference or "-"] + names)
    return {"threads": threads, "rounds": rounds, "times": times, "ratios": paired_summary(times)}


def _pipeline_sections(sections, progress) -> Dict[str, dict]:
    """Whole-body inference (issue: <= 8 s, <= 1 GB) and training-step speed, each vs MONAI UNet; the
    preprocessed folder compressed against ``.npy``; fine-tuning to a target Dice."""
    out = {}
    if sections is None or "wholebody" in sections:
        from .infer import bench_wholebody

        progress("[bench] whole-body PET/CT through `veloxseg predict`")
        out["wholebody"] = bench_wholebody.run(progress=progress)
    if sections is None or "training" in sections:
        from .train.trainer import training_benchmark

        progress("[bench] training step")
        out["training"] = training_benchmark(progress=progress)
    if sections is None or "store" in sections:
        from .train.cache import store_benchmark

        out["store"] = store_benchmark(progress=progress)
    if sections is None or "finetune" in sections:
        from .train.finetune import finetune_benchmark

        progress("[bench] fine-tuning petct-lesion-demo on 5 phantoms")
        out["finetune"] = finetune_benchmark(progress=progress)
    return out


def render_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`veloxseg bench`); do not edit by hand. Each figure comes from a fresh",
        "worker process; patches/s is the best of the timed repetitions (column \"reps\", per thread count)",
        "of one 96^3 patch with 2 input channels (PET/CT; VeloxSeg with cross-modal attention, in_channels",
        "(1, 1)), batch 1, eval mode, `torch.inference_mode`. The repetitions are spread over 3 rounds in",
        "which every model runs in turn, so slow spells of the (shared) machine fall on all models alike.",
        "Ratios are against MONAI UNet measured in the same run; \"x UNet (medians)\" compares the median",
        "round times instead of the best ones (memory-bound networks lose more than UNet in slow spells).",
        "Workers run with the `veloxseg` command's malloc settings (`keep_freed_memory`, docs/inference.md),",
        "every model alike.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['os']}; Python {m['python']}, "
        f"torch {m['torch']}; {m['date']}.",
        "",
        "## Network speed and size (96^3 patch, CPU)",
        "",
        "| model | params (M) | GMAC | patches/s 1 thread | x UNet | x UNet (medians) | patches/s 2 threads | "
        "x UNet | peak RSS (MB) | plain path patches/s 1t | reps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for r in result["patch"]:
        plain = f"{r['pps_1t_plain']:.2f}" if "pps_1t_plain" in r else "-"
        lines.append(
            f"| {r['model']} | {r['params_m']:.3f} | {r['gmac']:.3f} | {r['pps_1t']:.2f} | "
            f"{r.get('ratio_1t', nan):.2f} | {r.get('ratio_1t_median', nan):.2f} | {r['pps_2t']:.2f} | "
            f"{r.get('ratio_2t', nan):.2f} | {r['peak_rss_mb']:.0f} | {plain} | {r.get('timed_reps', '-')} |")
    lines += [
        "",
        "Params: parameters that receive a gradient from the eval-mode output (VeloxSeg's training-only",
        "texture teachers and deep-supervision heads excluded). GMAC: `torch.utils.flop_counter` FLOPs / 2",
        "on the plain path. Peak RSS: the worker process's peak resident memory after one inference.",
        "\"plain path\" is the straightforward module code (the reference's structure); the default fast",
        "path computes the same function (tests compare them to 1e-4).",
    ]
    ref = next((r for r in result["patch"] if r["model"] == REFERENCE), None)
    if ref:
        info = result.get("reference", {})
        commit = info.get("commit", "unknown")
        lines += [
            "", "## Against the authors' implementation", "",
            f"`{REFERENCE}` is the authors' own code (github.com/JinPLu/VeloxSeg, commit {commit[:12]}), "
            "built from that checkout",
            "(`veloxseg bench --reference DIR`) with its AutoPET-II configuration (VeloxSeg-B, PET/CT, 96^3) and",
            "timed in the same rounds as the rows above. Issue #2 asks for at least 2x its speed at 1 thread.",
            "", "| model | patches/s 1 thread | x authors' | x authors' (medians) | patches/s 2 threads | x authors' |",
            "|---|---|---|---|---|---|",
        ]
        for r in result["patch"]:
            lines.append(f"| {r['model']} | {r['pps_1t']:.2f} | {r['ratio_ref_1t']:.2f} | "
                         f"{r['ratio_ref_1t_median']:.2f} | {r['pps_2t']:.2f} | {r['ratio_ref_2t']:.2f} |")
    paired = result.get("paired")
    if paired and paired.get("ratios"):
        lines += [
            "", "## Paired timing (one process, alternating)", "",
            f"The networks below in one worker process at {paired['threads']} thread(s), taking turns: each of "
            f"{paired['rounds']} rounds runs",
            "2 forward passes of each and keeps each one's faster pass, so every per-round ratio compares passes",
            "made seconds apart, where the table above compares best times taken minutes apart (the machine's",
            "speed drifts by tens of percent over minutes; the lowest and highest per-round ratios show how",
            "much it still moves within seconds).", "",
            "| model | against | per-round speed ratio, median | lowest | highest | ratio of best times |",
            "|---|---|---|---|---|---|",
        ]
        for r in paired["ratios"]:
            lines.append(f"| {r['model']} | {r['against']} | {r['median']:.2f} | {r['min']:.2f} | {r['max']:.2f} | "
                         f"{r['best']:.2f} |")
    bf16_rows = [r for r in result["patch"] if "pps_1t_bf16" in r]
    peer = next((r for r in result["patch"] if r["model"] == PEER), None)
    if bf16_rows and peer and "pps_1t_bf16" in peer:
        lines += [
            "", "## Opt-in bfloat16 on the CPU (`veloxseg predict --precision bf16`)", "",
            "Weights and activations in bfloat16 (oneDNN's native bf16 on CPUs with AVX512-BF16 or AMX), 1 thread,",
            "same rounds as above. Not the default: logits are rounded to bf16 (docs/inference.md has the effect",
            "on held-out Dice).", "",
            "| model | patches/s fp32 | patches/s bf16 | bf16 speed-up | bf16 x UNet fp32 | bf16 x UNet bf16 |",
            "|---|---|---|---|---|---|",
        ]
        for r in bf16_rows:
            lines.append(f"| {r['model']} | {r['pps_1t']:.2f} | {r['pps_1t_bf16']:.2f} | "
                         f"{r['pps_1t_bf16'] / r['pps_1t']:.2f} | {r['pps_1t_bf16'] / peer['pps_1t']:.2f} | "
                         f"{r['pps_1t_bf16'] / peer['pps_1t_bf16']:.2f} |")
    for key, title in (("wholebody", "Whole-body PET/CT inference"), ("training", "Training speed"),
                       ("store", "Preprocessed folder: `.npy` against compressed"), ("finetune", "Fine-tuning on 5 cases to Dice 0.7 on 3 held-out ones")):
        sec = result.get(key)
        if sec and sec.get("markdown"):
            lines += ["", f"## {title}", "", sec["markdown"]]
    for data in result.get("comparisons") or []:
        from .commands.compare import render_markdown as comparison_table

        on = f" on {data['heldout']}" if data.get("heldout") else ""
        lines += ["", f"## Same-budget training comparison{on}", "", comparison_table(data)]
    return "\n".join(lines) + "\n"


def load_comparisons(folder: Path) -> List[dict]:
    """The ``veloxseg compare`` results kept next to docs/benchmarks.md (training-comparison*.json):
    the trainings take an hour or more on a CPU, so ``make bench`` reuses them instead of re-running."""
    out = []
    for path in sorted(folder.glob("training-comparison*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            from .errors import InputError

            raise InputError(f"'{path}': not a readable comparison ({exc})") from None
    return out


def write_page(result: dict, output) -> None:
    """Write ``result`` as the markdown page ``output`` and its figures as ``output`` with the
    ending .json, each to a temporary sibling renamed into place."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_markdown(result))
    os.replace(tmp, path)
    json_path = path.with_suffix(".json")
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, json_path)


def render_saved(output) -> dict:
    """Rebuild the page ``output`` from the figures saved next to it (``output`` with the ending
    .json, written by an earlier run) and the saved comparisons (training-comparison*.json), as
    they are now: nothing is measured. Returns the result. Raises InputError without saved figures."""
    from .errors import InputError

    path = Path(output)
    json_path = path.with_suffix(".json")
    try:
        result = json.loads(json_path.read_text())
        if not isinstance(result, dict) or "machine" not in result:
            raise ValueError("no 'machine' entry")
    except (OSError, ValueError) as exc:
        raise InputError(f"'{json_path}': no saved benchmark figures to render ({exc}); run 'make bench' "
                         f"first") from None
    result["comparisons"] = load_comparisons(path.parent)
    write_page(result, path)
    return result


def run(models: Optional[List[str]] = None, reps: int = 24, output: Optional[str] = None,
        as_json: bool = False, sections: Optional[List[str]] = None, progress=None,
        reference: Optional[str] = None) -> dict:
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    models = models or list(MODELS)
    if PEER not in models:
        models = [PEER] + models
    result = {"machine": machine()}
    if reference:
        root = check_reference(reference)
        result["reference"] = {"path": str(root), "commit": reference_revision(root),
                               "source": "https://github.com/JinPLu/VeloxSeg"}
        reference = str(root)
    result["patch"] = patch_benchmark(models, reps, progress, reference=reference)
    if "veloxseg-b" in models:
        result["paired"] = paired_benchmark(reference, progress)
    result.update(_pipeline_sections(sections, progress))
    if output:
        result["comparisons"] = load_comparisons(Path(output).parent)
        write_page(result, output)
    return result


def _worker_main(argv: List[str]) -> None:
    from .infer.device import keep_freed_memory

    keep_freed_memory()  # the allocator settings of the ``veloxseg`` command, for every model alike
    kind, name = argv[0], argv[1]
    if kind == "paired":  # paired THREADS ROUNDS REFERENCE|- NAME...
        reference = None if argv[3] == "-" else argv[3]
        print(json.dumps(worker_paired(argv[4:], int(argv[1]), int(argv[2]), reference=reference)))
    elif kind == "count":
        print(json.dumps(count(name, reference=argv[2] if len(argv) > 2 else None)))
    elif kind == "speed":
        option = argv[4] if len(argv) > 4 else "fast"
        print(json.dumps(worker_speed(name, int(argv[2]), int(argv[3]), fast=option != "plain",
                                      bf16=option == "bf16", reference=argv[5] if len(argv) > 5 else None)))
    else:
        raise SystemExit(f"unknown worker kind {kind}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs="+", required=True)
    _worker_main(parser.parse_args().worker)
