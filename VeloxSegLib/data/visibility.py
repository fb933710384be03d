"""How visible each lesion of a PET/CT phantom is: its detectability index d' in PET and in CT.

A lesion (a 26-connected component of the case's label, as ``veloxseg evaluate --lesions`` counts
them) is scored apart from any network. The case is rebuilt without the scanner's noise, once as
it is and once with that lesion replaced by the tissue it grew in; the difference is the
lesion's signal s in each image (the PET after its blur, resampling and post-filter; the CT after
its partial-volume blur). The index is that of the non-prewhitening matched filter, an observer
who knows the lesion and the background and correlates the image with s:

    d' = (s . s) / sqrt(Var_noise(s . n) + Var_clutter(s . c))

- noise n: the scanner's own, as the generator draws it (CT: white, ``ct_noise_hu``; PET:
  ``pet_noise^2 x SUV`` per PET voxel before the post-filter, so Var = sum_i pet_noise^2 SUV_i
  (F s)_i^2 with F the post-filter);
- clutter c: the anatomy's texture, which a reader does not know in advance: the generator's
  texture field drawn ``draws`` more times, through the same imaging chain; its variance is the
  mean of (s . c)^2 over the draws.

The Rose criterion, d' of 5 or more, is the usual bar for a lesion an observer can find. The
index is generous where a lesion takes the shape of an organ (it knows the normal anatomy).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import ConfigError, InputError

#: The Rose criterion: a lesion with d' of 5 or more is one an observer can find.
ROSE_DPRIME = 5.0
#: Texture draws for the clutter variance.
DEFAULT_DRAWS = 12
#: PET d' bin edges of the detection-by-visibility table.
DPRIME_EDGES = (3.0, 5.0, 10.0, 20.0)


def npw_dprime(signal: np.ndarray, noise_variance: float, clutter: Sequence[np.ndarray] = ()) -> float:
    """The non-prewhitening matched filter's d' for ``signal`` s: (s . s) / sqrt(noise_variance +
    mean over ``clutter`` images c of (s . c)^2). ``noise_variance`` is Var(s . n) for the noise n.
    0.0 for a zero signal; inf for a signal with neither noise nor clutter."""
    s = np.asarray(signal, np.float64).ravel()
    energy = float(s @ s)
    if energy == 0.0:
        return 0.0
    var = float(noise_variance)
    if len(clutter):
        var += float(np.mean([float(s @ np.asarray(c, np.float64).ravel()) ** 2 for c in clutter]))
    return energy / math.sqrt(var) if var > 0 else math.inf


def lesion_signals(scene, mask: np.ndarray):
    """The signal of the lesion voxels ``mask`` of a :class:`~VeloxSegLib.data.phantom.PetctScene`
    in each final image, noise-free: ``(s_ct, s_pet)``, the CT (HU, CT grid) and PET (SUV, PET
    grid, post-filter included) with the lesion minus without it (its voxels the host tissue).
    Each imaging chain is linear, so the difference goes through it alone."""
    tissue = scene.tissue
    ct_delta = np.where(mask, scene.les_hu - scene.lut("hu")[tissue], 0.0).astype(np.float32)
    host = np.maximum(scene.lut("suv")[tissue] * (1.0 + 0.08 * scene.texture), 0)
    pet_delta = np.where(mask, scene.les_suv - host, 0.0).astype(np.float32)
    return scene.ct_blur(ct_delta), scene.pet_post(scene.pet_acquire(pet_delta))


def noise_variances(scene, s_ct: np.ndarray, s_pet: np.ndarray, pet_mean: np.ndarray):
    """Var(s . n) of the scanner's noise n for the CT and PET signals: CT white noise of sd
    ``ct_noise_hu``; PET noise ``pet_noise * sqrt(SUV)`` per PET voxel of ``pet_mean`` (the noise-free
    PET before its post-filter F), then filtered: Var = sum_i pet_noise^2 SUV_i (F s)_i^2 (F is
    symmetric)."""
    ct = scene.scanner.ct_noise_hu ** 2 * float(np.sum(s_ct.astype(np.float64) ** 2))
    filtered = scene.pet_post(s_pet).astype(np.float64)
    pet = scene.scanner.pet_noise ** 2 * float(np.sum(np.maximum(pet_mean, 0).astype(np.float64) * filtered ** 2))
    return ct, pet


def _components(label: np.ndarray):
    """The lesions of ``evaluate --lesions``: the label's 26-connected components, and their count."""
    from ..metrics import _components as components

    comps = components(label, True)
    return comps, int(comps.max())


