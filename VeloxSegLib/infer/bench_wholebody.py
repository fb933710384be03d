"""Whole-body PET/CT benchmark of ``veloxseg predict`` (end to end, in a subprocess).

Synthesizes a 400 x 400 x 326 PET/CT at 2.04 x 2.04 x 3 mm (a body with head, torso, lungs,
spine and legs surrounded by realistic air, a patient table, PET uptake with hot lesions),
saves a bundle with the requested network (random weights: speed does not depend on them),
runs ``python -m VeloxSegLib.cli predict`` with N CPU threads and measures wall time and peak
resident memory of that process (``os.wait4``'s ``ru_maxrss``, with psutil sampling as a
fallback on Windows). Optionally times one single-thread MONAI UNet 96^3 forward pass in the same run,
the unit the issue compares against.

    python -m VeloxSegLib.infer.bench_wholebody --threads 2 [--workdir DIR] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

WHOLEBODY_SHAPE = (400, 400, 326)  # x, y, z voxels
WHOLEBODY_SPACING = (2.04, 2.04, 3.0)
BUNDLE_SPACING = (2.0364, 2.0364, 3.0)


def synthesize_wholebody(folder, shape=WHOLEBODY_SHAPE, spacing=WHOLEBODY_SPACING, seed: int = 0):
    """Write ``ct.nii.gz`` (int16 HU) and ``pet.nii.gz`` (float32 SUV) into ``folder``.

    Returns (ct_path, pet_path). Geometry: LPS, origin so the volume is centred in x/y.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = shape
    rng = np.random.default_rng(seed)
    ct = np.empty((nz, ny, nx), dtype=np.int16)
    pet = np.zeros((nz, ny, nx), dtype=np.float32)
    yy, xx = np.mgrid[:ny, :nx].astype(np.float32)
    cx, cy = nx / 2.0, ny / 2.0 - 10
    sx, sy = spacing[0], spacing[1]

    def ellipse(x0, y0, ax_mm, ay_mm):
        return ((xx - x0) * sx / ax_mm) ** 2 + ((yy - y0) * sy / ay_mm) ** 2 <= 1.0

    table = (np.abs(yy - (cy + 135 / sy)) <= 4) & (np.abs(xx - cx) <= 230 / sx)
    lesions = [(int(nz * f), cx + dx / sx, cy + dy / sy) for f, dx, dy in
               [(0.72, 40, -20), (0.62, -60, 10), (0.55, 20, 30), (0.35, -45, 0)]]
    for z in range(nz):
        f = z / max(nz - 1, 1)  # 0 = feet, 1 = head
        sl = rng.normal(-1000, 15, size=(ny, nx)).astype(np.float32)  # air with scanner noise
        up = np.zeros((ny, nx), dtype=np.float32)
        if f > 0.88:  # head
            body = ellipse(cx, cy, 80, 95)
            up[body] = 1.0
            up[ellipse(cx, cy, 70, 85)] = 8.0  # brain
        elif f > 0.45:  # torso
            body = ellipse(cx, cy, 175, 115)
            up[body] = 1.0
            if f > 0.62:  # lungs
                lungs = ellipse(cx - 70 / sx, cy - 5, 55, 75) | ellipse(cx + 70 / sx, cy - 5, 55, 75)
                sl[lungs] = -820
                up[lungs] = 0.3
        elif f > 0.40:  # pelvis + bladder
            body = ellipse(cx, cy, 165, 110)
            up[body] = 1.0
            up[ellipse(cx, cy - 20 / sy, 35, 30)] = 15.0
        else:  # legs
            body = ellipse(cx - 55 / sx, cy, 60, 65) | ellipse(cx + 55 / sx, cy, 60, 65)
            up[body] = 0.8
        soft = rng.normal(40, 20, size=(ny, nx)).astype(np.float32)
        sl = np.where(body & (sl > -900), soft, sl)
        if 0.40 < f <= 0.88:
            spine = ellipse(cx, cy + 60 / sy, 18, 18)
            sl[spine] = 450
        sl[table] = 200
        ct[z] = np.clip(sl, -1024, 3071).astype(np.int16)
        for lz, lx, ly in lesions:
            if abs(z - lz) <= 3:
                up[ellipse(lx, ly, 9, 9)] = 10.0
        up[body] *= rng.gamma(20.0, 1 / 20.0, size=int(body.sum())).astype(np.float32)
        pet[z] = up
    origin = (-nx * sx / 2.0, -ny * sy / 2.0, -nz * spacing[2])
    paths = []
    for name, arr in (("ct", ct), ("pet", pet)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(tuple(float(s) for s in spacing))
        img.SetOrigin(origin)
        p = folder / f"{name}.nii.gz"
        sitk.WriteImage(img, str(p), True)
        paths.append(p)
    return tuple(paths)


def make_bench_bundle(folder, model: str = "veloxseg-b", patch_size=(96, 96, 96), spacing=BUNDLE_SPACING,
                      overrides: Optional[dict] = None, seed: int = 0) -> Path:
    """Save a PET/CT lesion bundle with freshly initialised weights (speed test only)."""
    import torch

    from .. import build_model
    from ..bundle import save_bundle

    torch.manual_seed(seed)
    net = build_model(model, in_channels=(1, 1), num_classes=2, patch_size=tuple(patch_size), **(overrides or {}))
    meta = {
        "format_version": 1, "name": "bench-wholebody",
        "description": "random weights, for speed measurement only",
        "model": {"name": model, "in_channels": [1, 1], "num_classes": 2, "patch_size": list(patch_size),
                  "overrides": dict(overrides or {})},
        "spacing": list(spacing),
        "channels": [
            {"name": "CT", "modality": "CT",
             "normalization": {"scheme": "ct", "clip": [-1000.0, 600.0], "mean": 40.0, "std": 200.0}},
            {"name": "PET", "modality": "PET", "normalization": {"scheme": "pet_zscore_body"}}],
        "labels": [{"value": 0, "name": "background"}, {"value": 1, "name": "lesion", "color": [230, 80, 60]}],
        "inference": {"overlap": 0.25, "blending": "uniform", "tta": False, "min_component_mm3": 0.0,
                      "crop_to_body": True},
    }
    out = Path(folder) / "bench-bundle"
    return save_bundle(out, meta, net.state_dict(), overwrite=out.exists())


#: ``python -c HWM_WRAPPER ARGS...`` runs ``veloxseg ARGS...`` and prints the process's own peak
#: resident memory (VmHWM, kB) on stderr at exit, after :data:`HWM_PREFIX`; :func:`split_hwm` reads it
HWM_PREFIX = "VELOXSEG_VMHWM_KB="
HWM_WRAPPER = (
    "import runpy, sys\n"
    "sys.argv = ['veloxseg'] + sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_module('VeloxSegLib.cli', run_name='__main__')\n"
    "finally:\n"
    "    hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
    f"    print({HWM_PREFIX!r} + (hwm[0] if hwm else '0'), file=sys.stderr, flush=True)\n"
)


def veloxseg_runner(python: str = sys.executable) -> list:
    """The command line that runs ``veloxseg``: under :data:`HWM_WRAPPER` on Linux (where
    ``/proc/self/status`` has VmHWM), plainly elsewhere."""
    return [python, "-c", HWM_WRAPPER] if sys.platform.startswith("linux") else [python, "-m", "VeloxSegLib.cli"]


def veloxseg_env(threads: int) -> Dict[str, str]:
    """The environment of a benchmarked ``veloxseg`` child: ours, with the repository importable
    and OpenMP/MKL limited to ``threads``."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


def split_hwm(stderr: str) -> Tuple[Optional[float], str]:
    """``(peak RSS in MB or None, stderr without the line)`` from a :data:`HWM_WRAPPER` run."""
    lines = stderr.splitlines()
    hwm = [line for line in lines if line.startswith(HWM_PREFIX)]
    if not hwm:
        return None, stderr
    return int(hwm[-1][len(HWM_PREFIX):]) / 1024.0, "\n".join(line for line in lines if not line.startswith(HWM_PREFIX))


def run_predict(bundle, inputs: Sequence, output, *, threads: int = 2, extra: Sequence[str] = (),
                python: str = sys.executable) -> Dict:
    """Run ``veloxseg predict`` in a subprocess; returns seconds, peak RSS (MB), events, rc."""
    root = Path(__file__).resolve().parents[2]
    # On Linux the command runs under a two-line wrapper that prints the process's own VmHWM at exit:
    # ru_maxrss from wait4 would also count the benchmark parent's pages that fork() duplicated.
    runner = veloxseg_runner(python)
    cmd = [*runner, "predict", "-m", str(bundle), "-i", *map(str, inputs), "-o", str(output),
           "--threads", str(threads), "--progress", "json", "--overwrite", *extra]
    env = veloxseg_env(threads)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(root))
    out_chunks, err_chunks = [], []
    import threading

    readers = [threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True),
               threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)]
    for r in readers:
        r.start()
    ru_maxrss_kb = None
    cpu_s = None
    peak_poll = 0
    if hasattr(os, "wait4"):
        # exact peak RSS of the child from the kernel; no polling. (Polling psutil's
        # memory_info() every few ms takes the child's mmap lock and slowed it 5x here.)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        ru_maxrss_kb = usage.ru_maxrss
        cpu_s = usage.ru_utime + usage.ru_stime
    else:  # pragma: no cover - Windows: sample at 5 Hz
        try:
            import psutil

            ps = psutil.Process(proc.pid)
        except Exception:
            ps = None
        while proc.poll() is None:
            if ps is not None:
                try:
                    peak_poll = max(peak_poll, ps.memory_info().peak_wset)
                except Exception:
                    pass
            time.sleep(0.2)
    seconds = time.perf_counter() - t0
    for r in readers:
        r.join(5)
    stdout = (out_chunks[0] if out_chunks else b"").decode("utf-8", "replace")
    stderr = (err_chunks[0] if err_chunks else b"").decode("utf-8", "replace")
    events = []
    for line in stdout.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    stage_start: Dict[str, float] = {}
    for e in events:
        stage_start.setdefault(e["stage"], e["elapsed"])
    done = events[-1] if events and events[-1].get("stage") == "done" else {}
    peak_mb, stderr = split_hwm(stderr)
    if peak_mb is None and ru_maxrss_kb:
        peak_mb = ru_maxrss_kb / (2 ** 20 if sys.platform == "darwin" else 1024.0)  # macOS: bytes
    elif peak_mb is None:
        peak_mb = peak_poll / 2 ** 20
    return {"returncode": proc.returncode, "seconds": seconds, "peak_rss_mb": peak_mb, "cpu_seconds": cpu_s,
            "windows_run": done.get("windows"),
            "windows_total": done.get("windows_total"), "stage_start_s": stage_start,
            "stderr_tail": stderr[-2000:]}


def monai_unet_forward_seconds(patch: int = 96, threads: int = 1, repeats: int = 2) -> Optional[float]:
    """Best-of-N time of one MONAI UNet (16-256 channels, 2 residual units) forward on a
    (1, 2, patch^3) input with ``threads`` CPU threads; None when MONAI is missing."""
    try:
        from monai.networks.nets import UNet
    except ImportError:
        return None
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        net = UNet(spatial_dims=3, in_channels=2, out_channels=2, channels=(16, 32, 64, 128, 256),
                   strides=(2, 2, 2, 2), num_res_units=2).eval()
        x = torch.randn(1, 2, patch, patch, patch)
        best = float("inf")
        with torch.inference_mode():
            for _ in range(repeats):
                t = time.perf_counter()
                net(x)
                best = min(best, time.perf_counter() - t)
        return best
    finally:
        torch.set_num_threads(old)


def benchmark_wholebody(workdir=None, *, threads: int = 2, model: str = "veloxseg-b", patch_size=(96, 96, 96),
                        overrides: Optional[dict] = None, extra: Sequence[str] = (), monai_reference: bool = True,
                        shape=WHOLEBODY_SHAPE, spacing=WHOLEBODY_SPACING) -> Dict:
    """Synthesize the whole-body case (once per workdir), run ``veloxseg predict`` on it and
    return a dict: seconds, peak_rss_mb, windows, and (if MONAI is installed) the time of one
    single-thread MONAI UNet 96^3 forward pass and our time in those units."""
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="veloxseg-bench-")
        workdir = tmp.name
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        ct, pet = work / "ct.nii.gz", work / "pet.nii.gz"
        if not (ct.exists() and pet.exists()):
            synthesize_wholebody(work, shape=shape, spacing=spacing)
        bundle = make_bench_bundle(work, model=model, patch_size=patch_size, overrides=overrides)
        result = run_predict(bundle, [ct, pet], work / "seg.nii.gz", threads=threads, extra=extra)
        result.update(model=model, patch_size=list(patch_size), threads=threads, shape=list(shape),
                      spacing=list(spacing))
        if monai_reference:
            unit = monai_unet_forward_seconds(patch=96, threads=1)
            result["monai_unet_forward_s"] = unit
            result["monai_unet_forwards"] = (result["seconds"] / unit) if unit else None
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def _unit_in_child() -> Optional[float]:
    """The MONAI UNet unit, timed in its own process: timing it here would leave this process large,
    and a child forked from it reports the parent's resident pages in ``ru_maxrss``."""
    code = ("from VeloxSegLib.infer.bench_wholebody import monai_unet_forward_seconds as f; "
            "import json; print(json.dumps(f(patch=96, threads=1)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(progress=None, *, threads: int = 2, repeats: int = 3, workdir=None, model: str = "veloxseg-b",
        patch_size=(96, 96, 96)) -> Dict:
    """The ``make bench`` section: best and median of ``repeats`` end-to-end runs (wall times on
    a shared machine are noisy), peak RSS, and the MONAI UNet forward-pass unit. Returns a dict
    with the raw runs and a ``markdown`` summary."""
    from .sliding_window import count_windows

    say = progress or (lambda msg: None)
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="veloxseg-bench-")
        workdir = tmp.name
    try:
        say("[bench] whole-body: synthesizing a 400x400x326 PET/CT")
        runs = []
        for i in range(max(int(repeats), 1)):
            # the unit is timed next to each run: on a shared machine both drift together
            r_unit = _unit_in_child()
            r = benchmark_wholebody(workdir, threads=threads, model=model, patch_size=patch_size,
                                    monai_reference=False)
            if r["returncode"] != 0:
                raise RuntimeError(f"veloxseg predict failed: {r['stderr_tail'][-500:]}")
            r["monai_unet_forward_s"] = r_unit
            say(f"[bench] whole-body run {i + 1}/{repeats}: {r['seconds']:.1f} s, {r['peak_rss_mb']:.0f} MB")
            runs.append(r)
    finally:
        if tmp is not None:
            tmp.cleanup()
    walls = sorted(r["seconds"] for r in runs)
    best, median = walls[0], walls[len(walls) // 2]
    peak = max(r["peak_rss_mb"] for r in runs)
    first = min(runs, key=lambda r: r["seconds"])
    unit = first.get("monai_unet_forward_s")
    full = count_windows(tuple(reversed(WHOLEBODY_SHAPE)), patch_size, 0.25)[1]
    stages = first["stage_start_s"]
    order = [k for k in ("read", "preprocess", "predict", "postprocess", "write", "done") if k in stages]
    stage_txt = ", ".join(f"{a} {stages[b] - stages[a]:.2f} s" for a, b in zip(order, order[1:]))
    rows = [
        "| | value |", "| --- | --- |",
        f"| end to end, best of {len(runs)} (median) | {best:.2f} s ({median:.2f} s) |",
        f"| peak resident memory (max over runs) | {peak:.0f} MB |",
        f"| CPU time of the best run | {first['cpu_seconds']:.1f} s |" if first.get("cpu_seconds") else "",
        f"| windows run / in the body box / whole scan | {first['windows_run']} / {first['windows_total']} / {full} |",
        f"| time line of the best run | interpreter and imports {first['seconds'] - stages.get('done', 0):.2f} s, "
        f"bundle and network {stages.get('read', 0):.2f} s, {stage_txt} |",
    ]
    if unit:
        rows.append(f"| one MONAI UNet 96^3 forward, 1 thread, timed just before that run | {unit:.3f} s |")
        rows.append(f"| end to end in MONAI UNet forwards | {best / unit:.1f} (authors' code: about 83) |")
    md = "\n".join([
        f"`veloxseg predict` on a synthetic 400x400x326 PET/CT at 2.04x2.04x3 mm (body surrounded by air, "
        f"patient table), {model} at {patch_size[0]}^3 with random weights, {threads} CPU threads, in a "
        "subprocess; peak RSS from `wait4`. Target: <= 8 s and <= 1 GB (authors' code with MONAI's sliding "
        "window: about 39 s and 1.6 GB).",
        "",
        *[r for r in rows if r],
    ])
    return {"runs": runs, "best_seconds": best, "median_seconds": median, "peak_rss_mb": peak,
            "monai_unet_forward_s": unit, "monai_unet_forwards": (best / unit) if unit else None,
            "windows_whole_scan": full, "markdown": md}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", help="keep the synthetic case and outputs here (default: a temp folder)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="veloxseg-b")
    ap.add_argument("--patch", type=int, default=96)
    ap.add_argument("--no-monai", action="store_true", help="skip the MONAI UNet reference timing")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args(argv)
    res = benchmark_wholebody(a.workdir, threads=a.threads, model=a.model, patch_size=(a.patch,) * 3,
                              monai_reference=not a.no_monai)
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0 if res["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
