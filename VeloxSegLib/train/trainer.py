"""Training runs: the paper's recipe, resumable, data-parallel, ending in a model bundle.

The run is assembled from small pieces, each in its own module:

- plans (``planner``) -> :class:`RunSetup`: model, patch, spacing, channels, labels, batch size;
- cases: :func:`preprocess_case` (resample to the target spacing, normalize per channel as the
  bundle will at inference, keep labels) held in memory; :func:`split_cases` (fold or split);
- patches: ``sampler.PatchSampler`` (1:1 foreground/background) with ``augment.Augmenter``;
- loss: ``VeloxSegLib.losses.VeloxSegLoss`` (CE + Dice deep supervision, 0.5 rc, 2.0 SDKT);
- optimizer AdamW + ``schedule.recipe_schedule`` (linear warm-up then cosine);
- :class:`TrainLoop`: one optimizer step (AMP on CUDA only);
- :class:`Validator`: Dice on whole validation cases through the inference pipeline;
- ``checkpoint.CheckpointWriter``: ``last``/``best``, resumable exactly;
- ``progress``: tqdm bar or JSON lines, ``training_log.csv``, ``curves.png``;
- ``ddp``: torchrun data parallelism.

:func:`run_training` wires them; ``veloxseg train`` and ``veloxseg finetune`` call it. The bundle
is written only at the end (atomically); the work folder (``<bundle>.training`` by default)
holds the checkpoints, the plans, the CSV log and the curve plot.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..errors import Cancelled, ConfigError, InputError
from ..fsutil import make_folders, nearest_existing, remove_empty_folders
from . import ddp
from .augment import Augmenter
from .checkpoint import CheckpointWriter, capture_rng, read_checkpoint, restore_rng
from .progress import ProgressReporter, make_reporter, plot_curves, write_csv_log
from .sampler import CaseData, PatchSampler, rank_generator
from .schedule import PAPER_LR, PAPER_WEIGHT_DECAY, recipe_schedule

#: The recipe's patch augmentation (z-flip and rotation about z); bundles record its mirror axes
#: as ``inference.tta_axes``, the flips test-time augmentation may average.
RECIPE_AUGMENTER = Augmenter()

log = logging.getLogger(__name__)

#: Fixed shuffling seed of the case splits (independent of --seed, as nnU-Net's splits file).
SPLIT_SEED = 12345
NUM_FOLDS = 5
LOG_NAME = "training_log.csv"
PLOT_NAME = "curves.png"
PLANS_NAME = "plans.json"
PREPROCESSED_NAME = "preprocessed"  # the default folder of preprocessed cases, inside the work folder
#: Modules of the segmentation heads (re-initialized for a new label set; the refinement head
#: reads and writes the logits, so its shapes follow the classes too).
HEAD_PREFIXES = ("head.", "refine.", "ds_heads.", "final.")
#: VeloxSeg constructor arguments that ``--dropout`` sets (every dropout of the network).
DROPOUT_KEYS = ("attn_drop", "proj_drop", "conv_drop")
#: Modules that are not part of the encoder (everything else is frozen by --freeze-encoder).
NON_ENCODER_PREFIXES = ("decoder.", "head.", "refine.", "ds_heads.", "teachers.", "up.", "routers.", "dec_blocks.",
                        "final.")


# --------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Everything about a run that is not in the plans. None means "from the plans/recipe"."""

    model: Optional[str] = None
    epochs: int = 300
    iterations_per_epoch: int = 250
    batch_size: Optional[int] = None
    lr: float = PAPER_LR
    min_lr: Optional[float] = None
    weight_decay: float = PAPER_WEIGHT_DECAY
    seed: int = 0
    val_every: int = 10
    fold: Optional[int] = None
    split: Optional[Tuple[float, float, float]] = None
    use_sdkt: bool = True
    use_reconstruction: bool = True
    batch_dice: Optional[bool] = None  # None: off (train) or the parent's (finetune)
    ds_weights: Optional[Tuple[float, ...]] = None
    lesion_dice: Optional[float] = None  # weight of the lesion-wise Dice term; None: 0 (train) or the parent's
    device: str = "auto"
    amp: Optional[bool] = None
    threads: Optional[int] = None
    loader_threads: Optional[int] = None  # None: 0 on the CPU, up to 8 with a GPU
    preprocessed: Optional[str] = None  # folder of preprocessed cases (train/cache.py); None: WORK/preprocessed
    in_memory: bool = False  # hold the preprocessed cases in memory instead (no folder)
    compress_preprocessed: bool = False  # write new preprocessed cases compressed (train/chunked.py)
    configuration: Optional[str] = None  # the plans' configuration to train (planner.CONFIGURATIONS); None: 3d_fullres
    freeze_encoder: bool = False
    dropout: Optional[float] = None  # None: the network's own rates (VeloxSeg: 0.1), or the parent's
    refine_head: Optional[int] = None  # width of a full-resolution refinement head; None: none, or the parent's
    # fraction of foreground patches centred on a uniformly chosen lesion; None: 0 (nnU-Net's voxel
    # sampling) for train, the parent's for finetune
    component_sampling: Optional[float] = None
    # probability that a patch has one input channel (chosen uniformly) zeroed (augment.py); not inherited
    modality_dropout: float = 0.0
    fresh_warmup: int = 0  # fine-tuning: steps in which only the fresh modules train, inherited weights held
    final_weights: str = "best"
    target_dice: Optional[float] = None
    val_dataset: Optional[str] = None
    steps_per_summary: Optional[int] = None
    bundle_name: Optional[str] = None
    description: Optional[str] = None
    overwrite: bool = False

    def check(self) -> None:
        for key in ("epochs", "iterations_per_epoch", "val_every"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.loader_threads is not None and self.loader_threads < 0:
            raise ConfigError(f"--loader-threads must be >= 0, got {self.loader_threads}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.fold is not None and self.split is not None:
            raise ConfigError("give either --fold or --split, not both")
        if self.fold is not None and not 0 <= self.fold < NUM_FOLDS:
            raise ConfigError(f"--fold must be 0..{NUM_FOLDS - 1}, got {self.fold}")
        if self.target_dice is not None and not 0 < self.target_dice <= 1:
            raise ConfigError(f"--target-dice must be in (0, 1], got {self.target_dice}")
        if self.val_dataset is not None and (self.fold is not None or self.split is not None):
            raise ConfigError("--val-dataset validates on another dataset; it excludes --fold and --split")
        if self.ds_weights is not None and (any(w < 0 for w in self.ds_weights) or not sum(self.ds_weights) > 0):
            raise ConfigError(f"--ds-weights must be non-negative with a positive sum, got {list(self.ds_weights)}")
        if self.lesion_dice is not None and not (math.isfinite(self.lesion_dice) and self.lesion_dice >= 0):
            raise ConfigError(f"--lesion-dice must be a non-negative weight, got {self.lesion_dice}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.configuration is not None:
            from .planner import CONFIGURATIONS

            if self.configuration not in CONFIGURATIONS:
                raise ConfigError(f"--configuration must be one of {', '.join(CONFIGURATIONS)}, got "
                                  f"{self.configuration!r}")
        if self.refine_head is not None and (int(self.refine_head) != self.refine_head or self.refine_head < 0):
            raise ConfigError(f"--refine-head must be a whole number of channels >= 0, got {self.refine_head}")
        if int(self.fresh_warmup) < 0:
            raise ConfigError(f"--fresh-warmup must be >= 0 steps, got {self.fresh_warmup}")
        if self.component_sampling is not None and not 0.0 <= self.component_sampling <= 1.0:
            raise ConfigError(f"--component-sampling must be in [0, 1], got {self.component_sampling}")
        if not (math.isfinite(self.modality_dropout) and 0.0 <= self.modality_dropout < 1.0):
            raise ConfigError(f"--modality-dropout must be in [0, 1), got {self.modality_dropout}")
        if self.final_weights not in ("best", "last"):
            raise ConfigError("final weights must be 'best' or 'last'")
        if self.in_memory and self.preprocessed is not None:
            raise ConfigError("give either --preprocessed DIR or --in-memory, not both")
        if self.in_memory and self.compress_preprocessed:
            raise ConfigError("--compress-preprocessed compresses the folder of preprocessed cases; "
                              "--in-memory has none")


@dataclass
class RunSetup:
    """What the network and the bundle are built from (bundle-format pieces)."""

    model_name: str
    in_channels: Tuple[int, ...]
    num_classes: int
    patch_size: Tuple[int, int, int]  # tensor order (z, y, x), as the network and bundle.json use
    spacing: Tuple[float, float, float]  # x, y, z mm
    channels: List[dict]
    labels: List[dict]
    batch_size: int = 2
    overrides: Dict[str, Any] = field(default_factory=dict)
    inference: Optional[Dict[str, Any]] = None  # a parent bundle's inference settings (fine-tuning)
    # the arrays' orientation (data/orientation.py): "LPS" for every new run; None (arrays as the
    # files store them) only for a fine-tune of a bundle that predates the field
    orientation: Optional[str] = "LPS"

    @classmethod
    def from_plans(cls, plans: dict, config: TrainConfig) -> "RunSetup":
        m = plans["model"]
        # the planner writes every vector in ITK order x, y, z; the network takes (z, y, x)
        patch = tuple(int(v) for v in reversed(m["patch_size"]))
        return cls(model_name=config.model or m.get("name", "veloxseg-b"), in_channels=tuple(m["in_channels"]),
                   num_classes=int(m.get("num_classes", len(plans["labels"]))), patch_size=patch,
                   spacing=tuple(float(s) for s in plans["spacing"]), channels=[dict(c) for c in plans["channels"]],
                   labels=[dict(lb) for lb in plans["labels"]],
                   batch_size=int(config.batch_size or plans.get("batch_size", 2)),
                   overrides=dict(m.get("overrides") or {}), orientation=plans.get("orientation", "LPS"))

    def with_dropout(self, rate: float) -> "RunSetup":
        """The same setup with every dropout of a VeloxSeg network (attention probabilities,
        projections, convolution blocks) at ``rate``. Dropout only acts in training, so the
        bundle's network computes the same function at inference for any rate; the rate is
        recorded in the bundle's ``model.overrides`` as part of the recipe."""
        if not self._is_veloxseg():
            raise ConfigError(f"--dropout applies to the VeloxSeg networks, not to '{self.model_name}'")
        rate = float(rate)
        return replace(self, overrides={**self.overrides, **{k: rate for k in DROPOUT_KEYS}})

    def with_refine_head(self, channels: int) -> "RunSetup":
        """The same setup with a full-resolution refinement head of ``channels`` channels on a
        VeloxSeg network (``model.overrides.refine_channels``; 0 removes it). The head starts as
        the identity, so a fine-tune that adds it starts from the parent's exact function."""
        if not self._is_veloxseg():
            raise ConfigError(f"--refine-head applies to the VeloxSeg networks, not to '{self.model_name}'")
        overrides = {k: v for k, v in self.overrides.items() if k != "refine_channels"}
        if int(channels):
            overrides["refine_channels"] = int(channels)
        return replace(self, overrides=overrides)

    def _is_veloxseg(self) -> bool:
        from ..model import PRESETS

        return PRESETS.get(self.model_name.lower(), {}).get("arch") == "veloxseg"

    def build_model(self, training: bool = True, use_teachers: bool = True):
        from ..model import build_model

        kw = dict(self.overrides)
        if training and self._is_veloxseg() and not use_teachers:
            kw["with_teachers"] = False
        return build_model(self.model_name, in_channels=self.in_channels, num_classes=self.num_classes,
                           patch_size=self.patch_size, **kw)

    def inference_plan(self, name: str = "model"):
        """The plan validation predicts with: the pipeline's defaults, plus the post-processing the
        new bundle will carry (a parent's PET border refinement), so validation Dice is the Dice
        of the bundle's own segmentations; speed settings (overlap, TTA) stay at the defaults."""
        from ..infer.pipeline import InferencePlan

        refine = (self.inference or {}).get("pet_refine")
        return InferencePlan(patch_size=self.patch_size, channels=self.channels, labels=self.labels,
                             spacing=self.spacing, name=name, pet_refine=dict(refine) if refine else None,
                             orientation=self.orientation)


def _prepare_reporter(progress: ProgressReporter, stage: str):
    """``fn(done, total)`` emitting ``prepare`` records (planning, preprocessing: before ``start``)."""
    t0 = time.perf_counter()

    def report(done: int, total: int) -> None:
        progress.emit({"event": "prepare", "stage": stage, "done": int(done), "total": int(total),
                       "seconds": time.perf_counter() - t0})
    return report


def resolve_plans(dataset, plans=None, fingerprint: Optional[dict] = None, progress=None,
                  **planner_overrides) -> dict:
    """Plans from a plans dict or JSON file, or made now by the planner (from ``fingerprint`` when
    given: the dataset's measurements saved by an earlier run, else measured now)."""
    if isinstance(plans, dict):
        return plans
    if plans is not None:
        path = Path(plans)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"'{path}': cannot read plans ({exc})") from None
    from .planner import default_fingerprint_threads, make_plans, plan_dataset

    overrides = {k: v for k, v in planner_overrides.items() if v is not None}
    if fingerprint is not None:
        try:
            return make_plans(fingerprint, **overrides)
        except (KeyError, TypeError, IndexError, AttributeError) as exc:  # a saved one of another layout
            log.warning("the saved dataset fingerprint is unusable (%r); measuring the dataset again", exc)
    return plan_dataset(dataset, progress=progress, threads=default_fingerprint_threads(), **overrides)


# --------------------------------------------------------------------------- cases


def split_cases(cases: Sequence[str], fold: Optional[int] = None,
                split: Optional[Sequence[float]] = None) -> Tuple[List[str], List[str], List[str], str]:
    """(train, validation, test, how). ``how`` is ``"held-out"`` or ``"training cases"``.

    ``fold`` k: 5-fold cross-validation, fold k validates. ``split`` (train, val, test)
    fractions. Neither: fold 0 with 5 or more cases, one held-out case with 3 or 4, and with
    fewer than 3 cases every case trains and the same cases validate. Shuffling uses a fixed
    seed, so splits do not change with ``--seed``.
    """
    cases = sorted(cases)
    n = len(cases)
    if n == 0:
        raise InputError("the dataset holds no cases")
    order = [cases[i] for i in np.random.default_rng(SPLIT_SEED).permutation(n)]
    if split is not None:
        fr = [float(v) for v in split]
        if len(fr) != 3 or min(fr) < 0 or sum(fr) <= 0 or fr[0] <= 0:
            raise ConfigError(f"--split needs three fractions train,val,test with train > 0, got {split}")
        total = sum(fr)
        n_val = max(1, round(n * fr[1] / total)) if fr[1] > 0 else 0
        n_test = round(n * fr[2] / total)
        if n - n_val - n_test < 1:
            raise ConfigError(f"--split {','.join(map(str, split))} leaves no training case among {n}")
        val, test, train = order[:n_val], order[n_val:n_val + n_test], order[n_val + n_test:]
    elif fold is not None or n >= NUM_FOLDS:
        if n < NUM_FOLDS:
            raise ConfigError(f"--fold needs at least {NUM_FOLDS} cases, the dataset has {n}")
        folds = np.array_split(np.arange(n), NUM_FOLDS)
        k = fold or 0
        val = [order[i] for i in folds[k]]
        train = [c for c in order if c not in set(val)]
        test = []
    elif n >= 3:
        val, train, test = order[:1], order[1:], []
    else:
        val, train, test = [], list(order), []
    if not val:
        return sorted(train), sorted(train), sorted(test), "training cases"
    return sorted(train), sorted(val), sorted(test), "held-out"


def preprocess_case(ds, case: str, setup: RunSetup) -> CaseData:
    """Read one case, bring every channel onto channel 0's grid at the target spacing, normalize
    it with the channel's spec (statistics of its own voxels as read, as inference does) and
    resample the label (nearest neighbour)."""
    import SimpleITK as sitk

    from ..data.alignment import Grid, resample_to_grid, working_grid
    from ..data.io import read_image
    from ..data.normalization import fit_normalizer

    images = [read_image(p) for p in ds.image_paths(case)]
    label = read_image(ds.label_path(case))
    ref = Grid.of(images[0])
    # the working grid and the arrays' orientation as inference lays them
    axes, work, resample = working_grid(ref, setup.spacing, setup.orientation, 0.02)
    arr = np.empty((len(images),) + work.shape, dtype=np.float32)
    pads = []
    for i, (img, ch) in enumerate(zip(images, setup.channels)):
        norm = fit_normalizer(sitk.GetArrayViewFromImage(img), ch.get("normalization") or {"scheme": "none"})
        if not resample and (i == 0 or Grid.of(img).same_as(ref)):
            arr[i] = sitk.GetArrayViewFromImage(img)
        else:
            res = resample_to_grid(img, work, default=norm.background)  # kept alive while viewed
            arr[i] = sitk.GetArrayViewFromImage(res)
            del res
        norm.apply(arr[i])
        pads.append(norm.normalized_background)
    if resample or not Grid.of(label).same_as(ref):
        label = resample_to_grid(label, work, interpolator=sitk.sitkNearestNeighbor, default=0,
                                 pixel_type=sitk.sitkUInt8)
    lab = sitk.GetArrayFromImage(label).astype(np.uint8)
    if lab.max(initial=0) >= setup.num_classes:
        raise InputError(f"case {case!r}: label value {int(lab.max())} but the model has {setup.num_classes} classes")
    if not axes.is_identity:
        arr = np.ascontiguousarray(axes.to_canonical(arr))
        lab = np.ascontiguousarray(axes.to_canonical(lab))
    return CaseData(case, arr, lab, tuple(pads), axes.canonical_vector(work.spacing))


# --------------------------------------------------------------------------- loop pieces


class TrainForward(nn.Module):
    """``forward`` = the network's ``forward_train`` (what DistributedDataParallel wraps)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.forward_train(x)


class TrainLoop:
    """One optimizer step on a batch from the sampler; AMP (float16 autocast + GradScaler) on CUDA."""

    def __init__(self, forward: nn.Module, loss_fn, optimizer, schedule, sampler: PatchSampler,
                 device: torch.device, amp: bool = False):
        self.forward = forward
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.schedule = schedule
        self.sampler = sampler
        self.device = device
        self.amp = bool(amp and device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None

    def step(self) -> Dict[str, float]:
        xb, yb = self.sampler.sample()
        x = torch.from_numpy(xb).to(self.device, non_blocking=True)
        y = torch.from_numpy(yb).to(self.device, non_blocking=True).long()
        self._skip_waiting_gradients()
        ctx = torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()
        with ctx:
            out = self.forward(x)
        loss, parts = self.loss_fn(out, y, x)
        if not math.isfinite(parts["total"]):
            raise ConfigError(f"the loss became {parts['total']} (diverged); lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self._hold_waiting_groups()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self._hold_waiting_groups()
            self.optimizer.step()
        self.schedule.step()
        return parts

    def _skip_waiting_gradients(self) -> None:
        """Without DistributedDataParallel (whose reducer expects the parameters it was built
        with), the parameters of groups that wait (``--fresh-warmup``) do not require a gradient
        in their steps, so the backward pass goes through the fresh modules only: the same
        updates in less time (PET/CT demo, 96^3, 2 threads: 60 s per epoch of 60 steps with a
        refinement head and the teachers fresh, against 90 s computing and dropping them)."""
        if isinstance(self.forward, nn.parallel.DistributedDataParallel):
            return
        for group in self.optimizer.param_groups:
            if "start_step" in group:
                started = self.schedule.started(group)
                for p in group["params"]:
                    p.requires_grad_(started)

    def _hold_waiting_groups(self) -> None:
        """Drop the gradients of parameter groups whose ``start_step`` is still ahead (the inherited
        weights during ``--fresh-warmup``): AdamW skips parameters without a gradient, so they stay
        exactly as they are, with no moments and no weight decay, until their group starts."""
        for group in self.optimizer.param_groups:
            if not self.schedule.started(group):
                for p in group["params"]:
                    p.grad = None

    def scaler_state(self) -> Optional[dict]:
        if self.scaler is None:
            return None
        st = self.scaler.state_dict()
        return {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in st.items()}

    def load_scaler_state(self, state: Optional[dict]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


class Validator:
    """Mean foreground Dice of whole validation cases run through the inference pipeline."""

    def __init__(self, ds, cases: Sequence[str], setup: RunSetup, device: torch.device):
        self.ds = ds
        self.cases = list(cases)
        self.setup = setup
        self.device = device

    def __call__(self, net: nn.Module, cancel=None) -> Dict[str, Any]:
        import SimpleITK as sitk

        from ..data.io import read_image
        from ..infer.pipeline import Segmenter
        from ..metrics import dice_score

        was_training = net.training
        seg = Segmenter(net, self.setup.inference_plan(), device=str(self.device))
        fg = [lb for lb in self.setup.labels if int(lb["value"]) != 0]
        per_label = {lb["name"]: [] for lb in fg}
        try:
            for case in self.cases:
                # copies: a view of a temporary image would outlive its buffer
                pred = sitk.GetArrayFromImage(seg.predict(self.ds.image_paths(case), cancel=cancel).labels)
                ref = sitk.GetArrayFromImage(read_image(self.ds.label_path(case)))
                for lb in fg:
                    per_label[lb["name"]].append(dice_score(pred == lb["value"], ref == lb["value"]))
        finally:
            net.train(was_training)
        means = {k: float(np.mean(v)) for k, v in per_label.items()}
        return {"dice": float(np.mean(list(means.values()))) if means else float("nan"), "per_label": means}


class StopRequest:
    """Set by SIGINT/SIGTERM (or by a caller); the loop saves a checkpoint and stops at the next
    step. A second signal interrupts at once (KeyboardInterrupt)."""

    def __init__(self, event: Optional[threading.Event] = None):
        self.event = event or threading.Event()
        self.signal_name = None

    def is_set(self) -> bool:
        return self.event.is_set()

    @contextlib.contextmanager
    def handling_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {}

        def handler(signum, frame):
            if self.event.is_set():
                raise KeyboardInterrupt
            self.signal_name = signal.Signals(signum).name
            self.event.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except (ValueError, OSError):  # pragma: no cover - not the main interpreter
                pass
        try:
            yield self
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)


@dataclass
class LoopState:
    """Position and running statistics of a run (JSON, saved in every checkpoint)."""

    epoch: int = 0
    iteration: int = 0
    sums: Dict[str, float] = field(default_factory=dict)
    count: int = 0
    epoch_seconds: float = 0.0
    history: List[dict] = field(default_factory=list)
    best_dice: Optional[float] = None
    best_epoch: Optional[int] = None
    best_per_label: Dict[str, float] = field(default_factory=dict)
    reached_target_at: Optional[int] = None
    #: fine-tuning: validation of the starting (parent's) weights before the first step
    #: (``dice``, ``per_label``, ``seconds``), and whether they already reached ``target_dice``
    start: Optional[dict] = None
    target_met_at_start: bool = False


def freeze_encoder(model: nn.Module) -> int:
    """Stop gradients into the encoder (everything but decoder, heads and teachers); returns the
    number of frozen parameters."""
    n = 0
    for name, p in model.named_parameters():
        if not name.startswith(NON_ENCODER_PREFIXES):
            p.requires_grad_(False)
            n += p.numel()
    return n


def fresh_parameter_names(model: nn.Module, state: Dict[str, torch.Tensor],
                          reinit_prefixes: Sequence[str] = ()) -> List[str]:
    """The parameters of ``model`` that :func:`load_initial_weights` leaves at their fresh
    initialization: not in ``state`` (training-only modules: texture teachers, deep-supervision
    heads) or under ``reinit_prefixes`` (the heads of a new label set)."""
    prefixes = tuple(reinit_prefixes)
    return [n for n, p in model.named_parameters()
            if n not in state or (prefixes and n.startswith(prefixes))]


def parameter_groups(model: nn.Module, init_weights: Optional[Dict[str, torch.Tensor]] = None,
                     reinit_prefixes: Sequence[str] = (), fresh_warmup: int = 0) -> list:
    """The optimizer's parameter groups: one group, or, with ``fresh_warmup`` steps and starting
    weights, the inherited parameters (``start_step`` = ``fresh_warmup``: they wait while the fresh
    modules learn, then ramp up) and the fresh ones (from step 0). Deterministic in the model and
    the weights' names, so a resumed run rebuilds the same groups for its optimizer state."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not fresh_warmup or init_weights is None:
        return [{"params": [p for _, p in trainable]}]
    fresh = set(fresh_parameter_names(model, init_weights, reinit_prefixes))
    inherited = [p for n, p in trainable if n not in fresh]
    new = [p for n, p in trainable if n in fresh]
    if not inherited or not new:
        return [{"params": [p for _, p in trainable]}]
    return [{"params": inherited, "start_step": int(fresh_warmup), "name": "inherited"},
            {"params": new, "name": "fresh"}]


def load_initial_weights(model: nn.Module, state: Dict[str, torch.Tensor],
                         reinit_prefixes: Sequence[str] = ()) -> Dict[str, List[str]]:
    """Copy matching tensors from ``state`` (a bundle's weights) into ``model``; keys under
    ``reinit_prefixes`` keep the model's fresh (He) initialization. Returns what was skipped."""
    own = model.state_dict()
    load, skipped, shape = {}, [], []
    for k, v in state.items():
        if k.startswith(tuple(reinit_prefixes)):
            skipped.append(k)
        elif k in own and tuple(own[k].shape) == tuple(v.shape):
            load[k] = v
        elif k in own:
            shape.append(k)
        else:
            skipped.append(k)
    if shape:
        raise ConfigError(f"{len(shape)} tensor(s) of the source weights do not fit the model (e.g. {shape[0]})")
    model.load_state_dict(load, strict=False)
    fresh = [k for k in own if k not in load]
    return {"loaded": list(load), "fresh": fresh, "skipped": skipped}


# --------------------------------------------------------------------------- bundle


def bundle_name_for(output, given: Optional[str] = None) -> str:
    name = given or Path(output).name
    if name.lower().endswith(".zip"):
        name = name[:-4]
    name = re.sub(r"[^A-Za-z0-9._+-]", "-", name).lstrip("._+-") or "model"
    return name[:128]


def build_bundle_meta(setup: RunSetup, name: str, training: dict, description: str = "") -> dict:
    """bundle.json of a run. Inference settings: the parent's (fine-tuning) or the defaults; the TTA
    axes add the recipe's mirror axes (the network has now been trained with those flips too)."""
    from ..bundle import FORMAT_VERSION, INFERENCE_DEFAULTS, MIRROR_AXES

    inference = dict(INFERENCE_DEFAULTS, tta_axes=[])
    inference.update(setup.inference or {})
    axes = set(inference["tta_axes"]) | set(RECIPE_AUGMENTER.mirror_axes)
    inference["tta_axes"] = [a for a in MIRROR_AXES if a in axes]
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "description": description,
        "model": {"name": setup.model_name, "in_channels": list(setup.in_channels), "num_classes": setup.num_classes,
                  "patch_size": list(setup.patch_size), "overrides": dict(setup.overrides)},
        "spacing": list(setup.spacing),
        **({"orientation": setup.orientation} if setup.orientation else {}),
        "channels": setup.channels,
        "labels": setup.labels,
        "inference": inference,
        "training": training,
    }


def _sampling_text(component_fraction: float) -> str:
    """How the foreground patches were centred, for the training record."""
    if component_fraction <= 0:
        return "1:1 fg/bg"
    return f"1:1 fg/bg; {component_fraction:g} of fg patches centred on a uniformly chosen connected component"


def _dataset_text(ds, n_train: int, n_val: int, how: str) -> str:
    text = f"{ds.root.name}: {len(ds.cases)} case(s), {n_train} for training, "
    text += "validated on the training cases" if how == "training cases" else f"{n_val} held out for validation"
    ph = ds.extra.get("veloxseg_phantom") if isinstance(ds.extra, dict) else None
    if isinstance(ph, dict):
        diameter = ph.get("lesion_diameter_mm")
        diameter = (f" --lesion-diameter {' '.join(f'{d:g}' for d in diameter)}"
                    if isinstance(diameter, list) and len(diameter) == 2
                    and all(isinstance(d, (int, float)) for d in diameter) else "")
        text += (f"; synthetic {ph.get('kind')} phantoms (veloxseg phantom --seed {ph.get('seed')} --size "
                 f"{' '.join(str(s) for s in ph.get('size', []))}{diameter}, version {ph.get('version')})")
    return text


# --------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    bundle: Optional[Path]
    work_dir: Path
    history: List[dict]
    best_dice: Optional[float]
    best_epoch: Optional[int]
    validated_on: str
    meta: Optional[dict] = None
    model: Optional[nn.Module] = None  # the trained network (last weights), on every rank


def default_work_dir(output) -> Path:
    out = Path(output)
    return out.with_name(out.name + ".training")


@dataclass
class Run:
    """The collaborating pieces of one run (assembled by :func:`assemble_run`)."""

    config: TrainConfig
    setup: RunSetup
    dataset: Any
    splits: dict
    work: Path
    writer: CheckpointWriter
    dist: ddp.DistInfo
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any
    sampler: PatchSampler
    loop: TrainLoop
    validator: Optional[Validator]
    progress: ProgressReporter
    state: LoopState
    amp: bool
    resumed: bool = False
    init_report: Optional[dict] = None
    made_dirs: List[Path] = field(default_factory=list)  # created by this run, deepest first
    wrote_plans: bool = False
    store_dirs: List[Path] = field(default_factory=list)  # the preprocessed folder and parents it created
    notices: List[str] = field(default_factory=list)  # messages from assembling, emitted after "start"

    def discard_unstarted(self) -> None:
        """The run ends before its first checkpoint (a broken case, divergence at once, Ctrl-C while
        loading or validating the starting weights): nothing resumable exists, so nothing it wrote
        stays. A work folder holding a checkpoint is never touched."""
        _discard_unstarted(self.work, self.writer, self.made_dirs, self.wrote_plans, self.store_dirs)

    @property
    def validated_on(self) -> str:
        return self.splits["validated_on"]

    def checkpoint_doc(self, ranks: List[dict]) -> dict:
        c, st = self.config, self.setup
        return {
            "run": {"model": st.model_name, "patch_size": list(st.patch_size), "epochs": c.epochs,
                    "iterations_per_epoch": c.iterations_per_epoch, "batch_size": st.batch_size, "seed": c.seed,
                    "world_size": self.dist.world_size, "in_channels": list(st.in_channels),
                    "num_classes": st.num_classes, "recipe": _recipe(c)},
            "setup": asdict(st),
            "splits": self.splits,
            "loop": asdict(self.state),
            "schedule": self.schedule.state_dict(),
            "scaler": self.loop.scaler_state(),
            "ranks": ranks,
        }

    def save(self, names: Sequence[str]) -> None:
        """Checkpoint(s) with every rank's generator states; rank 0 writes."""
        ranks = ddp.gather_objects({"sampler": self.sampler.state_dict(), "rng": capture_rng()}, self.dist)
        if self.dist.is_main:
            doc = self.checkpoint_doc(ranks)
            for name in names:
                self.writer.save(name, self.model.state_dict(), doc, self.optimizer)

    def restore(self, ckpt) -> None:
        run = ckpt.state["run"]
        for key, value in (("epochs", self.config.epochs), ("iterations_per_epoch", self.config.iterations_per_epoch),
                           ("world_size", self.dist.world_size)):
            if run[key] != value:
                raise ConfigError(f"the checkpoint was made with {key.replace('_', ' ')} {run[key]}, this run has "
                                  f"{value}; resume with the same settings")
        if self.config.batch_size is not None and self.config.batch_size != run["batch_size"]:
            raise ConfigError(f"the checkpoint was made with batch size {run['batch_size']}, this run has "
                              f"{self.config.batch_size}; resume with the same settings")
        saved = run.get("recipe")  # (checkpoints from before it was recorded: not compared)
        if saved is not None:
            now = _recipe(self.config)
            for key in RECIPE_KEYS:
                if key in saved and saved[key] != now[key]:
                    flag = RECIPE_FLAGS.get(key, "--" + key.replace("_", "-"))
                    raise ConfigError(f"the checkpoint was made with {flag} {_shown(saved[key])}, this run has "
                                      f"{_shown(now[key])}; resume with the same settings")
        self.model.load_state_dict(ckpt.model_state())
        self.optimizer.load_state_dict(ckpt.optimizer_state())
        self.schedule.load_state_dict(ckpt.state["schedule"])
        self.loop.load_scaler_state(ckpt.state.get("scaler"))
        self.state = LoopState(**ckpt.state["loop"])
        mine = ckpt.state["ranks"][self.dist.rank]
        self.sampler.load_state_dict(mine["sampler"])
        restore_rng(mine["rng"])
        self.resumed = True


#: Training settings a resumed run must share with its checkpoint (the schedule, the loss, the
#: sampling and the random streams were made with them).
RECIPE_KEYS = ("lr", "min_lr", "weight_decay", "seed", "use_sdkt", "use_reconstruction", "batch_dice", "ds_weights",
               "lesion_dice", "component_sampling", "modality_dropout", "fresh_warmup", "freeze_encoder", "dropout",
               "refine_head")
RECIPE_FLAGS = {"use_sdkt": "the SDKT loss (--no-sdkt)", "use_reconstruction": "the reconstruction loss (--no-reconstruction)",
                "min_lr": "final learning rate min_lr", "weight_decay": "weight decay"}  # (the last two: Python API)


def _recipe(config: TrainConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in ((k, getattr(config, k)) for k in RECIPE_KEYS)}


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "default" if value is None else str(value)


def _discard_unstarted(work: Path, writer: CheckpointWriter, made: Sequence[Path], wrote_plans: bool,
                       made_store: Sequence[Path] = ()) -> None:
    if writer.exists("last"):
        return
    work = work.absolute()
    if made_store:  # a folder of preprocessed cases this run created: inside the work folder it is part of
        store = made_store[0]  # the run's output and goes; one given with --preprocessed keeps its whole cases
        if store == work or work in store.parents:
            shutil.rmtree(store, ignore_errors=True)
        remove_empty_folders(made_store)
    if made and made[0] == work:
        shutil.rmtree(work, ignore_errors=True)
        remove_empty_folders(made[1:])
    elif wrote_plans:
        (work / PLANS_NAME).unlink(missing_ok=True)


def _check_paths(output: Path, writer: CheckpointWriter, work: Path, resume: bool, overwrite: bool,
                 dataset_root: Optional[Path] = None) -> None:
    """Everything :func:`save_bundle` and the checkpoints would refuse at the end, refused before
    the first step."""
    from ..bundle import check_bundle_output
    from ..data.io import check_writable_folder

    # checked on every rank (same files), so no rank is left waiting for one that failed
    check_bundle_output(output, overwrite, exists_hint="choose another output or pass --overwrite")
    parent = output.parent if str(output.parent) else Path(".")
    check_writable_folder(parent)
    if dataset_root is not None:
        root = Path(dataset_root).resolve()
        for path, what in ((work, "the work folder"), (output, "the output")):
            target = path.resolve()
            if target == root or root in target.parents:
                raise InputError(f"{path}: {what} is inside the dataset {dataset_root}, which is never written to")
    check_writable_folder(nearest_existing(work))
    if resume and not writer.exists("last"):
        raise InputError(f"{writer.path('last')}: no checkpoint to resume from")
    if not resume and writer.exists("last") and not overwrite:
        raise InputError(f"{work}: holds a checkpoint of an earlier run; pass --resume to continue it "
                         f"(or --overwrite to start again)")


def _make_splits(ds, config: TrainConfig) -> dict:
    """Training/validation/test case lists (or all cases and another validation dataset)."""
    if config.val_dataset is not None:
        splits = {"train": list(ds.cases), "validation": None, "test": [], "validated_on": "held-out",
                  "val_dataset": str(Path(config.val_dataset).resolve()), "fold": None, "split": None}
    else:
        train_ids, val_ids, test_ids, how = split_cases(ds.cases, config.fold, config.split)
        splits = {"train": train_ids, "validation": val_ids, "test": test_ids, "validated_on": how,
                  "fold": config.fold, "split": list(config.split) if config.split else None}
    return splits


def _validation_dataset(ds, splits: dict):
    from ..data.nnunet import load_dataset

    if not splits.get("val_dataset"):
        return ds
    val_ds = load_dataset(splits["val_dataset"])
    if val_ds.num_channels != ds.num_channels:
        raise InputError(f"{val_ds.root.name}: validation dataset has {val_ds.num_channels} channel(s), the "
                         f"training dataset {ds.num_channels}")
    splits["validation"] = list(val_ds.cases)
    return val_ds


def _check_validation_labels(val_ds, cases: Sequence[str], setup: RunSetup) -> None:
    """A validation label map with values the model does not have would score as a miss, not
    fail: refuse it before training (training cases are checked as they are loaded)."""
    import SimpleITK as sitk

    from ..data.io import read_image

    known = {int(lb["value"]) for lb in setup.labels}
    for case in cases:
        path = val_ds.label_path(case)
        image = read_image(path)  # kept alive while its buffer is viewed
        values = {int(v) for v in np.unique(sitk.GetArrayViewFromImage(image))}
        extra = sorted(values - known)
        if extra:
            names = ", ".join(f"{lb['value']} {lb['name']}" for lb in setup.labels)
            raise InputError(f"{path}: label value(s) {extra} are not among the model's labels ({names})")


def assemble_run(dataset, output, config: TrainConfig, *, plans=None, setup: Optional[RunSetup] = None,
                 init_weights=None, reinit_prefixes: Sequence[str] = (), resume: bool = False, work_dir=None,
                 progress: Optional[ProgressReporter] = None, planner_overrides: Optional[dict] = None) -> Run:
    """Checks, plans, splits, in-memory cases and the training pieces (restored when resuming)."""
    from ..data.nnunet import load_dataset, write_json_atomic
    from ..infer.device import resolve_device, set_threads

    config.check()
    if config.component_sampling is None:  # not given and not inherited: nnU-Net's voxel sampling
        config.component_sampling = 0.0
    output = Path(output)
    work = Path(work_dir) if work_dir else default_work_dir(output)
    if config.threads:
        set_threads(config.threads)
    device = resolve_device(config.device)
    dist = ddp.init_distributed(device)
    device = ddp.device_for(dist, device)
    progress = progress if (progress is not None and dist.is_main) else make_reporter("none")
    amp = (device.type == "cuda") if config.amp is None else bool(config.amp and device.type == "cuda")
    if device.type == "cuda":  # fixed patch shapes: let cuDNN pick its fastest convolutions once
        torch.backends.cudnn.benchmark = True

    ds = load_dataset(dataset)
    writer = CheckpointWriter(work / "checkpoints")
    _check_paths(output, writer, work, resume, config.overwrite, ds.root)
    store_root = None if config.in_memory else (Path(config.preprocessed) if config.preprocessed
                                                 else work / PREPROCESSED_NAME)
    if store_root is not None:
        from .cache import check_store_folder

        check_store_folder(store_root, ds.root, output)
    ckpt = read_checkpoint(writer.path("last")) if resume else None
    notices: List[str] = []  # said once the run has started (after its "start" record)
    new_fp = None  # (key, fingerprint) measured now, saved beside the preprocessed cases
    if setup is None and ckpt is not None:
        saved = ckpt.state["setup"]
        # a checkpoint from before the orientation field trained on arrays as stored
        setup = RunSetup(**{"orientation": None, **saved, "patch_size": tuple(saved["patch_size"]),
                            "in_channels": tuple(saved["in_channels"]), "spacing": tuple(saved["spacing"])})
    elif setup is None:
        plans, new_fp = _plan_run(ds, plans, planner_overrides, store_root, progress, dist, notices)
        if config.configuration not in (None, "3d_fullres"):
            from .planner import plans_for_configuration

            plans = plans_for_configuration(plans, config.configuration)
            notices.append(f"training the {config.configuration} configuration: spacing {plans['spacing']} mm, "
                           f"window {plans['model']['patch_size']}, batch {plans['batch_size']}")
        setup = RunSetup.from_plans(plans, config)
    if config.dropout is not None and ckpt is None:  # a resumed run keeps the setup it saved
        setup = setup.with_dropout(config.dropout)
    if config.refine_head is not None and ckpt is None:
        setup = setup.with_refine_head(config.refine_head)
    if len(setup.channels) != ds.num_channels:
        raise InputError(f"{ds.root.name}: has {ds.num_channels} channel(s), the model needs {len(setup.channels)} "
                         f"({', '.join(c['name'] for c in setup.channels)})")
    splits = ckpt.state["splits"] if ckpt is not None else _make_splits(ds, config)
    val_ds = _validation_dataset(ds, splits)
    _check_validation_labels(val_ds, splits["validation"], setup)
    made: List[Path] = []  # folders this run creates before its first checkpoint: removed if it ends there
    made_store: List[Path] = []  # the same for the folder of preprocessed cases
    wrote_plans = False
    if dist.is_main:
        made = make_folders(work)
        if isinstance(plans, dict):
            write_json_atomic(work / PLANS_NAME, plans)
            wrote_plans = True
    try:
        store = None
        if store_root is not None:
            from .cache import CaseStore

            if dist.is_main:  # before any other rank writes there, so that rank 0 knows what it made
                made_store[:] = make_folders(store_root)
                if new_fp is not None:
                    from .cache import save_fingerprint

                    save_fingerprint(store_root, *new_fp)
            ddp.barrier(dist)
            store = CaseStore(store_root, compress=config.compress_preprocessed)
        return _assemble_rest(config, setup, ds, splits, val_ds, work, writer, dist, device, progress, amp, ckpt,
                              init_weights, reinit_prefixes, made, wrote_plans, store, made_store, notices)
    except BaseException:  # a broken case, Ctrl-C or SIGTERM while loading: nothing of this run stays
        if dist.is_main:
            _discard_unstarted(work, writer, made, wrote_plans, made_store)
        raise


def _plan_run(ds, plans, planner_overrides, store_root, progress, dist, notices: List[str]):
    """The run's plans, made on rank 0 and broadcast: from ``plans`` when given, else from the
    dataset fingerprint an earlier run saved in the folder of preprocessed cases (the dataset
    unchanged), else by the planner. Returns the plans and, when the fingerprint was measured
    now, ``(key, fingerprint)`` to save once the folder exists (else None)."""
    fp_key = saved_fp = None
    if dist.is_main and plans is None and store_root is not None:
        from .cache import dataset_key, load_fingerprint

        fp_key = dataset_key(ds)
        saved_fp = load_fingerprint(store_root, fp_key)
    plans = ddp.broadcast_object(resolve_plans(ds.root, plans, fingerprint=saved_fp,
                                               progress=_prepare_reporter(progress, "plan"),
                                               **(planner_overrides or {}))
                                 if dist.is_main else None, dist)
    if saved_fp is not None:
        notices.append(f"planned from the dataset fingerprint saved in {store_root} (the dataset is unchanged)")
    elif fp_key is not None and isinstance(plans.get("fingerprint"), dict):
        return plans, (fp_key, plans["fingerprint"])
    return plans, None


def _assemble_rest(config, setup, ds, splits, val_ds, work, writer, dist, device, progress, amp, ckpt, init_weights,
                   reinit_prefixes, made, wrote_plans, store=None, made_store=(), notices=None) -> Run:
    """The training cases (memory-mapped from ``store``, or in memory) and the training pieces of
    :func:`assemble_run` (restored when resuming)."""
    from ..losses import LossConfig, VeloxSegLoss
    from .cache import prepare_cases

    loader_threads = resolve_loader_threads(config.loader_threads, device)
    notices = list(notices or [])
    cases = prepare_cases(ds, splits["train"], setup, preprocess_case, store, dist, threads=loader_threads,
                          emit=notices.append, on_case=_prepare_reporter(progress, "preprocess"))

    # seeded so that every rank builds the same model (DDP also broadcasts rank 0's weights)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed % 2 ** 32)
    use_teachers = config.use_reconstruction or config.use_sdkt
    model = setup.build_model(training=True, use_teachers=use_teachers)
    init_report = None
    if init_weights is not None and ckpt is None:
        init_report = load_initial_weights(model, init_weights, reinit_prefixes)
    if config.freeze_encoder:
        freeze_encoder(model)
    model.to(device)
    loss_fn = VeloxSegLoss(LossConfig(use_reconstruction=config.use_reconstruction, use_sdkt=config.use_sdkt,
                                       batch_dice=bool(config.batch_dice), ds_weights=config.ds_weights,
                                       lambda_lesion=float(config.lesion_dice or 0.0)))
    optimizer = torch.optim.AdamW(parameter_groups(model, init_weights, reinit_prefixes, config.fresh_warmup),
                                  lr=config.lr, weight_decay=config.weight_decay)
    schedule = recipe_schedule(optimizer, config.epochs, config.iterations_per_epoch, config.lr, config.min_lr)
    augmenter = RECIPE_AUGMENTER
    if config.modality_dropout:
        augmenter = replace(RECIPE_AUGMENTER, modality_dropout=float(config.modality_dropout),
                            channels=int(sum(setup.in_channels)))
    sampler = PatchSampler(cases, setup.patch_size, setup.batch_size, rank_generator(config.seed, dist.rank),
                           augmenter, threads=loader_threads, component_fraction=config.component_sampling)
    find_unused = use_teachers and not (config.use_reconstruction and config.use_sdkt)
    forward = ddp.wrap_model(TrainForward(model), dist, device, find_unused=find_unused)
    loop = TrainLoop(forward, loss_fn, optimizer, schedule, sampler, device, amp)
    validator = Validator(val_ds, splits["validation"], setup, device) if dist.is_main else None
    run = Run(config, setup, ds, splits, work, writer, dist, device, model, optimizer, schedule, sampler, loop,
              validator, progress, LoopState(), amp, init_report=init_report, made_dirs=list(made),
              wrote_plans=wrote_plans, store_dirs=list(made_store), notices=notices)
    if ckpt is not None:
        run.restore(ckpt)
    return run


def resolve_loader_threads(requested: Optional[int], device: torch.device) -> int:
    """Background threads that prepare patches: as asked, else none on the CPU (the network
    already uses every core there) and up to 8 beside a GPU, whose steps outrun one thread."""
    if requested is not None:
        return int(requested)
    if device.type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _interrupted(run: Run, stop: StopRequest) -> Cancelled:
    st = run.state
    return Cancelled(f"interrupted{' by ' + stop.signal_name if stop.signal_name else ''} at epoch {st.epoch + 1}, "
                     f"iteration {st.iteration}; a resumable checkpoint is in {run.writer.path('last')} "
                     f"(run again with --resume)")


def validate_start(run: Run, stop: StopRequest) -> None:
    """Fine-tuning: validate the starting (parent's) weights before the first step.

    Their Dice is the figure to beat: with ``final_weights="best"`` the starting weights are the
    first candidate (the ``best`` checkpoint), so a run in which no epoch improves on them keeps
    the parent's weights instead of handing back a worse model; with a ``target_dice`` that they
    already reach, nothing is trained. Emits a ``start_validation`` record.
    """
    config, state, progress = run.config, run.state, run.progress
    t0 = time.perf_counter()
    val, cancelled = None, False
    if run.validator is not None:
        progress.emit({"event": "message", "message": f"validating the starting weights on "
                                                      f"{len(run.validator.cases)} case(s)"})
        try:
            val = run.validator(run.model, cancel=stop.event)
        except Cancelled:
            cancelled = True
        run.model.train()
    val, cancelled = ddp.broadcast_object((val, cancelled), run.dist)
    if cancelled:
        raise Cancelled("interrupted while validating the starting weights; nothing was trained or written")
    if val is None or not math.isfinite(val["dice"]):
        return
    seconds = time.perf_counter() - t0
    state.start = {"dice": val["dice"], "per_label": val["per_label"], "seconds": seconds}
    if config.final_weights == "best":
        state.best_dice, state.best_per_label = val["dice"], val["per_label"]  # best_epoch stays None
        run.save(["best"])
    progress.emit({"event": "start_validation", "val_dice": val["dice"], "val_dice_per_label": val["per_label"],
                   "seconds": seconds})
    if config.target_dice is not None and val["dice"] >= config.target_dice:
        state.target_met_at_start = True
        progress.emit({"event": "message", "message": f"the starting weights already reach validation Dice "
                       f"{val['dice']:.4f} >= the target {config.target_dice:g}; nothing to train"})


def train_epochs(run: Run, stop: StopRequest) -> None:
    """The loop: steps, step summaries, epoch ends (validation, best, checkpoints, logs), stops."""
    config, state, progress = run.config, run.state, run.progress
    iters = config.iterations_per_epoch
    total_steps = config.epochs * iters
    every = config.steps_per_summary or max(1, iters // 20)
    run.model.train()
    with stop.handling_signals():
        while state.epoch < config.epochs and state.reached_target_at is None and not state.target_met_at_start:
            t_epoch = time.perf_counter()
            while state.iteration < iters:
                parts = run.loop.step()
                for k, v in parts.items():
                    state.sums[k] = state.sums.get(k, 0.0) + float(v)
                state.count += 1
                state.iteration += 1
                step = state.epoch * iters + state.iteration
                if state.iteration % every == 0 or state.iteration == iters:
                    progress.emit({"event": "step", "stage": "train", "step": step, "steps": total_steps,
                                   "iteration": state.iteration, "iterations": iters,
                                   "epoch_in_progress": state.epoch, "fraction": step / total_steps,
                                   "loss": parts, "lr": run.schedule.lr_at(step - 1),
                                   "seconds": state.epoch_seconds + time.perf_counter() - t_epoch})
                if ddp.any_rank(stop.is_set(), run.dist):
                    state.epoch_seconds += time.perf_counter() - t_epoch
                    run.save(["last"])
                    raise _interrupted(run, stop)
            end_epoch(run, t_epoch, stop)


def end_epoch(run: Run, t_epoch: float, stop: Optional[StopRequest] = None) -> None:
    """Epoch means over ranks, validation when due, best/target bookkeeping, checkpoints, logs.

    A stop request during validation interrupts it; the checkpoint then holds the finished
    epoch's training, and a resumed run validates it again."""
    config, state, progress = run.config, run.state, run.progress
    means = ddp.mean_over_ranks({k: v / max(state.count, 1) for k, v in state.sums.items()}, run.dist)
    due = ((state.epoch + 1) % config.val_every == 0 or state.epoch + 1 == config.epochs
           or config.target_dice is not None)
    val, cancelled = None, False
    if due and run.validator is not None:
        progress.emit({"event": "message", "message": f"validating on {len(run.validator.cases)} case(s)"})
        try:
            val = run.validator(run.model, cancel=stop.event if stop is not None else None)
        except Cancelled:
            cancelled = True
        run.model.train()
    val, cancelled = ddp.broadcast_object((val, cancelled), run.dist)
    if cancelled:
        state.epoch_seconds += time.perf_counter() - t_epoch
        run.save(["last"])
        raise _interrupted(run, stop)
    record = {"event": "epoch", "epoch": state.epoch, "epochs": config.epochs, "loss": means,
              "lr": run.schedule.lr_at(max(run.schedule.last_step - 1, 0)),
              "val_dice": val["dice"] if val else None, "val_dice_per_label": val["per_label"] if val else None,
              "best": False, "seconds": state.epoch_seconds + time.perf_counter() - t_epoch}
    improved = val is not None and math.isfinite(val["dice"]) and (
        state.best_dice is None or val["dice"] > state.best_dice)
    if improved:
        state.best_dice, state.best_epoch, state.best_per_label = val["dice"], state.epoch, val["per_label"]
        record["best"] = True
    if val is not None and config.target_dice is not None and val["dice"] >= config.target_dice:
        state.reached_target_at = state.epoch
        progress.emit({"event": "message", "message": f"validation Dice {val['dice']:.4f} reached the target "
                       f"{config.target_dice:g} after epoch {state.epoch + 1}; stopping"})
    state.history.append(record)
    state.epoch += 1
    state.iteration = 0
    state.sums, state.count, state.epoch_seconds = {}, 0, 0.0
    run.save(["last", "best"] if improved else ["last"])
    progress.emit(record)
    if run.dist.is_main:
        write_csv_log(run.work / LOG_NAME, state.history)
        if val is not None:
            plot_curves(run.work / PLOT_NAME, state.history)


def training_record(run: Run, weights_from: str, command: Optional[str], parent: Optional[str],
                    notes: Optional[dict]) -> dict:
    """The bundle's ``training`` section."""
    from .. import __version__

    config, state, splits = run.config, run.state, run.splits
    last = state.history[-1] if state.history else {}
    if not state.history and state.start is not None:  # nothing trained: the starting weights' figures
        last = {"val_dice": state.start["dice"], "val_dice_per_label": state.start["per_label"]}
    best = weights_from in ("best", "start")
    metrics = {
        "val_dice": state.best_dice if best else last.get("val_dice"),
        "val_dice_per_label": state.best_per_label if best else last.get("val_dice_per_label"),
        "validated_on": run.validated_on, "best_epoch": state.best_epoch, "weights": weights_from,
        "final_train_loss": last.get("loss"),
        "train_cases": splits["train"], "val_cases": splits["validation"], "test_cases": splits["test"],
        "fold": splits.get("fold"), "split": splits.get("split"),
        "train_seconds": round(sum(r.get("seconds") or 0.0 for r in state.history), 2),
        # optimizer steps actually taken (fewer than the schedule's total_steps when --target-dice
        # stopped the run early; 0 when the starting weights already met it)
        "steps_run": state.epoch * config.iterations_per_epoch + state.iteration,
    }
    if splits.get("val_dataset"):
        metrics["val_dataset"] = Path(splits["val_dataset"]).name
    if state.start is not None:
        metrics["start_val_dice"] = state.start["dice"]
        metrics["start_val_dice_per_label"] = state.start["per_label"]
        metrics["start_validation_seconds"] = round(state.start["seconds"], 2)
    if config.target_dice is not None:
        metrics["target_dice"] = config.target_dice
        metrics["reached_target_at_epoch"] = state.reached_target_at
        metrics["target_met_at_start"] = state.target_met_at_start
    recipe = {"optimizer": "AdamW", "lr": config.lr, "min_lr": run.schedule.min_lr,
              "weight_decay": config.weight_decay, "warmup_steps": run.schedule.warmup_steps,
              "total_steps": run.schedule.total_steps, "iterations_per_epoch": config.iterations_per_epoch,
              "batch_size": run.setup.batch_size, "world_size": run.dist.world_size,
              "loss": {"ce_dice_deep_supervision": True, "batch_dice": bool(config.batch_dice),
                       "ds_weights": list(config.ds_weights) if config.ds_weights else "equal",
                       "lambda_rc": 0.5 if config.use_reconstruction else 0,
                       "lambda_sdkt": 2.0 if config.use_sdkt else 0},
              "augmentation": "z-flip p0.5, rotation about z +-15 deg p0.5", "sampling": _sampling_text(config.component_sampling),
              "component_sampling": float(config.component_sampling),
              "amp": run.amp, "freeze_encoder": config.freeze_encoder, "device": run.device.type}
    if config.lesion_dice:
        recipe["loss"]["lambda_lesion_dice"] = float(config.lesion_dice)
    if config.modality_dropout:
        recipe["augmentation"] += f", modality dropout p{config.modality_dropout:g}"
        recipe["modality_dropout"] = float(config.modality_dropout)
    if len(run.optimizer.param_groups) > 1:
        recipe["fresh_warmup_steps"] = int(config.fresh_warmup)
    if run.init_report is not None:
        recipe["reinitialized"] = sorted({k.split(".")[0] for k in run.init_report["fresh"]})
    return {"dataset": _dataset_text(run.dataset, len(splits["train"]), len(splits["validation"]), run.validated_on),
            "epochs": config.epochs, "seed": config.seed, "command": command or "",
            "metrics": _json_safe(metrics), "parent": parent,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "veloxseg_version": __version__,
            "notes": json.dumps(_json_safe({"recipe": recipe, **(notes or {})}), sort_keys=True)}


def write_bundle(run: Run, output, command: Optional[str] = None, parent: Optional[str] = None,
                 notes: Optional[dict] = None) -> Tuple[Path, dict]:
    """The bundle (atomically): best or last weights, inference tensors only, and its metadata."""
    from ..bundle import save_bundle

    config, state = run.config, run.state
    weights_from, final_state = "last", run.model.state_dict()
    if config.final_weights == "best" and run.writer.exists("best"):
        if state.best_epoch is not None:
            weights_from, final_state = "best", read_checkpoint(run.writer.path("best")).model_state()
        elif state.start is not None and state.best_dice is not None:
            weights_from, final_state = "start", read_checkpoint(run.writer.path("best")).model_state()
            if state.history:
                run.progress.emit({"event": "message", "message": (
                    f"no epoch improved on the starting weights' validation Dice {state.best_dice:.4f}: the new "
                    f"bundle keeps the starting weights (--final-weights last keeps the last epoch's)")})
    net = run.setup.build_model(training=False)
    net.load_state_dict(final_state, strict=False)
    weights = net.inference_state_dict() if hasattr(net, "inference_state_dict") else net.state_dict()
    description = config.description or (
        f"{run.setup.model_name} trained on {run.dataset.root.name}" + (f", fine-tuned from {parent}" if parent else ""))
    meta = build_bundle_meta(run.setup, bundle_name_for(output, config.bundle_name),
                             training_record(run, weights_from, command, parent, notes), description)
    write_csv_log(run.work / LOG_NAME, run.state.history)
    plot_curves(run.work / PLOT_NAME, run.state.history)
    return save_bundle(output, meta, weights, overwrite=config.overwrite), meta


def run_training(dataset, output, config: TrainConfig, *, plans=None, setup: Optional[RunSetup] = None,
                 init_weights: Optional[Dict[str, torch.Tensor]] = None, reinit_prefixes: Sequence[str] = (),
                 parent: Optional[str] = None, resume: bool = False, work_dir=None,
                 progress: Optional[ProgressReporter] = None, stop: Optional[StopRequest] = None,
                 command: Optional[str] = None, notes: Optional[dict] = None,
                 planner_overrides: Optional[dict] = None) -> TrainResult:
    """Train on the nnU-Net raw ``dataset`` and write the bundle ``output``.

    ``plans`` (dict or JSON path) or ``setup`` describe the model and data; without either the
    planner runs. ``init_weights`` start from existing weights (fine-tuning), keeping the fresh
    initialization under ``reinit_prefixes``. ``resume`` continues from ``work_dir``'s ``last``
    checkpoint exactly. ``stop`` (set by SIGINT/SIGTERM while running) saves a resumable
    checkpoint and raises :class:`Cancelled`.
    """
    t_start = time.perf_counter()
    stop = stop or StopRequest()
    run = assemble_run(dataset, output, config, plans=plans, setup=setup, init_weights=init_weights,
                       reinit_prefixes=reinit_prefixes, resume=resume, work_dir=work_dir, progress=progress,
                       planner_overrides=planner_overrides)
    st, sp = run.state, run.splits
    run.progress.emit({"event": "start", "epochs": config.epochs, "iterations_per_epoch": config.iterations_per_epoch,
                       "start_epoch": st.epoch, "start_step": st.epoch * config.iterations_per_epoch + st.iteration,
                       "train_cases": len(sp["train"]), "val_cases": len(sp["validation"]),
                       "validation": run.validated_on, "device": str(run.device),
                       "world_size": run.dist.world_size, "resumed": run.resumed})
    for msg in run.notices:
        log.info(msg)
        run.progress.emit({"event": "message", "message": msg})
    if run.validated_on == "training cases":
        why = ("--split gives validation no case" if config.split is not None and float(config.split[1]) == 0
               else f"only {len(run.dataset.cases)} case(s): no case can be held out")
        msg = f"{why}, so validation Dice is measured on the training cases (optimistic)"
        log.info(msg)  # shown once, by the progress reporter (bar and JSON alike)
        run.progress.emit({"event": "message", "message": msg})
    held = [g for g in run.optimizer.param_groups if "start_step" in g]
    if held and not run.schedule.started(held[0]):
        modules = sorted({k.split(".")[0] for k in fresh_parameter_names(run.model, init_weights, reinit_prefixes)})
        msg = (f"the first {held[0]['start_step']} step(s) train only the modules that start afresh "
               f"({', '.join(modules)}); the starting weights are held, then join with their own warm-up")
        log.info(msg)
        run.progress.emit({"event": "message", "message": msg})
    try:
        if (init_weights is not None and not reinit_prefixes and st.epoch == 0 and st.iteration == 0
                and st.start is None):
            with stop.handling_signals():
                validate_start(run, stop)
        train_epochs(run, stop)
    except BaseException:
        if run.dist.is_main:
            run.discard_unstarted()
        raise
    finally:
        run.sampler.close()
    result = TrainResult(None, run.work, st.history, st.best_dice, st.best_epoch, run.validated_on, model=run.model)
    if run.dist.is_main:
        result.bundle, result.meta = write_bundle(run, output, command, parent, notes)
        run.progress.emit({"event": "done", "bundle": str(result.bundle),
                           "val_dice": result.meta["training"]["metrics"]["val_dice"],
                           "weights": result.meta["training"]["metrics"]["weights"],
                           "seconds": time.perf_counter() - t_start})
    ddp.barrier(run.dist)
    return result


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


# --------------------------------------------------------------------------- benchmark


def benchmark_training_step(model_name: str = "veloxseg-b", batch: int = 2, patch=(96, 96, 96), threads: int = 2,
                            iters: int = 3, in_channels=(1, 1), num_classes: int = 2, warmup: int = 1) -> dict:
    """Seconds per training iteration (forward_train + loss + backward + AdamW step) on the CPU
    and the process's peak resident memory afterwards. ``model_name`` may be ``monai-unet``
    (MONAI UNet 16..256, 2 residual units, CE + Dice loss) for the peer figure.

    Peak memory is the process's high-water mark (``ru_maxrss``): measure the smaller model
    first, or run each model in its own process, for a clean per-model figure.
    """
    import resource
    import sys

    from ..losses import VeloxSegLoss, dice_ce_loss

    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    patch = tuple(int(p) for p in (patch if isinstance(patch, (list, tuple)) else (patch,) * 3))
    c_in = sum(in_channels)
    if model_name.startswith("monai-"):
        from monai.networks import nets

        if model_name != "monai-unet":
            raise ConfigError(f"unknown benchmark model {model_name}")
        net = nets.UNet(3, c_in, num_classes, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2)

        def step_loss(x, y):
            return dice_ce_loss(net(x), y)
    else:
        from ..model import build_model

        net = build_model(model_name, in_channels=tuple(in_channels), num_classes=num_classes, patch_size=patch)
        loss_fn = VeloxSegLoss()

        def step_loss(x, y):
            return loss_fn(net.forward_train(x), y, x)[0]
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=PAPER_LR, weight_decay=PAPER_WEIGHT_DECAY)
    x = torch.randn(batch, c_in, *patch)
    y = (torch.rand(batch, *patch) > 0.9).long()
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        loss = step_loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024
    times.sort()
    return {"model": model_name, "batch": batch, "patch": list(patch), "threads": int(threads), "iters": iters,
            "s_per_iter_median": times[len(times) // 2], "s_per_iter_best": times[0],
            "params_m": sum(p.numel() for p in net.parameters()) / 1e6, "peak_rss_mb": peak_mb}


def training_benchmark(models: Sequence[str] = ("monai-unet", "veloxseg-b"), batch: int = 2, patch: int = 96,
                       threads: int = 2, iters: int = 3, progress=None, timeout: float = 1800) -> dict:
    """:func:`benchmark_training_step` for each model in its own process (clean peak memory);
    returns ``{"rows": [...], "markdown": "..."}`` for ``veloxseg bench``'s training section."""
    import subprocess
    import sys

    rows = []
    for name in models:
        if progress:
            progress(f"[bench] training step: {name}, batch {batch}, {patch}^3, {threads} thread(s)")
        code = ("import json; from VeloxSegLib.train.trainer import benchmark_training_step as b; "
                f"print(json.dumps(b({name!r}, batch={batch}, patch={patch}, threads={threads}, iters={iters})))")
        env = dict(os.environ)
        env.pop("OMP_NUM_THREADS", None)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"training benchmark of {name} failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    peer = next((r for r in rows if r["model"] == "monai-unet"), None)
    lines = [f"Seconds per training iteration (forward with deep supervision, teachers and Gram matrices, loss, "
             f"backward, AdamW step), batch {batch}, {patch}^3 patches, 2 input channels, {threads} CPU thread(s); "
             f"median (best) of {iters} after one warm-up; peak RSS of the worker process.", "",
             "| model | params (M) | s/iteration | best | x UNet | peak RSS (MB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{peer['s_per_iter_median'] / r['s_per_iter_median']:.2f}" if peer else "-"
        lines.append(f"| {r['model']} | {r['params_m']:.3f} | {r['s_per_iter_median']:.2f} | "
                     f"{r['s_per_iter_best']:.2f} | {ratio} | {r['peak_rss_mb']:.0f} |")
    return {"rows": rows, "markdown": "\n".join(lines)}


__all__ = ["TrainConfig", "RunSetup", "TrainResult", "TrainLoop", "TrainForward", "Validator", "StopRequest",
           "LoopState", "Run", "assemble_run", "validate_start", "train_epochs", "end_epoch", "training_record", "write_bundle",
           "run_training", "resolve_plans", "split_cases", "preprocess_case", "freeze_encoder",
           "fresh_parameter_names", "parameter_groups",
           "load_initial_weights", "build_bundle_meta", "bundle_name_for", "default_work_dir",
           "benchmark_training_step", "training_benchmark", "HEAD_PREFIXES"]
