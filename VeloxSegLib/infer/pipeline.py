"""The inference pipeline: input files -> label map in the reference input's geometry.

One path for every entry point (CLI, Slicer logic, batch)::

    read + validate -> body box on the reference (first) channel's grid -> one resampling per
    channel straight onto the working grid (the body box at the bundle spacing) -> per-channel
    normalization -> sliding window (empty windows skipped, z-slab streaming) -> back onto the
    reference grid (class probabilities resampled linearly, then arg-max to uint8; pasted when
    the working grid is the reference's own) -> small-component removal.

:class:`Segmenter` holds a network and its :class:`InferencePlan` for repeated use;
:func:`predict_case` is the one-call form; :func:`predict_files` and :func:`predict_folder`
add atomic writing. See docs/inference.md for the design and its memory budget.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..errors import Cancelled, ConfigError, InputError
from .checks import check_input_order, check_values, warn_unmasked_background

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, float], None]

STAGES = ("read", "preprocess", "predict", "postprocess", "write", "done")


# --------------------------------------------------------------------------- plan


@dataclass
class InferencePlan:
    """Everything inference needs besides the weights (what a bundle's bundle.json holds).

    patch_size: window size in array/tensor order (z, y, x), the model's ``patch_size``.
    spacing: target spacing (x, y, z) mm, ITK order; None keeps the reference's spacing.
    channels: one dict per input image, in input order: ``{"name", "normalization": {...}}``.
    labels: ``[{"value", "name", ...}]`` with values 0..K-1.
    spacing_tolerance: relative difference per axis below which the input is used at its own
        spacing (no resampling; 2% is far inside training-time scale augmentation).
    body_threshold_hu: CT voxels above it are body; other modalities use "above the minimum".
    body_margin_mm: margin added around the body box.
    tta_axes: image axes ("x", "y", "z") mirror TTA flips: the axes the network saw mirrored in
        training. Flips it never saw are out of distribution: on the PET/CT demo, all 8 flips
        cost 0.02-0.10 lesion Dice where the z flip alone is within +-0.01 (docs/inference.md).
    pet_refine: None (off), or the settings of the PET border refinement
        (:mod:`VeloxSegLib.infer.petrefine`; missing settings take their defaults). Needs a
        channel whose ``modality`` is PET.
    orientation: ``"LPS"``: the network sees every volume with its array axes turned to run
        nearest to left, posterior, superior, as our trainer trains it
        (:mod:`VeloxSegLib.data.orientation`); None: arrays as the files store them (bundles
        that predate the field).
    """

    patch_size: Tuple[int, int, int]
    channels: List[Dict[str, Any]]
    labels: List[Dict[str, Any]]
    spacing: Optional[Tuple[float, float, float]] = None
    overlap: float = 0.25
    blending: str = "uniform"
    tta: bool = False
    tta_axes: Tuple[str, ...] = ("z",)
    min_component_mm3: float = 0.0
    crop_to_body: bool = True
    spacing_tolerance: float = 0.02
    body_threshold_hu: float = -500.0
    body_margin_mm: float = 10.0
    pet_refine: Optional[Dict[str, Any]] = None
    name: str = "model"
    orientation: Optional[str] = "LPS"

    def __post_init__(self):
        ps = self.patch_size
        if isinstance(ps, int):
            ps = (ps,) * 3
        self.patch_size = tuple(int(p) for p in ps)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(f"patch_size must be three positive integers, got {self.patch_size}")
        if self.spacing is not None:
            self.spacing = tuple(float(s) for s in self.spacing)
            if len(self.spacing) != 3 or min(self.spacing) <= 0:
                raise ConfigError(f"spacing must be three positive numbers, got {self.spacing}")
        if not self.channels:
            raise ConfigError("a plan needs at least one channel")
        if not 1 <= len(self.labels) <= 256:
            raise ConfigError(f"a plan needs 1 to 256 labels (uint8 label maps), got {len(self.labels)}")
        if not 0.0 <= float(self.overlap) < 1.0:
            raise ConfigError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.blending not in ("uniform", "gaussian"):
            raise ConfigError(f"blending must be 'uniform' or 'gaussian', got {self.blending!r}")
        self.tta_axes = check_tta_axes(self.tta_axes)
        from ..data.orientation import ORIENTATIONS

        if self.orientation is not None and self.orientation not in ORIENTATIONS:
            raise ConfigError(f"orientation must be one of {', '.join(ORIENTATIONS)} or None, got {self.orientation!r}")
        if self.pet_refine is not None:
            self.pet_refine = self.pet_refine_settings(self.pet_refine)

    def channel_of(self, modality: str) -> Optional[int]:
        """Index of the first channel whose modality is ``modality`` (any case), or None."""
        for i, c in enumerate(self.channels):
            if str(c.get("modality", "")).upper() == modality.upper():
                return i
        return None

    @property
    def pet_channel(self) -> Optional[int]:
        """Index of the first channel whose modality is PET, or None."""
        return self.channel_of("PET")

    @property
    def ct_channel(self) -> Optional[int]:
        """Index of the first channel whose modality is CT, or None (the PET refinement's lung rule)."""
        return self.channel_of("CT")

    def pet_refine_settings(self, settings: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """Checked PET refinement settings for this plan: ``settings`` over the defaults."""
        from .petrefine import pet_refine_settings

        out = pet_refine_settings(settings)
        if self.pet_channel is None:
            raise ConfigError(f"{self.name}: PET border refinement needs a PET channel; the model's inputs are "
                              f"{self.expected_inputs()}")
        values = [int(lb["value"]) for lb in self.labels]
        if int(out["label"]) not in values or int(out["label"]) == 0:
            raise ConfigError(f"{self.name}: PET border refinement label {out['label']} is not one of the model's "
                              f"foreground labels ({', '.join(str(v) for v in values if v)})")
        for key in ("fraction", "fraction_small", "lung_fraction"):
            if not 0.0 < float(out[key]) < 1.0:
                raise ConfigError(f"PET border refinement {key} must be in (0, 1), got {out[key]}")
        if not 0.0 < float(out["small_mm3"]) < float(out["large_mm3"]):
            raise ConfigError(f"PET border refinement needs 0 < small_mm3 < large_mm3, got {out['small_mm3']} "
                              f"and {out['large_mm3']}")
        return out

    @property
    def channel_names(self) -> List[str]:
        return [str(c.get("name", f"channel {i}")) for i, c in enumerate(self.channels)]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def expected_inputs(self) -> str:
        return ", ".join(f"{i + 1}) {n}" for i, n in enumerate(self.channel_names))

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "InferencePlan":
        """Build from a (validated) bundle.json dictionary, format version 1."""
        model = meta["model"]
        inf = dict(meta.get("inference") or {})
        return cls(
            patch_size=tuple(model["patch_size"]),
            spacing=tuple(meta["spacing"]) if meta.get("spacing") else None,
            channels=[dict(c) for c in meta["channels"]],
            labels=[dict(lb) for lb in meta["labels"]],
            overlap=float(inf.get("overlap", 0.25)),
            blending=str(inf.get("blending", "uniform")),
            tta=bool(inf.get("tta", False)),
            tta_axes=tuple(inf.get("tta_axes", ("z",))),
            min_component_mm3=float(inf.get("min_component_mm3", 0.0) or 0.0),
            crop_to_body=bool(inf.get("crop_to_body", True)),
            pet_refine=dict(inf["pet_refine"]) if inf.get("pet_refine") is not None else None,
            name=str(meta.get("name", "model")),
            orientation=meta.get("orientation"),
        )


@dataclass
class CasePrediction:
    """Result of one case. Unpacks as ``labels, probabilities = result``.

    labels: uint8 image with exactly the reference input's size, origin, spacing, direction.
    probabilities: float32 vector image (one component per class) on the same grid, or None.
    info: windows run/total, body box, working grid, seconds per stage.
    unrefined_labels: with ``predict(..., keep_unrefined=True)`` where the PET border refinement
        ran, the labels it started from (small components removed alike), else None.
    """

    labels: sitk.Image
    probabilities: Optional[sitk.Image] = None
    info: Dict[str, Any] = field(default_factory=dict)
    unrefined_labels: Optional[sitk.Image] = None

    def __iter__(self):
        return iter((self.labels, self.probabilities))


# --------------------------------------------------------------------------- helpers


def _is_cancelled(cancel) -> bool:
    if cancel is None:
        return False
    return bool(cancel.is_set() if hasattr(cancel, "is_set") else cancel())


def _check_cancel(cancel) -> None:
    if _is_cancelled(cancel):
        raise Cancelled("cancelled")


class _Progress:
    """Calls ``fn(stage, fraction)``; never lets a reporting error kill the run."""

    def __init__(self, fn: Optional[ProgressFn]):
        self.fn = fn

    def __call__(self, stage: str, fraction: float) -> None:
        if self.fn is not None:
            self.fn(stage, float(min(max(fraction, 0.0), 1.0)))


def _model_output(y):
    """Tolerate networks whose eval forward returns a list/tuple/TrainOutput: the first map."""
    if hasattr(y, "logits"):
        y = y.logits
    if isinstance(y, (list, tuple)):
        y = y[0]
    return y


#: Segmenter precisions: fp32 (default) and the opt-in CPU bfloat16.
PRECISIONS = ("fp32", "bf16")

#: Tensor dimension of each image axis in a (N, C, z, y, x) batch.
_AXIS_DIM = {"z": 2, "y": 3, "x": 4}


def check_tta_axes(axes) -> Tuple[str, ...]:
    """Validated mirror axes, in x, y, z order; ConfigError names a bad one."""
    if isinstance(axes, str):
        axes = (axes,)
    out = tuple(str(a) for a in axes)
    bad = [a for a in out if a not in _AXIS_DIM]
    if bad or len(set(out)) != len(out):
        raise ConfigError(f"TTA axes must be distinct axes out of x, y, z; got {', '.join(out) or 'none'}")
    return tuple(a for a in ("x", "y", "z") if a in out)


def mirror_flips(axes: Sequence[str]) -> List[Tuple[int, ...]]:
    """The tensor dims of every non-empty combination of flips of ``axes`` (2^len - 1 of them)."""
    dims = sorted(_AXIS_DIM[a] for a in check_tta_axes(axes))
    return [tuple(d for i, d in enumerate(dims) if mask >> i & 1) for mask in range(1, 1 << len(dims))]


class _WindowPredictor:
    """Runs the network on a CPU batch of windows: device transfer, autocast, mirror TTA,
    and the out-of-memory ladder (halve the batch, then fall back to the CPU)."""

    def __init__(self, model, device, tta: bool, max_batch: int, dtype=None, tta_axes: Sequence[str] = ("z",)):
        self.model = model
        self.device = device
        self.tta = tta
        self.flips = mirror_flips(tta_axes) if tta else []
        self.max_batch = max(int(max_batch), 1)
        self.dtype = dtype  # None: the inputs' float32; torch.bfloat16 for a bf16 network
        self.fell_back = False

    def _forward(self, x):
        import torch

        from .device import autocast

        with autocast(self.device):
            y = _model_output(self.model(x)).float()
            if self.flips:
                for dims in self.flips:
                    y += torch.flip(_model_output(self.model(torch.flip(x, dims))).float(), dims)
                y /= len(self.flips) + 1
        return y

    def __call__(self, batch):
        import torch

        from .device import empty_cache, is_oom

        outs = []
        i = 0
        while i < batch.shape[0]:
            chunk = batch[i:i + self.max_batch]
            try:
                x = chunk.to(self.device, dtype=self.dtype, non_blocking=True)
                y = self._forward(x).to("cpu")
            except Exception as exc:  # noqa: BLE001 - only OOM is handled, others re-raised
                if not is_oom(exc) or self.device.type == "cpu":
                    raise
                empty_cache(self.device)
                if self.max_batch > 1:
                    self.max_batch //= 2
                    log.warning("out of GPU memory; retrying with %d window(s) per batch", self.max_batch)
                else:
                    warnings.warn("out of GPU memory with one window per batch; continuing on the CPU")
                    log.warning("out of GPU memory with one window per batch; continuing on the CPU")
                    self.device = torch.device("cpu")
                    self.model = self.model.to(self.device).float()
                    self.dtype = None
                    self.fell_back = True
                continue
            outs.append(y)
            i += chunk.shape[0]
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _body_box_own(arr: np.ndarray, threshold: float) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Index box (x, y, z) lo..hi (exclusive) of voxels > threshold in an array (z, y, x)."""
    mask = arr > threshold
    zany = mask.any(axis=(1, 2))
    if not zany.any():
        return None
    zs = np.flatnonzero(zany)
    z0, z1 = int(zs[0]), int(zs[-1]) + 1
    plane = mask[z0:z1].any(axis=0)  # (y, x)
    del mask
    ys = np.flatnonzero(plane.any(axis=1))
    xs = np.flatnonzero(plane.any(axis=0))
    return np.array([xs[0], ys[0], z0]), np.array([xs[-1] + 1, ys[-1] + 1, z1])


def _body_threshold(spec: Mapping, norm, plan: InferencePlan) -> float:
    if spec.get("scheme") == "ct":
        return float(plan.body_threshold_hu)
    return float(norm.background)


def _body_channels(plan: InferencePlan) -> List[int]:
    """CT channels define the body when there are any (PET/MRI background is noisy)."""
    ct = [i for i, c in enumerate(plan.channels) if (c.get("normalization") or {}).get("scheme") == "ct"]
    if ct:
        return ct
    return [i for i, c in enumerate(plan.channels) if (c.get("normalization") or {}).get("scheme") != "none"] or [0]


# --------------------------------------------------------------------------- segmenter


class Segmenter:
    """A network ready for inference plus its plan; call :meth:`predict` per case.

    model: a bundle (anything with ``.meta`` and ``.build_model(device)``), a bundle path or
        name (loaded with ``VeloxSegLib.bundle.load_bundle``), or a torch module (then ``plan``
        is required); or a list of these, an ensemble (:mod:`VeloxSegLib.infer.ensemble`). The
        members must share inputs and labels. Members of one configuration (normalization,
        spacing, orientation, window: the folds of a cross-validation) share every window and
        their logits are averaged; members of different configurations each predict on their
        own grid and the configurations' class probabilities are averaged on the first input's
        grid (:attr:`configurations`). The first member's post-processing is used.
    precision: ``"fp32"`` (default) or ``"bf16"``: opt-in bfloat16 weights and activations on
        the CPU (1.1-1.3x faster than fp32 for veloxseg-b on CPUs with AVX512-BF16 or AMX in our
        runs, see docs/benchmarks.md; logits differ from fp32 by bf16 rounding, see
        docs/inference.md). On a GPU the network runs under float16 autocast as usual, and
        ``"bf16"`` is ignored with a warning.
    """

    def __init__(self, model, plan: Optional[InferencePlan] = None, *, device: str = "auto",
                 threads: Optional[int] = None, batch_size: Optional[int] = None, precision: str = "fp32"):
        import torch

        from .device import cpu_has_native_bf16, default_batch_size, resolve_device, set_threads

        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if batch_size is not None and int(batch_size) < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        if precision == "bf16" and self.device.type != "cpu":
            warnings.warn(f"precision bf16 is a CPU option; on {self.device.type} the network runs under float16 "
                          f"autocast as usual")
            precision = "fp32"
        if precision == "bf16" and not cpu_has_native_bf16():
            warnings.warn("this CPU has no native bfloat16 (AVX512-BF16 or AMX): bf16 will be slower than fp32")
        self.precision = precision
        self.threads = threads
        if threads is not None:
            set_threads(threads)
        members = list(model) if isinstance(model, (list, tuple)) else [model]
        if not members:
            raise ConfigError("no model given")
        nets, plans, names, bundles = [], [], [], []
        for m in members:
            if isinstance(m, (str, os.PathLike)):
                from ..bundle import load_bundle

                m = load_bundle(m)
            if hasattr(m, "meta") and hasattr(m, "build_model"):
                bundles.append(m)
                plans.append(InferencePlan.from_meta(m.meta))
                names.append(f"'{m.path}'" if getattr(m, "path", None) else f"'{plans[-1].name}'")
                nets.append(m.build_model(self.device))
            elif isinstance(m, torch.nn.Module):
                if plan is None:
                    raise ConfigError("a plan is required when predicting with a bare network")
                plans.append(plan)
                names.append(f"network {len(nets) + 1}")
                nets.append(m)
            else:
                raise ConfigError(f"cannot predict with a {type(m).__name__}; pass a bundle, its path, or a network")
        #: the bundles behind the model (one, or an ensemble's members); the first is ``bundle``
        self.bundles = bundles
        self.bundle = bundles[0] if len(bundles) == len(nets) else None
        from .ensemble import MeanOfNetworks, check_members, group_configurations

        def flat(group):  # an ensemble bundle among several: its networks join the others, each weighing the same
            return [m for n in group for m in (n.members if isinstance(n, MeanOfNetworks) else [n])]

        #: the ensemble's configurations as Segmenters of their own (empty: one configuration)
        self.parts: List["Segmenter"] = []
        self.batch_size = int(batch_size) if batch_size is not None else default_batch_size(self.device)
        if len(nets) > 1:
            if plan is not None:  # a caller's plan applies to every member: each must fit it
                plans, names = [plan] + plans, ["the given plan"] + names
                check_members(plans, names)
                groups = [list(range(len(nets)))]
            else:
                groups = group_configurations(plans)
                check_members(plans, names, configurations=len(groups) > 1)
            net = MeanOfNetworks(flat(nets))  # with several configurations: for ``members`` (each part runs its own)
            unique = list(dict.fromkeys(p.name for p in plans))
            shown = " + ".join(unique) + (f" ({len(net.members)} networks)" if len(unique) < len(net.members) else "")
            plan = plan or replace(plans[0], name=shown)
            if len(groups) > 1:
                self.parts = [Segmenter(MeanOfNetworks(flat([nets[i] for i in g])), plans[g[0]], device=device,
                                        batch_size=self.batch_size) for g in groups]
        else:
            plan, net = plan or plans[0], nets[0]
        #: how many networks predict (an ensemble's members, else 1)
        self.members = len(net.members) if isinstance(net, MeanOfNetworks) else 1
        #: how many configurations predict each case (their probabilities averaged when more than 1)
        self.configurations = max(1, len(self.parts))
        self.plan = plan
        self.model = net.to(self.device).eval()
        if precision == "bf16":  # a caller's own network is converted on a copy, not in place
            self.model = (self.model if self.bundle is not None else copy.deepcopy(self.model)).to(torch.bfloat16)
        for part in self.parts:  # the parts hold the same network objects: converted once, above
            part.precision = self.precision

    # ---------------------------------------------------------------- inputs

    def _read(self, inputs, progress: _Progress, cancel) -> Tuple[List[sitk.Image], List[str]]:
        from ..data.io import check_image, read_image

        plan = self.plan
        inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        if len(inputs) != len(plan.channels):
            raise InputError(f"model '{plan.name}' expects {len(plan.channels)} input image(s) in this order: "
                             f"{plan.expected_inputs()}; got {len(inputs)}")
        check_input_order(["" if isinstance(x, sitk.Image) else os.fspath(x) for x in inputs], plan)
        images, names = [], []
        progress("read", 0.0)
        for i, (item, cname) in enumerate(zip(inputs, plan.channel_names)):
            _check_cancel(cancel)
            if isinstance(item, sitk.Image):
                name = f"{cname} (input {i + 1})"
                images.append(check_image(item, name))
            elif hasattr(item, "take"):  # io.PrefetchedImage: already being read; we own it now
                name = f"'{os.fspath(item)}'"
                images.append(item.take())
            else:
                name = f"'{os.fspath(item)}'"
                images.append(read_image(item))
            names.append(name)
            progress("read", (i + 1) / len(inputs))
        check_values(images, names, plan)
        warn_unmasked_background(images, names, plan)
        return images, names

    # ---------------------------------------------------------------- main

    def predict(self, inputs, *, overlap: Optional[float] = None, tta: Optional[bool] = None,
                tta_axes: Optional[Sequence[str]] = None, blending: Optional[str] = None, probabilities: bool = False,
                min_component_mm3: Optional[float] = None, crop_to_body: Optional[bool] = None,
                pet_refine=None, keep_unrefined: bool = False, progress: Optional[ProgressFn] = None,
                cancel=None) -> CasePrediction:
        """Segment one case. ``inputs``: paths or SimpleITK images in the plan's channel order.

        Options left as None take the plan's (bundle's) defaults. ``tta`` averages the mirror
        flips of ``tta_axes`` (default: the plan's, the axes mirrored in training).
        ``pet_refine``: False turns the PET border refinement off, True turns it on (with the
        plan's settings, else the defaults), a mapping turns it on with those settings. The
        returned probabilities are always the network's; the refinement changes the labels.
        ``keep_unrefined`` also returns the labels as they were before the refinement (what
        ``pet_refine=False`` gives), from the same network pass.
        """
        import torch

        from ..data.alignment import Grid, check_overlap, resample_to_grid, working_grid
        from ..data.normalization import fit_normalizer
        from .postprocess import labels_from_logits, probabilities_from_logits, probabilities_to_grid
        from .sliding_window import stream_windows

        if self.parts:
            return self._predict_configurations(
                inputs, overlap=overlap, tta=tta, tta_axes=tta_axes, blending=blending, probabilities=probabilities,
                min_component_mm3=min_component_mm3, crop_to_body=crop_to_body, pet_refine=pet_refine,
                keep_unrefined=keep_unrefined, progress=progress, cancel=cancel)
        plan = self.plan
        overlap = plan.overlap if overlap is None else float(overlap)
        if not 0.0 <= overlap < 1.0:
            raise ConfigError(f"overlap must be in [0, 1), got {overlap}")
        tta = plan.tta if tta is None else bool(tta)
        tta_axes = plan.tta_axes if tta_axes is None else check_tta_axes(tta_axes)
        if tta and not tta_axes:
            warnings.warn(f"{plan.name} records no mirror axes (it was trained without flips): TTA changes nothing")
        blending = plan.blending if blending is None else blending
        min_mm3, refine = self._post_settings(min_component_mm3, pet_refine)
        crop = plan.crop_to_body if crop_to_body is None else bool(crop_to_body)
        report = _Progress(progress)
        times: Dict[str, float] = {}
        t0 = time.perf_counter()

        # 1. read and validate
        images, names = self._read(inputs, report, cancel)
        check_overlap(images, names)
        times["read"] = time.perf_counter() - t0
        ref = Grid.of(images[0])
        t = time.perf_counter()
        report("preprocess", 0.0)

        # 2. statistics on each channel's own voxels; body box on the reference grid
        specs = [dict(c.get("normalization") or {"scheme": "none"}) for c in plan.channels]
        views = [sitk.GetArrayViewFromImage(img) for img in images]
        norms = [fit_normalizer(v, s) for v, s in zip(views, specs)]
        body_ch = _body_channels(plan)
        lo = np.zeros(3, dtype=np.int64)
        hi = np.asarray(ref.size, dtype=np.int64)
        body_found = True
        if crop:
            boxes = []
            for i in body_ch:
                b = _body_box_own(views[i], _body_threshold(specs[i], norms[i], plan))
                if b is None:
                    continue
                if i == 0 or Grid.of(images[i]).same_as(ref):
                    boxes.append(b)
                else:  # the channel's box, carried into reference index space
                    g = Grid.of(images[i]).crop(*b)
                    from ..data.alignment import index_box

                    blo, bhi = index_box(ref, g)
                    boxes.append((np.floor(blo + 0.5).astype(np.int64), np.ceil(bhi + 0.5).astype(np.int64)))
            if boxes:
                margin = np.ceil(plan.body_margin_mm / np.asarray(ref.spacing)).astype(np.int64)
                lo = np.maximum(np.min([b[0] for b in boxes], axis=0) - margin, 0)
                hi = np.minimum(np.max([b[1] for b in boxes], axis=0) + margin, ref.size)
                body_found = bool(np.all(hi > lo))
            else:
                body_found = False
        _check_cancel(cancel)
        K = plan.num_classes
        info: Dict[str, Any] = {"reference_size": ref.size, "body_box": (lo.tolist(), hi.tolist())}

        if not body_found:
            log.warning("no body voxels found in the inputs; the segmentation is empty")
            report("preprocess", 1.0)
            report("predict", 1.0)
            labels = sitk.Image([int(s) for s in ref.size], sitk.sitkUInt8)
            ref.stamp(labels)
            probs = None
            if probabilities:
                arr = np.zeros(ref.shape + (K,), dtype=np.float32)
                arr[..., 0] = 1.0
                probs = ref.stamp(sitk.GetImageFromArray(arr, isVector=True))
            info.update(windows_run=0, windows_total=0, times=times)
            report("postprocess", 1.0)
            return CasePrediction(labels, probs, info)

        crop_grid = ref.crop(lo, hi)
        # the network sees the arrays turned to the bundle's orientation; the plan's spacing is
        # per world axis, laid onto the reference's stored axes
        axes, work, resample = working_grid(crop_grid, plan.spacing, plan.orientation, plan.spacing_tolerance)
        info.update(working_size=work.size, working_spacing=work.spacing, resampled=resample,
                    reoriented=not axes.is_identity)
        (x0, y0, z0), (x1, y1, z1) = lo.tolist(), hi.tolist()

        # 3. one resampling per channel onto the working grid, body mask, normalization
        C = len(images)
        # the buffers are laid out in the network's orientation; each channel is written through a
        # view that has the working grid's own axes (a transpose and flips: exact, no extra copy)
        net_shape = axes.canonical_shape(work.shape)
        inp = torch.empty((C,) + net_shape, dtype=torch.float32)
        arr_in = inp.numpy()
        body = np.zeros(net_shape, dtype=bool) if crop else None
        for i, img in enumerate(images):
            _check_cancel(cancel)
            channel = axes.to_stored(arr_in[i])
            if not resample and (i == 0 or Grid.of(img).same_as(ref)):
                channel[...] = views[i][z0:z1, y0:y1, x0:x1]
            else:
                res = resample_to_grid(img, work, default=norms[i].background)
                channel[...] = sitk.GetArrayViewFromImage(res)
                del res
            if body is not None and i in body_ch:
                body |= arr_in[i] > _body_threshold(specs[i], norms[i], plan)
            norms[i].apply(arr_in[i])
            report("preprocess", (i + 1) / C)
        pad_values = [n.normalized_background for n in norms]
        pet_image, ct_image = _refine_images(images, plan, refine)
        del views, images  # the caller's images live on in the caller; ours are freed here
        times["preprocess"] = time.perf_counter() - t
        t = time.perf_counter()

        # 4. sliding window, streamed in z-slabs. On the reference's own grid the slabs become
        # uint8 labels at once; on a resampled working grid they are kept as class probabilities
        # (float16, the lesion probability alone for two classes) for step 5
        n_scores = K if probabilities or K != 2 else 1
        labels_w = None if resample else torch.zeros(net_shape, dtype=torch.uint8)
        probs_w = torch.empty((n_scores,) + net_shape, dtype=torch.float32 if probabilities else torch.float16) \
            if probabilities or resample or refine is not None else None
        predictor = _WindowPredictor(self.model, self.device, tta, self.batch_size,
                                     dtype=torch.bfloat16 if self.precision == "bf16" else None, tta_axes=tta_axes)
        counts = {"run": 0, "total": 0}

        def on_windows(done, total):
            counts["run"], counts["total"] = done, total
            report("predict", done / total if total else 1.0)

        report("predict", 0.0)
        with torch.inference_mode():
            for zs, ze, acc, weight in stream_windows(
                    inp, plan.patch_size, predictor, overlap=overlap, blending=blending,
                    batch_size=self.batch_size, pad_value=pad_values, body=body, progress=on_windows,
                    cancel=cancel, num_classes=K):
                if labels_w is not None:
                    labels_from_logits(acc, out=labels_w[zs:ze])
                if probs_w is not None:
                    probs_w[:, zs:ze] = probabilities_from_logits(acc, weight)[K - n_scores:]
        del inp, arr_in, body
        if not axes.is_identity:  # back to the working grid's own axes
            labels_w = None if labels_w is None else axes.to_stored(labels_w).contiguous()
            probs_w = None if probs_w is None else axes.to_stored(probs_w).contiguous()
        if predictor.fell_back:
            info["fell_back_to_cpu"] = True
        report("predict", 1.0)
        times["predict"] = time.perf_counter() - t
        t = time.perf_counter()
        _check_cancel(cancel)
        report("postprocess", 0.0)

        # 5. back onto the reference grid: pasted when the working grid is the body box itself;
        # otherwise the probabilities are resampled linearly and the arg-max is taken there
        # (nnU-Net's order), then small components are removed at the output's own spacing
        out = np.zeros(ref.shape, dtype=np.uint8)
        out_crop = out[z0:z1, y0:y1, x0:x1]
        parr = None
        if probabilities:
            parr = np.zeros(ref.shape + (K,), dtype=np.float32)
            parr[..., 0] = 1.0
        score = None  # the refined label's probability on the body box of the reference grid (float16:
        if refine is not None:  # half the memory on a fine CT; 5e-4 steps near 0.5, where the rule decides)
            score = np.zeros(crop_grid.shape, dtype=np.float16)
        if resample:
            probabilities_to_grid(probs_w, work, crop_grid, K, out_crop,
                                  None if parr is None else parr[z0:z1, y0:y1, x0:x1],
                                  cancel=cancel, progress=lambda f: report("postprocess", 0.9 * f),
                                  score_out=score, score_class=refine["label"] if refine else 1)
        else:
            out_crop[...] = labels_w.numpy()
            if parr is not None:
                parr[z0:z1, y0:y1, x0:x1] = np.moveaxis(probs_w.numpy(), 0, -1)
            if score is not None:
                score[...] = probs_w[refine["label"] if n_scores == K else 0].float().numpy()
        del labels_w, probs_w, out_crop
        labels, unrefined = _post_process(out, (lo, hi), ref, crop_grid, score, pet_image, refine, min_mm3,
                                          keep_unrefined, info, cancel, ct_image=ct_image)
        del out, score, pet_image, ct_image
        probs = None
        if parr is not None:
            probs = ref.stamp(sitk.GetImageFromArray(parr, isVector=True))
            del parr
        report("postprocess", 1.0)
        times["postprocess"] = time.perf_counter() - t
        info.update(windows_run=counts["run"], windows_total=counts["total"], times=times, networks=self.members)
        return CasePrediction(labels, probs, info, unrefined)

    def _post_settings(self, min_component_mm3, pet_refine) -> Tuple[float, Optional[Dict[str, Any]]]:
        plan = self.plan
        min_mm3 = plan.min_component_mm3 if min_component_mm3 is None else float(min_component_mm3)
        if not (math.isfinite(min_mm3) and min_mm3 >= 0):
            raise ConfigError(f"smallest component must be a volume >= 0 mm^3, got {min_component_mm3}")
        if pet_refine is None:
            refine = plan.pet_refine
        elif isinstance(pet_refine, Mapping):
            refine = plan.pet_refine_settings(pet_refine)
        else:
            refine = plan.pet_refine_settings(plan.pet_refine) if pet_refine else None
        return min_mm3, refine

    def _predict_configurations(self, inputs, *, overlap, tta, tta_axes, blending, probabilities, min_component_mm3,
                                crop_to_body, pet_refine, keep_unrefined, progress, cancel) -> CasePrediction:
        """An ensemble of configurations: each part predicts the case (its own grid, window and
        normalization; the options left as None take the part's own) and brings its class
        probabilities onto the reference grid; their mean, each configuration weighing the same,
        gives the arg-max, then the first member's post-processing runs once."""
        from ..data.alignment import Grid, check_overlap

        plan = self.plan
        min_mm3, refine = self._post_settings(min_component_mm3, pet_refine)
        report = _Progress(progress)
        t0 = time.perf_counter()
        images, names = self._read(inputs, report, cancel)  # once, checked once; each part takes the images
        check_overlap(images, names)
        ref = Grid.of(images[0])
        times: Dict[str, float] = {"read": time.perf_counter() - t0}
        n = len(self.parts)
        total: Optional[np.ndarray] = None
        lo, hi = np.asarray(ref.size, dtype=np.int64), np.zeros(3, dtype=np.int64)
        runs = {"windows_run": 0, "windows_total": 0}
        parts_info = []
        report("predict", 0.0)
        for j, part in enumerate(self.parts):
            def part_progress(stage, fraction, j=j):
                if stage == "predict":
                    report("predict", (j + fraction) / n)

            result = part.predict(images, overlap=overlap, tta=tta, tta_axes=tta_axes, blending=blending,
                                  probabilities=True, min_component_mm3=0.0, crop_to_body=crop_to_body,
                                  pet_refine=False, progress=part_progress, cancel=cancel)
            p = sitk.GetArrayViewFromImage(result.probabilities)
            if total is None:
                total = np.array(p, dtype=np.float32)
            else:
                total += p
            del p, result.probabilities
            info = result.info
            if info.get("windows_run"):  # the body box this configuration searched (none when it found no body)
                lo = np.minimum(lo, info["body_box"][0])
                hi = np.maximum(hi, info["body_box"][1])
            for key in runs:
                runs[key] += int(info.get(key, 0))
            parts_info.append({k: info[k] for k in ("working_size", "working_spacing", "resampled", "times")
                               if k in info})
        total /= n
        _check_cancel(cancel)
        report("postprocess", 0.0)
        t = time.perf_counter()
        out = np.argmax(total, axis=-1).astype(np.uint8)
        info: Dict[str, Any] = {"reference_size": ref.size, "configurations": parts_info, **runs}
        labels, unrefined = None, None
        if np.all(hi > lo):
            crop_grid = ref.crop(lo, hi)
            (x0, y0, z0), (x1, y1, z1) = lo.tolist(), hi.tolist()
            score = None
            if refine is not None:
                score = total[z0:z1, y0:y1, x0:x1, refine["label"]].astype(np.float16)
            pet_image, ct_image = _refine_images(images, plan, refine)
            labels, unrefined = _post_process(out, (lo, hi), ref, crop_grid, score, pet_image, refine, min_mm3,
                                              keep_unrefined, info, cancel, ct_image=ct_image)
            info["body_box"] = (lo.tolist(), hi.tolist())
        else:  # no configuration found a body: every probability is background's
            labels = ref.stamp(sitk.GetImageFromArray(out))
            info["body_box"] = ([0, 0, 0], list(ref.size))
        del out
        probs = ref.stamp(sitk.GetImageFromArray(total, isVector=True)) if probabilities else None
        del total
        report("postprocess", 1.0)
        times["postprocess"] = time.perf_counter() - t
        times["total"] = time.perf_counter() - t0
        info.update(times=times, networks=self.members)
        return CasePrediction(labels, probs, info, unrefined)


def _refine_images(images, plan: InferencePlan, refine) -> Tuple[Optional[sitk.Image], Optional[sitk.Image]]:
    """The PET and CT inputs the PET border refinement reads (None where it is off, and CT None
    where the model has no CT input)."""
    if refine is None:
        return None, None
    return images[plan.pet_channel], None if plan.ct_channel is None else images[plan.ct_channel]


def _post_process(out: np.ndarray, box, ref, crop_grid, score, pet_image, refine, min_mm3: float,
                  keep_unrefined: bool, info: Dict[str, Any], cancel,
                  ct_image=None) -> Tuple[sitk.Image, Optional[sitk.Image]]:
    """The steps after the arg-max, on the labels ``out`` (the reference grid's array, changed in
    place) within ``box`` (the body box, ``crop_grid``): the PET border refinement (``score``:
    the refined label's probability on the box; ``ct_image``, when the model has a CT input,
    for its lung rule), then the smallest-component removal. Returns the labels and, with
    ``keep_unrefined``, those from before the refinement."""
    from ..data.alignment import resample_to_grid
    from .postprocess import remove_small_components

    (x0, y0, z0), (x1, y1, z1) = [int(v) for v in box[0]], [int(v) for v in box[1]]
    out_crop = out[z0:z1, y0:y1, x0:x1]
    unrefined = out.copy() if refine is not None and keep_unrefined else None
    if refine is not None:
        from .petrefine import refine_with_pet

        def of_box(image, default):  # the image on voxels blo..bhi of the box; ``default`` outside its view
            return lambda blo, bhi: sitk.GetArrayFromImage(
                resample_to_grid(image, crop_grid.crop(blo, bhi), default=default))

        info["pet_refine"] = refine_with_pet(out_crop, score, of_box(pet_image, 0.0), crop_grid.spacing, refine,
                                             cancel=cancel,  # outside the CT's field of view: air
                                             ct_of_box=None if ct_image is None else of_box(ct_image, -1000.0))
    if min_mm3 > 0:
        remove_small_components(out_crop, crop_grid.spacing, min_mm3)
        if unrefined is not None:
            remove_small_components(unrefined[z0:z1, y0:y1, x0:x1], crop_grid.spacing, min_mm3)
    labels = ref.stamp(sitk.GetImageFromArray(out))
    if unrefined is not None:
        unrefined = ref.stamp(sitk.GetImageFromArray(unrefined))
    return labels, unrefined


def predict_case(model, inputs, *, plan: Optional[InferencePlan] = None, device: str = "auto",
                 threads: Optional[int] = None, batch_size: Optional[int] = None, precision: str = "fp32",
                 overlap: Optional[float] = None,
                 tta: Optional[bool] = None, tta_axes: Optional[Sequence[str]] = None,
                 blending: Optional[str] = None, probabilities: bool = False,
                 min_component_mm3: Optional[float] = None, crop_to_body: Optional[bool] = None,
                 pet_refine=None, keep_unrefined: bool = False, progress: Optional[ProgressFn] = None,
                cancel=None) -> CasePrediction:
    """Segment one case: ``labels, probabilities = predict_case(bundle, [ct, pet])``.

    model: a bundle, bundle path/name, a :class:`Segmenter`, or a network with ``plan``.
    inputs: file paths (or DICOM folders) or SimpleITK images, in the plan's channel order.
    progress(stage, fraction) is called with stages ``read, preprocess, predict, postprocess``;
    cancel is a threading.Event or a callable returning True to stop (raises Cancelled).
    """
    seg = model if isinstance(model, Segmenter) else Segmenter(model, plan, device=device, threads=threads,
                                                               batch_size=batch_size, precision=precision)
    return seg.predict(inputs, overlap=overlap, tta=tta, tta_axes=tta_axes, blending=blending,
                       probabilities=probabilities,
                       min_component_mm3=min_component_mm3, crop_to_body=crop_to_body, pet_refine=pet_refine,
                       progress=progress, cancel=cancel)


# --------------------------------------------------------------------------- files


def _write_atomically(items: Sequence[Tuple[sitk.Image, Path]], *, overwrite: bool, cancel) -> None:
    """Write every image to a temporary sibling, then rename all into place (or none)."""
    from ..data.io import _first_line, temporary_path_for

    tmps: List[Tuple[Path, Path]] = []
    try:
        for image, path in items:
            tmp = temporary_path_for(path)
            tmps.append((tmp, path))
            try:
                sitk.WriteImage(image, str(tmp), True)
            except RuntimeError as exc:
                raise InputError(f"'{path}': cannot write image ({_first_line(exc)})") from None
            _check_cancel(cancel)
        for _, path in tmps:
            if path.exists() and not overwrite:
                raise InputError(f"'{path}': output exists (pass --overwrite to replace it)")
        for tmp, path in tmps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in tmps:
            if tmp.exists():
                try:
                    tmp.unlink()
                except OSError:  # pragma: no cover
                    log.warning("could not remove temporary file %s", tmp)


_DEFAULT_COLORS = [(230, 80, 60), (60, 160, 230), (80, 200, 90), (240, 200, 50), (170, 90, 210), (240, 140, 40),
                   (60, 210, 200), (220, 90, 160)]


def add_segment_metadata(labels: sitk.Image, plan_labels: Sequence[Mapping[str, Any]]) -> sitk.Image:
    """Describe each non-background label as a Slicer segment (name, color, label value) in the
    image's metadata, so a ``.seg.nrrd`` opens in 3D Slicer as a named, colored segmentation."""
    fg = [lb for lb in plan_labels if int(lb.get("value", 0)) != 0]
    labels.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    labels.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    labels.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    size = labels.GetSize()
    for i, lb in enumerate(fg):
        rgb = lb.get("color") or _DEFAULT_COLORS[i % len(_DEFAULT_COLORS)]
        key = f"Segment{i}_"
        labels.SetMetaData(key + "ID", f"Segment_{int(lb['value'])}")
        labels.SetMetaData(key + "Name", str(lb.get("name", f"label {lb['value']}")))
        labels.SetMetaData(key + "Color", " ".join(f"{c / 255.0:.6g}" for c in rgb))
        labels.SetMetaData(key + "ColorAutoGenerated", "0" if lb.get("color") else "1")
        labels.SetMetaData(key + "LabelValue", str(int(lb["value"])))
        labels.SetMetaData(key + "Layer", "0")
        labels.SetMetaData(key + "Extent", f"0 {size[0] - 1} 0 {size[1] - 1} 0 {size[2] - 1}")
        labels.SetMetaData(key + "Tags", "|")
    return labels


def predict_files(model, inputs: Sequence[Union[str, os.PathLike]], output: Union[str, os.PathLike], *,
                  probabilities_path: Optional[Union[str, os.PathLike]] = None, overwrite: bool = False,
                  progress: Optional[ProgressFn] = None, cancel=None, **options) -> CasePrediction:
    """:func:`predict_case` on files, writing the uint8 labels (and optionally the per-class
    probabilities, a float32 vector image) atomically. Output paths are checked before any work:
    existing folder, no existing file unless ``overwrite``, not one of the inputs."""
    from ..data.io import check_output_path

    out = check_output_path(output, overwrite=overwrite, inputs=inputs)
    items = [out]
    if probabilities_path is not None:
        pp = check_output_path(probabilities_path, overwrite=overwrite, inputs=inputs)
        if pp.resolve() == out.resolve():
            raise InputError(f"'{pp}': probabilities and labels need different files")
        items.append(pp)
    seg = model if isinstance(model, Segmenter) else Segmenter(
        model, options.pop("plan", None), device=options.pop("device", "auto"),
        threads=options.pop("threads", None), batch_size=options.pop("batch_size", None),
        precision=options.pop("precision", "fp32"))
    result = seg.predict(inputs, probabilities=probabilities_path is not None, progress=progress, cancel=cancel,
                         **options)
    _check_cancel(cancel)
    if progress:
        progress("write", 0.0)
    if out.name.lower().endswith(".seg.nrrd"):
        add_segment_metadata(result.labels, seg.plan.labels)
    images = [result.labels] + ([result.probabilities] if probabilities_path is not None else [])
    _write_atomically(list(zip(images, items)), overwrite=overwrite, cancel=cancel)
    if progress:
        progress("write", 1.0)
    return result


_CASE_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})(?P<ext>\.nii\.gz|\.nii|\.nrrd|\.mha|\.nhdr|\.mhd)$", re.I)


def find_cases(folder: Union[str, os.PathLike], n_channels: int,
               channel_names: Optional[Sequence[str]] = None) -> List[Tuple[str, List[Path], str]]:
    """Cases of an nnU-Net style folder (``case_0000.nii.gz``, ``case_0001.nii.gz``, ...):
    ``[(case_id, [channel paths in order], file ending)]``, sorted by case id."""
    folder = Path(os.fspath(folder))
    if not folder.is_dir():
        raise InputError(f"'{folder}': no such folder")
    cases: Dict[str, Dict[int, Path]] = {}
    exts: Dict[str, str] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        m = _CASE_RE.match(p.name)
        if not m:
            continue
        cases.setdefault(m["case"], {})[int(m["ch"])] = p
        exts.setdefault(m["case"], m["ext"])
    if not cases:
        raise InputError(f"'{folder}': no images named like CASE_0000.nii.gz (nnU-Net naming)")
    names = list(channel_names or [f"channel {i}" for i in range(n_channels)])
    want = set(range(n_channels))
    out = []
    for case in sorted(cases):
        have = cases[case]
        if set(have) != want:
            expect = ", ".join(f"{case}_{i:04d} ({names[i]})" for i in range(n_channels))
            found = ", ".join(sorted(p.name for p in have.values()))
            raise InputError(f"'{folder}': case '{case}' needs {n_channels} file(s): {expect}; found {found}")
        out.append((case, [have[i] for i in range(n_channels)], exts[case]))
    return out


def predict_folder(model, input_dir, output_dir, *, overwrite: bool = False,
                   progress: Optional[Callable[[str, float, str], None]] = None, cancel=None,
                   **options) -> Dict[str, CasePrediction]:
    """Segment every case of an nnU-Net style folder into ``output_dir/CASE.<ending>``.

    The output folder is created if its parent exists. Every output path, and every input's
    header, is checked before the first case runs. Each case is written whole when it is done: if
    a later case fails or the run is cancelled, the finished cases stay, and a folder this call
    created is removed if it is still empty. progress(stage, fraction, case) is called per case.
    """
    from ..data.io import check_image_header, check_output_path

    seg = model if isinstance(model, Segmenter) else Segmenter(
        model, options.pop("plan", None), device=options.pop("device", "auto"),
        threads=options.pop("threads", None), batch_size=options.pop("batch_size", None),
        precision=options.pop("precision", "fp32"))
    cases = find_cases(input_dir, len(seg.plan.channels), seg.plan.channel_names)
    out_dir = Path(os.fspath(output_dir))
    if not out_dir.exists():
        if not (out_dir.parent if str(out_dir.parent) else Path(".")).is_dir():
            raise InputError(f"'{out_dir}': output folder's parent '{out_dir.parent}' does not exist")
    elif not out_dir.is_dir():
        raise InputError(f"'{out_dir}': exists and is not a folder")
    outputs = [out_dir / f"{case}{ext}" for case, _, ext in cases]
    if out_dir.exists():
        for o, (_, paths, _) in zip(outputs, cases):
            check_output_path(o, overwrite=overwrite, inputs=paths)
    for _, paths, _ in cases:
        for path in paths:
            check_image_header(path)
    created = False
    if not out_dir.exists():
        try:
            out_dir.mkdir()
        except OSError as exc:
            raise InputError(f"'{out_dir}': cannot create the output folder ({exc.strerror or exc})") from None
        created = True
    results = {}
    try:
        for (case, paths, _), o in zip(cases, outputs):
            cb = (lambda s, f, _c=case: progress(s, f, _c)) if progress else None
            results[case] = predict_files(seg, paths, o, overwrite=overwrite, progress=cb, cancel=cancel, **options)
    except BaseException:
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    return results


__all__ = ["InferencePlan", "CasePrediction", "Segmenter", "predict_case", "predict_files", "add_segment_metadata",
           "find_cases",
           "predict_folder", "STAGES"]
