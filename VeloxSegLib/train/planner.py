"""Dataset fingerprint -> training plans (nnU-Net-style auto-configuration).

``fingerprint_dataset(path)`` measures an nnU-Net raw dataset: per-case spacing and size (of
channel 0, the label grid), per-channel intensity statistics over the foreground (label > 0)
and over the body, and label statistics. ``make_plans(fingerprint, **overrides)`` turns it into
plans: target spacing, patch size, per-channel normalization, labels and batch size, written in
the structure of ``docs/bundle-format.md`` so the trainer copies them into the bundle.
Every decision carries its reason in ``decisions``; values given by the user are recorded in
``overrides``. All vectors are in ITK order x, y, z, ``model.patch_size`` included (bundle.json
stores the patch in tensor order z, y, x: the trainer reverses it).
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import ConfigError, InputError

log = logging.getLogger(__name__)

PLANS_VERSION = 1
FINGERPRINT_VERSION = 1

SAMPLES_PER_CASE = 10000  # intensity samples per case and region, as nnU-Net does
PATCH_MULTIPLE = 32  # stem stride 4 x three stride-2 stages: every axis a multiple of 32
DEFAULT_MAX_PATCH_VOXELS = 96 ** 3  # the paper's 96^3 patches
DEFAULT_BATCH_VOXELS = 2 * 96 ** 3  # the paper's batch of two 96^3 patches
MAX_BATCH_SIZE = 8
MAX_BATCH_DATASET_FRACTION = 0.05  # a batch covers at most 5% of the dataset's voxels (nnU-Net)
ANISOTROPY_RATIO = 3.0
#: A low-resolution configuration is planned when the full-resolution window covers less than this
#: fraction of the median image, and its spacing grows until its window covers at least this much
#: (nnU-Net's 3d_lowres rule), by this factor per step.
LOWRES_COVERAGE = 0.25
LOWRES_SPACING_STEP = 1.03
#: The configurations ``train --configuration`` takes.
CONFIGURATIONS = ("3d_fullres", "3d_lowres")
#: A PET whose body's 99.5th percentile is below this is taken to be in SUV (tumours reach 10-30);
#: Bq/mL is thousands of times larger.
PET_SUV_MAX = 100.0
CT_BODY_HU = -500.0  # CT "body": voxels above this HU (air and lung-free background below)

_CT_NAMES = {"ct", "ctres", "cect", "ldct", "lowdosect", "ctac"}
_PET_NAMES = {"pet", "pt", "suv", "fdg", "psma", "petsuv", "petct", "fdgpet"}
_MR_NAMES = {"mr", "mri", "t1", "t1w", "t1ce", "t1c", "t1gd", "t1n", "t1post", "t2", "t2w", "t2f", "flair",
             "t2flair", "adc", "dwi", "pd", "swi", "dce", "t1ced"}

_PALETTE = [(230, 80, 60), (80, 160, 230), (250, 210, 60), (120, 200, 90), (180, 100, 220), (240, 140, 40),
            (60, 200, 200), (220, 100, 160), (150, 150, 150), (100, 90, 200)]

PathLike = Union[str, Path]

#: Cases measured at once by default (each holds one case's images in memory).
MAX_FINGERPRINT_THREADS = 4


def default_fingerprint_threads() -> int:
    import os

    return max(1, min(MAX_FINGERPRINT_THREADS, os.cpu_count() or 1))


# --------------------------------------------------------------------------- channel kinds


def channel_modality(name: str) -> str:
    """``CT``, ``PET``, ``MR`` or ``other`` from a channel name (case and punctuation ignored)."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    if key in _CT_NAMES or key.startswith("ct"):
        return "CT"
    if key in _PET_NAMES or key.startswith("pet") or key.endswith("pet") or "suv" in key:
        return "PET"
    if key in _MR_NAMES or key.startswith(("t1", "t2")) or "flair" in key or key.startswith("mr"):
        return "MR"
    return "other"


def _body_test(arr: np.ndarray, modality: str):
    """The body of one channel, as a test on voxel values: CT above -500 HU; otherwise above
    the image minimum (what ``pet_zscore_body`` uses; for zero-background MRI, non-zero)."""
    threshold = CT_BODY_HU if modality == "CT" else float(arr.min())
    return lambda values: values > threshold


# --------------------------------------------------------------------------- fingerprint


