"""``veloxseg predict``: segment a case (or a folder of cases) with a model bundle.

    veloxseg predict -m BUNDLE_OR_NAME -i CT.nii.gz PET.nii.gz -o seg.nii.gz
    veloxseg predict -m BUNDLE_OR_NAME -i cases/ -o segs/        (nnU-Net naming: case_0000.nii.gz, ...)
    veloxseg predict -m fold0/ fold1/ fold2/ fold3/ fold4/ -i ...   (an ensemble: logits averaged)
    veloxseg predict -m fine0/ fine1/ coarse0/ coarse1/ -i ...      (configurations: probabilities averaged)

Progress: a tqdm bar on a terminal; ``--progress json`` prints one JSON object per line on
stdout ({"stage", "fraction", "elapsed", ...}) and nothing else there. SIGINT/SIGTERM cancel
cleanly: no partial output is left behind (exit code 130).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time

DESCRIPTION = __doc__.replace("``", "")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="segment images with a model bundle", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True, nargs="+", metavar="BUNDLE_OR_NAME",
                   help="bundle folder or .zip, or the name of an embedded/user bundle (see `veloxseg models`); "
                        "several bundles (the folds of a cross-validation) predict as one ensemble, their "
                        "logits averaged in every window (same inputs, labels, spacing and window size; the "
                        "first bundle's inference settings); bundles of other spacings, windows or "
                        "normalizations (configurations) each predict on their own grid and their "
                        "probabilities are averaged on the first input's, each configuration weighing the same")
    p.add_argument("-i", "--input", nargs="+", metavar="IMAGE",
                   help="input images in the bundle's channel order (NIfTI, NRRD, MHA or DICOM series folders), "
                        "or one folder of cases in nnU-Net naming")
    p.add_argument("-o", "--output", required=True, metavar="PATH",
                   help="output label map (.nii.gz, .nii, .nrrd, .seg.nrrd, .mha), or a folder with -i FOLDER")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="auto: CUDA, then MPS, then CPU (default: auto)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: torch's default)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="CPU arithmetic: fp32 (default) or opt-in bf16, faster on CPUs with AVX512-BF16 or "
                        "AMX (1.1-1.3x over fp32 for veloxseg-b in our runs), with logits rounded to bf16 "
                        "(see docs/inference.md)")
    p.add_argument("--overlap", type=float, metavar="F", help="window overlap in [0, 1) (default: the bundle's)")
    p.add_argument("--blending", choices=("uniform", "gaussian"), help="window blending (default: the bundle's)")
    p.add_argument("--tta", action="store_true", default=None,
                   help="mirror test-time augmentation: average the flips of the axes the model was mirrored "
                        "along in training (the bundle's inference.tta_axes; z for our bundles: 2 passes)")
    p.add_argument("--tta-axes", nargs="+", choices=("x", "y", "z"), metavar="AXIS",
                   help="flip these image axes (x, y, z) instead of the bundle's; implies --tta (2^n passes). "
                        "Flips the model never saw in training usually cost accuracy")
    p.add_argument("--batch-size", type=int, metavar="N", help="windows per forward pass (default: 1 CPU, 4 GPU)")
    p.add_argument("--min-component-mm3", type=float, metavar="V",
                   help="remove connected components smaller than V mm^3 (default: the bundle's)")
    p.add_argument("--no-crop", action="store_true", help="run every window, also over air")
    p.add_argument("--pet-refine", action=argparse.BooleanOptionalAction, default=None,
                   help="redraw each predicted lesion's border from the PET image (a background-corrected "
                        "fraction of its peak uptake, see docs/inference.md); default: the bundle's "
                        "(on for petct-lesion-demo). Needs a model with a PET input")
    p.add_argument("--probabilities", metavar="FILE",
                   help="also write per-class probabilities (float32 vector image) to FILE")
    p.add_argument("--progress", default="auto", choices=("auto", "bar", "json", "none"),
                   help="auto: a bar on a terminal, else none; json: JSON lines on stdout")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- progress


class JsonProgress:
    """One JSON object per line on stdout, flushed; predict events at most every 50 ms."""

    def __init__(self, start: float, stream=None):
        self.start = start
        self.stream = stream or sys.stdout
        self.last = 0.0

    def emit(self, **fields) -> None:
        fields["elapsed"] = round(time.perf_counter() - self.start, 3)
        self.stream.write(json.dumps(fields) + "\n")
        self.stream.flush()

    def __call__(self, stage: str, fraction: float, case: str = None) -> None:
        now = time.perf_counter()
        if stage == "predict" and 0.0 < fraction < 1.0 and now - self.last < 0.05:
            return
        self.last = now
        fields = {"stage": stage, "fraction": round(float(fraction), 4)}
        if case is not None:
            fields["case"] = case
        self.emit(**fields)

    def close(self) -> None:
        pass


class BarProgress:
    """A tqdm bar on stderr, one per stage."""

    def __init__(self):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = None
        self.stage = None

    def __call__(self, stage: str, fraction: float, case: str = None) -> None:
        label = f"{case}: {stage}" if case else stage
        if label != self.stage:
            self.close()
            self.stage = label
            self.bar = self._tqdm(total=100, desc=label, unit="%", file=sys.stderr, leave=False,
                                  bar_format="{desc:>20}: {percentage:3.0f}%|{bar}| {elapsed}")
        self.bar.n = int(round(fraction * 100))
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class NoProgress:
    def __call__(self, *a, **k) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(mode: str, start: float):
    """The progress reporter for --progress auto|bar|json|none (shared by predict and demo)."""
    if mode == "json":
        return JsonProgress(start)
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
        return BarProgress()
    return NoProgress()


# --------------------------------------------------------------------------- signals


class _CancelOnSignal:
    """SIGINT/SIGTERM set an event the pipeline polls; a second signal interrupts at once."""

    def __init__(self):
        self.event = threading.Event()
        self.old = {}

    def _handler(self, signum, frame):
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handler)
        return self.event

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)
        return False


# --------------------------------------------------------------------------- run


#: Endings of files that are not DICOM slices (a folder holding only these is not a DICOM series).
_NOT_DICOM = (".nii.gz", ".nii", ".nrrd", ".mha", ".nhdr", ".mhd", ".raw", ".json", ".txt", ".md", ".csv",
              ".tsv", ".yaml", ".yml", ".pkl", ".npz", ".npy", ".png", ".jpg", ".zip", ".gz", ".safetensors")


def _folder_mode(inputs) -> bool:
    """One input folder holding nnU-Net named images (otherwise a folder is a DICOM series).

    An input folder that holds ``imagesTr``/``imagesTs`` (an nnU-Net dataset root), or holds no
    nnU-Net named images and no file that could be a DICOM slice, raises InputError naming it.
    """
    from ..errors import InputError
    from ..infer.pipeline import _CASE_RE

    for folder in inputs:
        if not os.path.isdir(folder):
            continue
        try:
            names = [n for n in os.listdir(folder) if not n.startswith(".")]
        except OSError as exc:
            raise InputError(f"'{folder}': cannot list folder ({exc.strerror or exc})") from None
        if len(inputs) == 1 and any(_CASE_RE.match(n) for n in names):
            return True
        subs = [n for n in ("imagesTr", "imagesTs") if os.path.isdir(os.path.join(folder, n))]
        if subs:
            raise InputError(f"'{folder}': holds no case images (it looks like an nnU-Net dataset root); "
                             f"use '{os.path.join(folder, subs[0])}'")
        files = [n for n in names if os.path.isfile(os.path.join(folder, n))]
        if not any(not n.lower().endswith(_NOT_DICOM) for n in files):
            hint = ("images in nnU-Net naming, <case>_0000.nii.gz ...," if len(inputs) == 1 else "images")
            raise InputError(f"'{folder}': holds no case {hint} and no DICOM series; give a folder of cases, "
                             f"a DICOM series folder or image files")
    return False


def _check_numbers(args) -> None:
    """Options that would run but give a wrong result: refused before anything is loaded."""
    from ..errors import ConfigError

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.min_component_mm3 is not None and not (math.isfinite(args.min_component_mm3) and args.min_component_mm3 >= 0):
        raise ConfigError(f"--min-component-mm3 must be a volume >= 0, got {args.min_component_mm3}")


def run(args) -> int:
    from ..errors import InputError

    start = time.perf_counter()
    _check_numbers(args)
    inputs = list(args.input or [])
    folder = _folder_mode(inputs)
    if folder:
        from ..data.io import check_writable_folder, split_extension

        if split_extension(args.output)[1].lower() in (".nii.gz", ".nii", ".nrrd", ".mha", ".nhdr", ".mhd"):
            raise InputError(f"'{args.output}': with an input folder, -o must be a folder")
        if args.probabilities:
            raise InputError("--probabilities takes a file and works with single cases, not folders")
        out, src = os.path.realpath(args.output), os.path.realpath(inputs[0])
        if out == src or out.startswith(src + os.sep):
            # the segmentations would be named like input cases and read as such by the next run
            raise InputError(f"'{args.output}': is the input folder or inside it; write the segmentations elsewhere")
        existing = args.output if os.path.isdir(args.output) else os.path.dirname(os.path.abspath(args.output))
        if os.path.isdir(existing):
            check_writable_folder(existing)
    else:
        from ..data.io import check_output_path, check_writable_folder

        if inputs:  # checked before loading anything
            for path in inputs:  # a mistyped input is named before the output is looked at
                if not os.path.exists(path):
                    raise InputError(f"'{path}': no such file or folder")
            check_output_path(args.output, overwrite=args.overwrite, inputs=inputs)
            if args.probabilities:
                check_output_path(args.probabilities, overwrite=args.overwrite, inputs=inputs)
            for path in [args.output] + ([args.probabilities] if args.probabilities else []):
                check_writable_folder(os.path.dirname(os.path.abspath(path)))

        # read the inputs in the background while torch is imported and the network built
        from ..data.io import prefetch_images

        inputs = prefetch_images(inputs)

    from ..infer.pipeline import Segmenter

    progress = make_progress(args.progress, start)
    options = dict(overlap=args.overlap, tta=True if args.tta_axes else args.tta, tta_axes=args.tta_axes,
                   blending=args.blending,
                   min_component_mm3=args.min_component_mm3, crop_to_body=False if args.no_crop else None,
                   pet_refine=args.pet_refine)
    try:
        with _CancelOnSignal() as cancel:
            model = args.model[0] if len(args.model) == 1 else args.model  # several: an ensemble
            seg = Segmenter(model, device=args.device, threads=args.threads, batch_size=args.batch_size,
                            precision=args.precision)
            plan = seg.plan
            if args.pet_refine:  # refused before anything is read
                plan.pet_refine_settings(plan.pet_refine)
            if not inputs:
                raise InputError(f"no inputs: model '{plan.name}' expects {len(plan.channels)} image(s) with -i, "
                                 f"in this order: {plan.expected_inputs()}")
            if folder:
                from ..infer.pipeline import predict_folder

                results = predict_folder(seg, inputs[0], args.output, overwrite=args.overwrite, progress=progress,
                                         cancel=cancel, **options)
                summary = {"cases": len(results), "output": os.fspath(args.output)}
            else:
                from ..infer.pipeline import predict_files

                result = predict_files(seg, inputs, args.output, probabilities_path=args.probabilities,
                                       overwrite=args.overwrite, progress=progress, cancel=cancel, **options)
                summary = {"output": os.fspath(args.output), "windows": result.info.get("windows_run"),
                           "windows_total": result.info.get("windows_total")}
    finally:
        progress.close()
        if not folder:  # a background read must be over before anything is printed
            from ..data.io import wait_prefetched

            wait_prefetched(inputs)
    elapsed = time.perf_counter() - start
    if isinstance(progress, JsonProgress):
        progress.emit(stage="done", fraction=1.0, **summary)
    elif args.progress != "none":
        print(f"veloxseg predict: wrote {summary['output']} in {elapsed:.1f} s", file=sys.stderr)
    return 0