def lesion_visibility(seed: int, index: int, size=None, scanner="default", draws: int = DEFAULT_DRAWS,
                      label: Optional[np.ndarray] = None,
                      lesion_diameter_mm=None) -> List[Dict[str, object]]:
    """d' in PET and CT of each lesion of PET/CT phantom case ``(seed, index)`` (module docstring).

    Returns one entry per 26-connected component of the label, largest first: ``voxels``,
    ``volume_ml``, ``centre_mm`` (its centroid in physical LPS mm, as ``veloxseg evaluate
    --lesions`` gives it), ``site`` (lung, liver, node or bone: that of the lesion that drew most
    of its voxels), ``records`` (the indices of the case's lesion records it holds), ``pet_dprime``
    and ``ct_dprime``. ``label``: the case's label array ([z, y, x]) as read from its file, to
    check against the regenerated one (InputError if they differ)."""
    from .phantom import _noise_field, petct_scene

    if int(draws) < 1:
        raise ConfigError(f"draws must be at least 1, got {draws}")
    scene = petct_scene(seed, index, size, scanner, lesion_diameter_mm=lesion_diameter_mm)
    if label is not None and (label.shape != scene.label.shape or not np.array_equal(label > 0, scene.label)):
        raise InputError(f"case {index} of seed {seed}: its label is not the one the phantom generator draws "
                          f"(a changed file, or another seed, size or generator version)")
    grid = scene.ct_grid
    tex_lut, suv_lut = scene.lut("texture_hu"), scene.lut("suv")
    tissue, lesion = scene.tissue, scene.label

    pet_mean = scene.pet_acquire(scene.activity())  # the noise-free PET before its post-filter
    # clutter: the texture field drawn again (a stream of its own, not the case's), through each chain
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 7919]))
    clutter_ct, clutter_pet = [], []
    for _ in range(int(draws)):
        t = _noise_field(rng, grid, 4.0)
        clutter_ct.append(scene.ct_blur(tex_lut[tissue] * t))
        act = suv_lut[tissue] * 0.08 * t
        act[lesion] = 0.0  # lesions carry no texture in PET
        clutter_pet.append(scene.pet_post(scene.pet_acquire(act)))

    comps, n = _components(lesion)
    sites = [str(r["site"]) for r in scene.records]
    spacing = np.asarray(grid.spacing, np.float64)
    origin = np.asarray(grid.origin, np.float64)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out = []
    for k in range(1, n + 1):
        m = comps == k
        voxels = int(m.sum())
        s_ct, s_pet = lesion_signals(scene, m)
        ct_noise, pet_noise = noise_variances(scene, s_ct, s_pet, pet_mean)
        owners = np.bincount(scene.owner[m].ravel(), minlength=len(sites) + 1)[1:]
        zyx = np.nonzero(m)
        centre = origin + spacing * np.array([zyx[2].mean(), zyx[1].mean(), zyx[0].mean()])
        out.append({
            "voxels": voxels,
            "volume_ml": voxels * voxel_ml,
            "centre_mm": [float(v) for v in centre],
            "site": sites[int(np.argmax(owners))] if owners.any() else None,
            "records": [int(i) for i in np.flatnonzero(owners)],
            "pet_dprime": npw_dprime(s_pet, pet_noise, clutter_pet),
            "ct_dprime": npw_dprime(s_ct, ct_noise, clutter_ct),
        })
    out.sort(key=lambda e: -e["voxels"])
    return out