def _stats(samples: np.ndarray) -> dict:
    if samples.size == 0:
        return {"count": 0}
    s = samples.astype(np.float64)
    p = np.percentile(s, [0.5, 50.0, 99.5])
    return {
        "count": int(s.size),
        "mean": float(s.mean()),
        "std": float(s.std()),
        "min": float(s.min()),
        "max": float(s.max()),
        "median": float(p[1]),
        "percentile_00_5": float(p[0]),
        "percentile_99_5": float(p[2]),
    }


def _sample(rng: np.random.Generator, values: np.ndarray, n: int) -> np.ndarray:
    if values.size <= n:
        return values
    return values[rng.choice(values.size, n, replace=False)]


def _sample_mask(rng: np.random.Generator, mask_of, flat: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` random flat indices where ``mask_of(values)`` holds. Tries cheap rejection
    sampling first (no full-size index array for a body that fills much of the image)."""
    if flat.size > 8 * n:
        idx = np.unique(rng.integers(0, flat.size, size=8 * n))
        idx = idx[mask_of(flat[idx])]
        if idx.size >= n:
            return np.sort(rng.choice(idx, n, replace=False))
    return _sample(rng, np.flatnonzero(mask_of(flat)), n)


def _measure_case(ds, k: int, case: str, names, modalities, samples_per_case: int, seed: int) -> dict:
    """One case's part of the fingerprint (its own random stream: the same in any order or thread)."""
    import SimpleITK as sitk

    from ..data.alignment import Grid, align_to_reference
    from ..data.io import read_image
    from ..data.nnunet import grid_differences
    from ..data.orientation import AxisOrder

    rng = np.random.default_rng(np.random.SeedSequence([seed, k]))
    label_img = read_image(ds.label_path(case))
    lab = sitk.GetArrayViewFromImage(label_img)
    images = [read_image(p) for p in ds.image_paths(case)]
    ref = Grid.of(images[0])
    off_grid = [name for name, img in zip(names[1:], images[1:]) if grid_differences(ref, Grid.of(img))]
    if off_grid:
        images = align_to_reference(images, names)
    # per world axis (L, P, S), as the trainer turns the arrays (data/orientation.py)
    axes = AxisOrder.of_direction(ref.direction)
    counts = np.bincount(np.asarray(lab, dtype=np.int64).reshape(-1))
    fg_index = np.flatnonzero(np.asarray(lab).reshape(-1) > 0)
    fg_index = _sample(rng, fg_index, samples_per_case)
    fg, body = [], []
    for c, img in enumerate(images):
        arr = sitk.GetArrayViewFromImage(img).reshape(-1)
        fg.append(np.asarray(arr[fg_index], dtype=np.float32))
        idx = _sample_mask(rng, _body_test(arr, modalities[c]), arr, samples_per_case)
        body.append(np.asarray(arr[idx], dtype=np.float32))
    return {"spacing": [float(v) for v in axes.canonical_vector(ref.spacing)],
            "size": [int(v) for v in axes.canonical_vector(ref.size)], "counts": counts,
            "off_grid": off_grid, "fg": fg, "body": body}


def fingerprint_dataset(path: PathLike, samples_per_case: int = SAMPLES_PER_CASE, seed: int = 0,
                        progress=None, threads: int = 1) -> dict:
    """Measure an nnU-Net raw dataset (validated first; errors name the case). Deterministic:
    the same with any number of ``threads`` (cases measured at once; reading and resampling
    release the GIL, as nnU-Net's fingerprint extraction runs several processes)."""
    from ..data.nnunet import validate_dataset

    ds = validate_dataset(path)
    names = ds.channel_list
    modalities = [channel_modality(n) for n in names]
    label_values = ds.label_values()
    spacings, sizes, off_grid = [], [], set()
    fg_samples: List[List[np.ndarray]] = [[] for _ in names]
    body_samples: List[List[np.ndarray]] = [[] for _ in names]
    label_voxels: Dict[int, List[int]] = {v: [] for v, _ in label_values}
    unexpected: Dict[str, List[int]] = {}

    def measure(item):
        k, case = item
        return _measure_case(ds, k, case, names, modalities, samples_per_case, seed)

    items = list(enumerate(ds.cases))
    threads = max(1, min(int(threads or 1), len(items)))
    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(threads, thread_name_prefix="fingerprint")
        results = pool.map(measure, items)  # in case order
    else:
        pool, results = None, map(measure, items)
    try:
        for k, m in enumerate(results):
            case = ds.cases[k]
            off_grid.update(m["off_grid"])
            spacings.append(m["spacing"])
            sizes.append(m["size"])
            counts = m["counts"]
            for v in label_voxels:
                label_voxels[v].append(int(counts[v]) if v < counts.size else 0)
            extra = [int(v) for v in np.flatnonzero(counts) if int(v) not in label_voxels]
            if extra:
                unexpected[case] = extra
            for c in range(len(names)):
                fg_samples[c].append(m["fg"][c])
                body_samples[c].append(m["body"][c])
            if progress is not None:
                progress(k + 1, len(ds.cases))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if unexpected:
        case, vals = next(iter(unexpected.items()))
        raise InputError(f"{ds.root.name}: case {case!r}: label values {vals} are not declared in dataset.json")

    spacing_arr = np.asarray(spacings)
    size_arr = np.asarray(sizes)
    voxel_ml = np.prod(spacing_arr, axis=1) / 1000.0
    labels_out = []
    for v, name in label_values:
        vox = np.asarray(label_voxels[v], dtype=np.int64)
        vol = vox * voxel_ml
        present = vox > 0
        labels_out.append({
            "value": v,
            "name": name,
            "cases_with_label": int(present.sum()),
            "voxels_total": int(vox.sum()),
            "voxels_per_case": [int(x) for x in vox],
            "volume_ml_mean": float(vol[present].mean()) if present.any() else 0.0,
            "volume_ml_median": float(np.median(vol[present])) if present.any() else 0.0,
            "volume_ml_min": float(vol[present].min()) if present.any() else 0.0,
            "volume_ml_max": float(vol[present].max()) if present.any() else 0.0,
        })
    channels_out = []
    for c, name in enumerate(names):
        channels_out.append({
            "index": c,
            "name": name,
            "modality": modalities[c],
            "on_reference_grid": name not in off_grid,
            "foreground": _stats(np.concatenate(fg_samples[c])),
            "body": _stats(np.concatenate(body_samples[c])),
        })
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "dataset": str(ds.root.resolve()),
        "name": str(ds.extra.get("name", ds.root.name)),
        "num_cases": len(ds.cases),
        "cases": list(ds.cases),
        "spacings": spacings,
        "sizes": sizes,
        "median_spacing": [float(v) for v in np.median(spacing_arr, axis=0)],
        "median_size": [float(v) for v in np.median(size_arr, axis=0)],
        "channels": channels_out,
        "labels": labels_out,
        "samples_per_case": int(samples_per_case),
        "seed": int(seed),
    }


# --------------------------------------------------------------------------- plans


def _round_multiple(v: float, m: int = PATCH_MULTIPLE) -> int:
    """Nearest multiple of ``m`` (halves round up), at least ``m``."""
    return max(m, int(math.floor(v / m + 0.5)) * m)


def choose_spacing(fingerprint: dict) -> Tuple[list, str]:
    """Median spacing; for anisotropic data (one axis > 3x the finest) the coarse axis takes
    the 10th percentile of its spacings, not finer than the other axes (nnU-Net's rule)."""
    spacings = np.asarray(fingerprint["spacings"], dtype=np.float64)
    target = np.median(spacings, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    if target[worst] > ANISOTROPY_RATIO * min(target[others]):
        p10 = float(np.percentile(spacings[:, worst], 10))
        new = max(p10, float(max(target[others])))
        reason = (f"anisotropic (axis {'xyz'[worst]} {target[worst]:g} mm > {ANISOTROPY_RATIO:g} x "
                  f"{min(target[others]):g} mm): median spacing with the coarse axis at its 10th percentile "
                  f"{new:g} mm")
        target[worst] = new
    else:
        reason = "median spacing of the training cases"
    return [float(round(v, 6)) for v in target], reason


def choose_patch_size(fingerprint: dict, spacing: Sequence[float], max_voxels: int = DEFAULT_MAX_PATCH_VOXELS):
    """Every axis a multiple of 32, at most the median size (at the target spacing) rounded to
    a multiple of 32, and at most ``max_voxels``: start from that cap and shrink the largest
    axis (ties: the longest in mm) by 32 until within budget."""
    med_size = np.asarray(fingerprint["median_size"], dtype=np.float64)
    med_spacing = np.asarray(fingerprint["median_spacing"], dtype=np.float64)
    shape_at_target = med_size * med_spacing / np.asarray(spacing, dtype=np.float64)
    cap = [_round_multiple(v) for v in shape_at_target]
    patch = list(cap)
    while int(np.prod(patch)) > max_voxels and max(patch) > PATCH_MULTIPLE:
        axis = max(range(3), key=lambda a: (patch[a], patch[a] * spacing[a]))
        patch[axis] -= PATCH_MULTIPLE
    reason = (f"median size at target spacing {[round(float(v), 1) for v in shape_at_target]} rounded to "
              f"multiples of {PATCH_MULTIPLE} gives {cap}; largest axes shrunk until at most "
              f"{max_voxels} voxels")
    return patch, reason, [float(v) for v in shape_at_target]


def choose_batch_size(fingerprint: dict, patch: Sequence[int], spacing: Sequence[float],
                      batch_voxels: int = DEFAULT_BATCH_VOXELS):
    n_patch = int(np.prod(patch))
    batch = max(2, min(MAX_BATCH_SIZE, batch_voxels // n_patch))
    med_size = np.asarray(fingerprint["median_size"], dtype=np.float64)
    med_spacing = np.asarray(fingerprint["median_spacing"], dtype=np.float64)
    dataset_voxels = float(np.prod(med_size * med_spacing / np.asarray(spacing))) * fingerprint["num_cases"]
    cap = max(2, int(MAX_BATCH_DATASET_FRACTION * dataset_voxels // n_patch))
    batch = min(batch, cap)
    return batch, (f"{batch_voxels} voxels per batch / {n_patch} per patch, between 2 and {MAX_BATCH_SIZE}, "
                   f"at most {MAX_BATCH_DATASET_FRACTION:.0%} of the dataset's voxels per batch")


def plan_lowres(fingerprint: dict, spacing: Sequence[float], patch: Sequence[int],
                shape_at_target: Sequence[float], max_voxels: int = DEFAULT_MAX_PATCH_VOXELS):
    """nnU-Net's ``3d_lowres``: when the full-resolution window covers less than a quarter of the
    median image (large images: a whole body, an abdomen at fine spacing), a second configuration
    sees each image at a coarser spacing, so that its window holds more of it. The spacing grows
    by 3% per step (only the axes more than 2x finer than the coarsest while the spacing is that
    anisotropic, then all of them), the window is re-planned at each step as for full resolution,
    until it covers a quarter of the median image. Returns ``(plan or None, reason)``."""
    cover = float(np.prod(patch)) / float(np.prod(shape_at_target))
    if cover >= LOWRES_COVERAGE:
        return None, (f"not planned: the full-resolution window covers {cover:.0%} of the median image "
                      f"(a low-resolution configuration is planned below {LOWRES_COVERAGE:.0%})")
    low = np.asarray(spacing, dtype=np.float64)
    for _ in range(1000):  # 1.03^1000: far past any image
        grow = low.max() / low > 2
        low = np.where(grow, low * LOWRES_SPACING_STEP, low) if grow.any() else low * LOWRES_SPACING_STEP
        low_patch, _, low_shape = choose_patch_size(fingerprint, low, max_voxels)
        low_cover = float(np.prod(low_patch)) / float(np.prod(low_shape))
        if low_cover >= LOWRES_COVERAGE:
            break
    batch, _ = choose_batch_size(fingerprint, low_patch, low)
    plan = {"spacing": [float(round(v, 6)) for v in low], "patch_size": [int(v) for v in low_patch],
            "batch_size": int(batch), "median_size_at_spacing": [round(float(v), 2) for v in low_shape]}
    reason = (f"the full-resolution window covers {cover:.0%} of the median image (below {LOWRES_COVERAGE:.0%}): "
              f"spacing grown by {LOWRES_SPACING_STEP - 1:.0%} per step to {plan['spacing']} mm, where the window "
              f"{plan['patch_size']} covers {min(low_cover, 1.0):.0%} of it")
    return plan, reason


def plans_for_configuration(plans: dict, configuration: Optional[str]) -> dict:
    """The plans of one configuration: the plans themselves for ``3d_fullres`` (or None), else a
    copy with the spacing, window and batch size of ``plans["configurations"][configuration]``."""
    if configuration in (None, "3d_fullres"):
        return plans
    if configuration not in CONFIGURATIONS:
        raise ConfigError(f"unknown configuration {configuration!r}; the planner's are {', '.join(CONFIGURATIONS)}")
    planned = (plans.get("configurations") or {}).get(configuration)
    if not planned:
        why = (plans.get("decisions") or {}).get(configuration, "the plans predate low-resolution configurations")
        raise ConfigError(f"the plans have no {configuration} configuration ({why}); train the full-resolution "
                          f"one, or set --spacing and --patch-size yourself")
    out = json.loads(json.dumps(plans))
    out["spacing"] = list(planned["spacing"])
    out["model"]["patch_size"] = list(planned["patch_size"])
    out["batch_size"] = int(planned["batch_size"])
    if "median_size_at_spacing" in planned:
        out["median_size_at_spacing"] = list(planned["median_size_at_spacing"])
    out["configuration"] = configuration
    return out


def default_normalization(channel: dict):
    """The normalization spec (bundle format) for one fingerprint channel, and the reason."""
    modality = channel["modality"]
    if modality == "CT":
        stats, where = channel["foreground"], "foreground"
        if not stats.get("count"):
            stats, where = channel["body"], "body (no foreground voxels)"
        if not stats.get("count"):
            raise InputError(f"channel {channel['name']!r}: no voxels to compute CT statistics from")
        lo, hi = round(stats["percentile_00_5"], 4), round(stats["percentile_99_5"], 4)
        if hi <= lo:  # constant intensities: keep a valid (non-empty) range
            hi = lo + 1.0
        spec = {"scheme": "ct", "clip": [lo, hi], "mean": round(stats["mean"], 4),
                "std": round(max(stats["std"], 1e-4), 4)}
        return spec, f"CT: clip to {where} 0.5/99.5 percentiles, z-score with {where} mean/std"
    if modality == "PET":
        stats = channel["body"]
        if stats.get("count") and stats.get("percentile_99_5", 0.0) < PET_SUV_MAX:
            # fixed statistics, as nnU-Net normalizes SUV: a per-image z-score moves with the field of
            # view and with how the file stores the near-zero values (docs/inference.md)
            return (_complete_spec({"scheme": "pet_suv"}, channel),
                    "PET in SUV: z-score with the dataset's body mean/std (fixed, as for CT)")
        return ({"scheme": "pet_zscore_body"},
                "PET not in SUV (99.5th percentile of the body >= 100): z-score over each image's body "
                "(voxels above its minimum)")
    if modality == "MR":
        return {"scheme": "zscore_nonzero"}, "MRI contrast: z-score over non-zero voxels"
    return ({"scheme": "zscore_nonzero"},
            f"unrecognized channel name {channel['name']!r}: z-score over non-zero voxels (override with "
            f"--normalization)")


def parse_normalization(text: str):
    """``"CT=ct"``, ``"1=pet_suv:suv_factor=0.8"``, ``"CT=ct:clip=-1000,600:mean=40:std=200"`` or
    ``'CT={"scheme": "none"}'`` -> ``(channel, spec)``."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise ConfigError(f"--normalization {text!r}: expected CHANNEL=SCHEME[:key=value...]")
    value = value.strip()
    if value.startswith("{"):
        try:
            spec = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--normalization {text!r}: invalid JSON ({exc})") from None
        if not isinstance(spec, dict):
            raise ConfigError(f"--normalization {text!r}: expected a JSON object")
        return key.strip(), spec
    scheme, *params = value.split(":")
    spec = {"scheme": scheme.strip()}
    for item in params:
        k, eq, v = item.partition("=")
        if not eq:
            raise ConfigError(f"--normalization {text!r}: parameter {item!r} is not key=value")
        try:
            nums = [float(x) for x in v.split(",")]
        except ValueError:
            raise ConfigError(f"--normalization {text!r}: parameter {k!r} must be numeric") from None
        spec[k.strip()] = nums if len(nums) > 1 else nums[0]
    return key.strip(), spec


def _complete_spec(spec: Mapping, channel: dict) -> dict:
    """Validate a user-given spec and fill statistics it leaves out from the fingerprint."""
    from ..data.normalization import SCHEMES

    spec = dict(spec)
    scheme = spec.get("scheme")
    if scheme not in SCHEMES:
        raise ConfigError(f"channel {channel['name']!r}: unknown normalization scheme {scheme!r} "
                          f"(choose from {', '.join(SCHEMES)})")
    allowed = {"ct": {"clip", "mean", "std"}, "pet_suv": {"suv_factor", "mean", "std"}}.get(scheme, set())
    extra = set(spec) - allowed - {"scheme"}
    if extra:
        raise ConfigError(f"channel {channel['name']!r}: scheme {scheme!r} takes no {', '.join(sorted(extra))}")
    if scheme == "ct":
        auto = {**channel, "modality": "CT"}
        filled = default_normalization(auto)[0]
        for k in ("clip", "mean", "std"):
            spec.setdefault(k, filled[k])
        clip = spec["clip"]
        if not isinstance(clip, (list, tuple)) or len(clip) != 2 or float(clip[0]) >= float(clip[1]):
            raise ConfigError(f"channel {channel['name']!r}: 'clip' must be [low, high] with low < high")
        spec["clip"] = [float(clip[0]), float(clip[1])]
    elif scheme == "pet_suv":
        factor = float(spec.setdefault("suv_factor", 1.0))
        stats = channel["body"]
        spec.setdefault("mean", round(stats.get("mean", 0.0) * factor, 6))
        spec.setdefault("std", round(max(stats.get("std", 1.0), 1e-6) * factor, 6))
    for k in ("mean", "std", "suv_factor"):
        if k in spec:
            spec[k] = float(spec[k])
    if spec.get("std", 1.0) <= 0:
        raise ConfigError(f"channel {channel['name']!r}: 'std' must be positive")
    return spec


def _labels(fingerprint: dict) -> list:
    out = []
    for i, lab in enumerate(fingerprint["labels"]):
        entry = {"value": int(lab["value"]), "name": lab["name"]}
        if lab["value"] != 0:
            entry["color"] = list(_PALETTE[(i - 1) % len(_PALETTE)])
        out.append(entry)
    return out


def check_patch_size(patch_size) -> list:
    patch = _as_triplet(patch_size, "patch size", int)
    if any(p <= 0 or p % PATCH_MULTIPLE for p in patch):
        raise ConfigError(f"patch size {patch}: every axis must be a positive multiple of {PATCH_MULTIPLE} "
                          f"(the network's windows tile 1/32 of the patch)")
    return patch


def _as_triplet(value, what: str, kind=float) -> list:
    try:
        vals = [kind(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be three numbers, got {value!r}") from None
    if len(vals) != 3:
        raise ConfigError(f"{what} must be three numbers (x y z), got {len(vals)}")
    return vals


def make_plans(
    fingerprint: dict,
    *,
    spacing: Optional[Sequence[float]] = None,
    patch_size: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
    normalization: Optional[Mapping[str, Union[str, Mapping]]] = None,
    model: str = "veloxseg-b",
    in_channels: Optional[Sequence[int]] = None,
    max_patch_voxels: Optional[int] = None,
) -> dict:
    """Plans from a fingerprint. Each keyword left as None is decided automatically; given ones
    are validated, used and recorded under ``overrides``.

    ``normalization``: channel name or index (as a string) -> scheme name or spec dict; missing
    statistics (CT clip/mean/std, pet_suv mean/std) are filled from the fingerprint.
    ``in_channels``: channels per modality stream (sum = number of channels); default one
    stream per channel, or one early-fusion stream when every channel is an MRI contrast.
    """
    overrides: dict = {}
    decisions: dict = {}
    channels_fp = fingerprint["channels"]
    n_ch = len(channels_fp)

    if spacing is not None:
        spacing = _as_triplet(spacing, "spacing")
        if min(spacing) <= 0:
            raise ConfigError(f"spacing must be positive, got {spacing}")
        overrides["spacing"] = spacing
        decisions["spacing"] = "given on the command line"
    else:
        spacing, decisions["spacing"] = choose_spacing(fingerprint)

    budget = DEFAULT_MAX_PATCH_VOXELS
    if max_patch_voxels is not None:
        budget = int(max_patch_voxels)
        if budget < PATCH_MULTIPLE ** 3:
            raise ConfigError(f"max patch voxels must be at least {PATCH_MULTIPLE ** 3}, got {budget}")
        overrides["max_patch_voxels"] = budget
    patch_auto, patch_reason, shape_at_target = choose_patch_size(fingerprint, spacing, budget)
    if patch_size is not None:
        patch = check_patch_size(patch_size)
        overrides["patch_size"] = patch
        decisions["patch_size"] = "given on the command line"
    else:
        patch, decisions["patch_size"] = patch_auto, patch_reason

    if batch_size is not None:
        if int(batch_size) < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        batch = int(batch_size)
        overrides["batch_size"] = batch
        decisions["batch_size"] = "given on the command line"
    else:
        batch, decisions["batch_size"] = choose_batch_size(fingerprint, patch, spacing)

    # normalization per channel
    given: Dict[int, Mapping] = {}
    for key, spec in (normalization or {}).items():
        key = str(key)
        idx = next((c["index"] for c in channels_fp if c["name"] == key), None)
        if idx is None and key.isdigit() and int(key) < n_ch:
            idx = int(key)
        if idx is None:
            names = ", ".join(c["name"] for c in channels_fp)
            raise ConfigError(f"--normalization: no channel {key!r} (channels: {names})")
        given[idx] = {"scheme": spec} if isinstance(spec, str) else dict(spec)
    channels = []
    norm_decisions = {}
    for ch in channels_fp:
        if ch["index"] in given:
            spec = _complete_spec(given[ch["index"]], ch)
            overrides.setdefault("normalization", {})[ch["name"]] = dict(given[ch["index"]])
            norm_decisions[ch["name"]] = "given on the command line"
        else:
            spec, norm_decisions[ch["name"]] = default_normalization(ch)
        channels.append({"name": ch["name"], "modality": ch["modality"], "normalization": spec})
    decisions["normalization"] = norm_decisions

    if in_channels is not None:
        in_ch = [int(v) for v in in_channels]
        if not in_ch or min(in_ch) < 1 or sum(in_ch) != n_ch:
            raise ConfigError(f"in_channels {in_ch}: positive entries summing to the {n_ch} channel(s) needed")
        overrides["in_channels"] = in_ch
        decisions["in_channels"] = "given on the command line"
    elif n_ch > 1 and all(c["modality"] == "MR" for c in channels_fp):
        in_ch = [n_ch]
        decisions["in_channels"] = "all channels are MRI contrasts: one early-fusion stream (the paper's BraTS setting)"
    else:
        in_ch = [1] * n_ch
        decisions["in_channels"] = "one attention stream per channel (modality)"
    if model != "veloxseg-b":
        from ..model import list_models  # imports torch: only when a preset is named
        from ..model.peers import PEERS

        if model.lower() not in list_models() and model.lower() not in PEERS:
            raise ConfigError(f"unknown model {model!r}; available: {', '.join(list_models())} "
                              f"(benchmark peers: {', '.join(PEERS)})")
        overrides["model"] = model

    lowres, decisions["3d_lowres"] = plan_lowres(fingerprint, spacing, patch, shape_at_target, budget)
    labels = _labels(fingerprint)
    return {
        "plans_version": PLANS_VERSION,
        "dataset": {"path": fingerprint["dataset"], "name": fingerprint["name"], "num_cases": fingerprint["num_cases"]},
        "model": {"name": model, "in_channels": in_ch, "num_classes": len(labels), "patch_size": patch,
                  "overrides": {}},
        "spacing": spacing,
        "orientation": "LPS",
        "channels": channels,
        "labels": labels,
        "batch_size": batch,
        "median_size_at_spacing": [round(v, 2) for v in shape_at_target],
        "configuration": "3d_fullres",
        # other configurations of the same plans (train --configuration NAME)
        "configurations": {"3d_lowres": lowres} if lowres else {},
        "channels_need_alignment": [c["name"] for c in channels_fp if not c.get("on_reference_grid", True)],
        "decisions": decisions,
        "overrides": overrides,
        "fingerprint": fingerprint,
    }


def plan_dataset(path: PathLike, output: Optional[PathLike] = None, progress=None, threads: int = 1,
                 **overrides) -> dict:
    """Fingerprint ``path`` (``threads`` cases at once), make plans and write them (atomically) to
    ``output`` if given. ``progress(done, total)`` is called after each case is measured."""
    from ..data.nnunet import write_json_atomic

    if overrides.get("patch_size") is not None:  # fail fast, before reading the dataset
        check_patch_size(overrides["patch_size"])
    plans = make_plans(fingerprint_dataset(path, progress=progress, threads=threads), **overrides)
    if output is not None:
        out = Path(output)
        if out.is_dir():
            raise InputError(f"'{out}': is a folder, expected a plans file name")
        if not out.parent.is_dir() and str(out.parent):
            raise InputError(f"'{out}': folder '{out.parent}' does not exist")
        try:
            write_json_atomic(out, plans)
        except OSError as exc:
            raise InputError(f"'{out}': cannot write plans ({exc.strerror or exc})") from None
    return plans
