"""Checks of a case's inputs before they are segmented: plausible values per modality, and an
order the file or volume names agree with. Each refuses (``InputError`` naming the file and the
model's expected order) what would run and give a meaningless segmentation, or warns where the
evidence is partial. :class:`~VeloxSegLib.infer.pipeline.Segmenter` runs them on every case; the
Slicer logic runs :func:`input_order_problems` on volume names (docs/inference.md, step 1)."""
from __future__ import annotations

import logging
import os
import re
from typing import List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

log = logging.getLogger(__name__)


#: A PET image (SUV, Bq/ml, counts) has no values below this; a CT (air at -1000 HU) does.
PET_MIN_PLAUSIBLE = -500.0


def _negative_above_minimum(arr: np.ndarray, lo: float) -> bool:
    """True if a voxel of ``arr`` (z, y, x) lies strictly between its minimum ``lo`` and 0, slab by slab
    (no full-size temporaries; a CT in HU answers at its first slab of air)."""
    if lo >= 0:
        return False
    step = max(1, (1 << 22) // max(int(arr.shape[1]) * int(arr.shape[2]), 1))
    for z in range(0, arr.shape[0], step):
        c = arr[z:z + step]
        if np.any((c < 0) & (c > lo)):
            return True
    return False


#: How far a PET's uptake may lie from what a ``pet_suv`` model was trained on (a factor either way):
#: SUV phantoms lie 1.6-7x their training mean, a PET in Bq/mL about 4000x (SUV 1 is about 4300
#: Bq/mL after 300 MBq in 70 kg).
PET_UNITS_FACTOR = 20.0


def pet_uptake_level(arr: np.ndarray) -> float:
    """A PET's typical uptake in the body: the median of the voxels above 5% of its 99.9th percentile
    (every other voxel along each axis; the air, and values stored as 0 or left by blurring, are out)."""
    sample = np.asarray(arr[::2, ::2, ::2], dtype=np.float32).reshape(-1)
    if sample.size == 0:
        return 0.0
    top = float(np.percentile(sample, 99.9))
    body = sample[sample > 0.05 * top] if top > 0 else sample[:0]
    return float(np.median(body)) if body.size else 0.0


def _check_pet_units(image, name, plan, channel) -> None:
    """Refuse a PET far from the units a ``pet_suv`` model was trained on (fixed statistics in SUV):
    a PET in Bq/mL or counts would run and give a meaningless segmentation."""
    spec = channel.get("normalization") or {}
    factor = float(spec.get("suv_factor", 1.0))
    trained = float(spec.get("mean", 0.0))
    level = pet_uptake_level(sitk.GetArrayViewFromImage(image)) * factor
    if trained <= 0 or level <= 0:
        return
    ratio = level / trained
    if ratio > PET_UNITS_FACTOR or ratio < 1.0 / PET_UNITS_FACTOR:
        raise InputError(f"{name}: PET uptake in the body is about {level:.4g} (median), {ratio:.3g} times that of the "
                         f"PET model '{plan.name}' was trained on (in SUV; mean {trained:g}): is it in Bq/mL or counts? "
                         f"Convert it to SUV first (x body weight in g / decay-corrected injected dose in Bq; in 3D "
                         f"Slicer, the PET DICOM extension loads PET series as SUV)")


def check_values(images, names, plan) -> None:
    """Refuse a PET input that is plainly a CT (inputs swapped), and a CT input that is plainly
    not in Hounsfield units (stored without its rescale intercept, or a PET in its place): either
    would run and give a meaningless segmentation. MRI contrasts cannot be told apart by their
    values, so their order is checked by name (:func:`input_order_problems`)."""
    modalities = [str(c.get("modality") or c.get("name") or "").upper() for c in plan.channels]
    schemes = [(c.get("normalization") or {}).get("scheme") for c in plan.channels]
    stats = sitk.MinimumMaximumImageFilter()
    checks = list(zip(images, names, modalities, schemes, plan.channels))
    # PET first: a CT given as PET is the plainest sign of swapped inputs, and names the CT file
    for image, name, modality, scheme, channel in sorted(checks, key=lambda c: c[2] != "PET"):
        if modality == "PET":
            stats.Execute(image)
            if stats.GetMinimum() < PET_MIN_PLAUSIBLE:
                raise InputError(f"{name}: given as PET but holds values down to {stats.GetMinimum():.0f}, as a CT "
                                 f"does; are the inputs swapped? Model '{plan.name}' expects, in this order: "
                                 f"{plan.expected_inputs()}")
            if scheme == "pet_suv":
                _check_pet_units(image, name, plan, channel)
        elif scheme == "ct":
            # in HU, air is -1000 and fat about -100: a CT of a body holds negative values. Raw stored
            # values (0..4095, the rescale intercept of -1024 not applied) hold none, besides perhaps a
            # padding value below -1024, and their air passes for soft tissue
            stats.Execute(image)
            lo, hi = stats.GetMinimum(), stats.GetMaximum()
            if lo >= 0 or (lo < -1024 and not _negative_above_minimum(sitk.GetArrayViewFromImage(image), lo)):
                raise InputError(f"{name}: given as CT but holds no value below 0 HU"
                                 f"{'' if lo >= 0 else ' besides its padding value'} (minimum {lo:g}, maximum "
                                 f"{hi:g}), where a CT in Hounsfield units has air at -1000 and fat near -100: is it "
                                 f"stored without its rescale intercept (raw values 0..4095; HU = value - 1024 for "
                                 f"most scanners), or are the inputs swapped? Model '{plan.name}' expects, in this "
                                 f"order: {plan.expected_inputs()}")


def warn_unmasked_background(images, names, plan) -> None:
    """Warn about inputs that a ``zscore_nonzero`` channel normalizes over their non-zero voxels
    although their background is not 0 (a scan not skull-stripped or masked, with noise around the
    head): the statistics then include the background. Judged by the volume's six faces, which
    lie in the background of a masked scan: fewer than half of their voxels are 0."""
    bad = []
    for image, name, c in zip(images, names, plan.channels):
        if (c.get("normalization") or {}).get("scheme") != "zscore_nonzero":
            continue
        a = sitk.GetArrayViewFromImage(image)
        faces = (a[0], a[-1], a[:, 0], a[:, -1], a[:, :, 0], a[:, :, -1])
        zeros = sum(int(np.count_nonzero(f == 0)) for f in faces) / sum(f.size for f in faces)
        if zeros < 0.5:
            bad.append(f"{name} ({100 * zeros:.0f}% of its border voxels are 0)")
    if bad:
        log.warning("model '%s' normalizes %s over the non-zero voxels and expects a background of exactly 0 "
                    "(skull-stripped or masked, as BraTS data are), but the background of %s is not 0: its noise "
                    "enters the normalization and the segmentation suffers (docs/inference.md: a 1%% noise "
                    "background lowered the brain demo's mean Dice from 0.93 to 0.75). Set the voxels outside "
                    "the head to 0 first.", plan.name, "these inputs" if len(bad) > 1 else "this input",
                    "; ".join(bad))


#: Names files and volumes commonly carry for each contrast or modality (BraTS 2021 and 2023,
#: AutoPET, HECKTOR), by the lower-case channel name they stand for. A channel name not listed
#: here stands for itself.
CHANNEL_ALIASES = {
    "t1": ("t1", "t1n", "t1w", "t1native"),
    "t1ce": ("t1ce", "t1c", "t1gd", "t1post", "t1contrast"),
    "t2": ("t2", "t2w"),
    "flair": ("flair", "t2flair", "t2f"),
    "ct": ("ct", "ctres"),
    "pet": ("pet", "pt", "suv"),
}


#: Words that make a "T1" name a contrast-enhanced T1 ("T1 post contrast", "t1_gd").
CONTRAST_WORDS = {"ce", "c", "gd", "post", "contrast", "pc", "enhanced"}


def _name_tokens(name: str) -> set:
    """The words of a file or volume name: lower case, split at anything not a letter or digit."""
    stem = os.path.basename(os.fspath(name)).lower()
    for ending in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if stem.endswith(ending):
            stem = stem[:-len(ending)]
            break
    return set(re.split(r"[^a-z0-9]+", stem)) - {""}


def _named_channels(name: str, keys: Sequence[str]) -> List[int]:
    """The channels (indices into ``keys``, lower-case channel names) a file or volume name names."""
    tokens = _name_tokens(name)
    said = {k for k in keys if tokens & set(CHANNEL_ALIASES.get(k, (k,)))}
    if "t1" in said and tokens & CONTRAST_WORDS and "t1ce" in keys:
        said = (said - {"t1"}) | {"t1ce"}
    if "flair" in said:  # "T2 FLAIR" is FLAIR
        said.discard("t2")
    return [j for j, k in enumerate(keys) if k in said]


def input_order_problems(names: Sequence[str], channel_names: Sequence[str]) -> Tuple[bool, List[str]]:
    """Inputs whose file or volume names say they are another of the model's channels.

    Returns ``(certain, problems)``: one line per input whose name names exactly one channel, not
    its own; ``certain`` when every input names exactly one channel, each a different one, so the
    names give a whole other order (then the order is surely wrong, unless the names are).
    """
    keys = [str(c).lower() for c in channel_names]
    said = [_named_channels(name, keys) for name in names]
    problems = [f"input {i + 1} ({channel_names[i]}) is '{names[i]}', named like {channel_names[hits[0]]}"
                for i, hits in enumerate(said) if len(hits) == 1 and hits[0] != i]
    whole = all(len(h) == 1 for h in said) and len({h[0] for h in said}) == len(said)
    return bool(problems) and whole, problems


def check_input_order(names: Sequence[str], plan) -> None:
    """Refuse inputs whose names give them another order of the model's channels; warn when only
    some names say so (a wrong order runs and gives a meaningless segmentation)."""
    certain, problems = input_order_problems(names, plan.channel_names)
    if not problems:
        return
    text = (f"{'; '.join(problems)}. Model '{plan.name}' expects, in this order: {plan.expected_inputs()}")
    if certain:
        raise InputError(f"the inputs' names give another order: {text} (pass them in that order, or rename "
                         f"the files if their names are wrong)")
    log.warning("check the order of the inputs: %s", text)