def detection_by_visibility(lesions: Sequence[dict], edges: Sequence[float] = DPRIME_EDGES,
                            rose: float = ROSE_DPRIME) -> List[Dict[str, object]]:
    """Lesions (entries with ``found``, ``pet_dprime``, ``ct_dprime``) binned by PET d' ([lo, hi)
    over ``edges``, open below and above): per bin the lesions, how many were found, how many of
    them CT shows (CT d' >= ``rose``) and how many of those were found."""
    bounds = [0.0] + sorted(float(e) for e in edges) + [math.inf]
    rows = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        inside = [e for e in lesions if lo <= float(e["pet_dprime"]) < hi]
        in_ct = [e for e in inside if float(e["ct_dprime"]) >= rose]
        rows.append({"min_dprime": lo, "max_dprime": hi, "lesions": len(inside),
                     "found": sum(1 for e in inside if e["found"]), "ct_visible": len(in_ct),
                     "ct_visible_found": sum(1 for e in in_ct if e["found"])})
    return rows


def dataset_visibility(dataset, draws: int = DEFAULT_DRAWS,
                       progress: Optional[Callable[[int, int], None]] = None, workers: int = 1) -> Dict[str, object]:
    """:func:`lesion_visibility` for every case of a ``veloxseg phantom --kind petct`` dataset
    (from its dataset.json: seed, size, scanner, lesion diameters, generator version), each case's label checked
    against the regenerated one. Raises InputError for a dataset the generator did not write.
    ``workers`` > 1 scores cases in that many processes (the same figures)."""
    import json
    import pathlib

    from .phantom import PHANTOM_VERSION, check_lesion_diameter

    if int(workers) < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")

    root = pathlib.Path(dataset)
    meta_path = root / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"'{meta_path}': cannot read it ({exc})") from exc
    ph = meta.get("veloxseg_phantom") if isinstance(meta, dict) else None
    if not isinstance(ph, dict) or ph.get("kind") != "petct":
        raise InputError(f"'{meta_path}': not a PET/CT phantom dataset written by `veloxseg phantom --kind petct` "
                          f"(no veloxseg_phantom record of kind petct); visibility needs the generator's own cases")
    if ph.get("version") != PHANTOM_VERSION:
        raise InputError(f"'{meta_path}': phantoms of generator version {ph.get('version')}; this VeloxSeg "
                          f"generates version {PHANTOM_VERSION} and cannot rebuild them")
    try:
        diameter = list(check_lesion_diameter(ph.get("lesion_diameter_mm")))
    except ConfigError as exc:
        raise InputError(f"'{meta_path}': its veloxseg_phantom record: {exc}") from exc
    cases = sorted(ph.get("cases") or {})
    out = {"dataset": str(root), "seed": int(ph["seed"]), "size": list(ph["size"]),
           "scanner": ph.get("scanner", "default"), "lesion_diameter_mm": diameter,
           "draws": int(draws), "rose_dprime": ROSE_DPRIME,
           "method": "non-prewhitening matched filter d' against the scanner's noise and the anatomy's texture "
                     "(VeloxSegLib.data.visibility)",
           "cases": {}}
    jobs = [(str(root / "labelsTr" / f"{case}{meta.get('file_ending', '.nii.gz')}"), int(case.rsplit("_", 1)[-1]),
             out["seed"], out["size"], out["scanner"], int(draws), diameter) for case in cases]
    workers = min(int(workers), max(1, len(jobs)))
    pool = None
    if workers == 1:
        results = map(_case_job, jobs)
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        # spawn: a forked copy of a process that already runs torch threads can deadlock
        pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
        results = pool.map(_case_job, jobs)  # in case order, computed ahead
    try:
        for i, (case, entries) in enumerate(zip(cases, results)):
            out["cases"][case] = entries
            if progress is not None:
                progress(i + 1, len(cases))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return out


def _case_job(job) -> List[Dict[str, object]]:
    """One case of :func:`dataset_visibility` (a process-pool job): read its label, score its lesions."""
    import SimpleITK as sitk

    from .io import read_image

    label_path, index, seed, size, scanner, draws, diameter = job
    label = sitk.GetArrayFromImage(read_image(label_path))
    try:
        return lesion_visibility(seed, index, size, scanner, draws, label=label, lesion_diameter_mm=diameter)
    except InputError as exc:
        raise InputError(f"'{label_path}': {exc}") from exc
